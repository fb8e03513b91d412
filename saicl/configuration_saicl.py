"""SAICLConfig: a T5Config with the encoder structure and attention backend (DESIGN §4–5)."""

from __future__ import annotations

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


__all__ = ["SAICLConfig"]
