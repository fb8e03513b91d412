"""SAICLConfig: a T5Config with the encoder structure and attention backend."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import T5Config

from .attention.registry import check_backend_name
from .structures import get_structure


@strict
class SAICLConfig(T5Config):
    r"""Configuration of :class:`~saicl.SAICLForConditionalGeneration`.

    Every T5 field keeps its meaning, so a plain T5 ``config.json`` (t5, t5-v1_1, flan-t5,
    lm-adapt) loads into it; the two additions can be overridden at load time
    (``from_pretrained(path, structure="fid")``).

    structure (`str`, defaults to `"saicl"`):
        Encoder attention structure: `"saicl"`, `"full"` or `"fid"` (see `saicl.structures`).
    attn_backend (`str`, defaults to `"auto"`):
        Encoder attention backend: `"eager"`, `"torch"`, `"flex"`, `"triton"`, `"xformers"` or
        `"auto"` (best available for the device; see `saicl.attention`).
    """

    model_type = "saicl"

    structure: str = "saicl"
    attn_backend: str = "auto"

    def __post_init__(self, **kwargs):
        # A T5 checkpoint's config.json says model_type "t5"; this config is always "saicl" so that
        # a saved model reloads through the Auto classes as a SAICL model.
        kwargs.pop("model_type", None)
        get_structure(self.structure)
        check_backend_name(self.attn_backend)
        super().__post_init__(**kwargs)

    # The fields this class adds; a value given at load time replaces the file's before it is validated,
    # so a checkpoint whose config.json names an unknown structure/backend still loads when overridden.
    OVERRIDABLE = ("structure", "attn_backend")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        overrides = {key: kwargs[key] for key in cls.OVERRIDABLE if key in kwargs}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """As :meth:`T5Config.from_pretrained`; a bad ``structure``/``attn_backend`` names the config file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ValueError as err:
            message = str(err)
            if not any(f"{key}=" in message for key in cls.OVERRIDABLE):
                raise
            source = Path(pretrained_model_name_or_path)
            source = source / "config.json" if source.is_dir() else source
            key = next(key for key in cls.OVERRIDABLE if f"{key}=" in message)
            raise ValueError(
                f"{source}: {message}; override it at load time with from_pretrained(..., {key}=...)"
            ) from err


__all__ = ["SAICLConfig"]
