"""Model initialisation: a named tiny config built locally, a local checkpoint, or a Hub id."""

from __future__ import annotations

from pathlib import Path

import torch

# Named configs built from scratch (no download); all use the byte-level ByT5 vocabulary (384), whose
# tokenizer needs no files. ``tiny`` is the shape that crossed the in-context-learning plateau on a
# 2-core CPU (docs/meta_training.md): d_model 64, 2 encoder + 1 decoder layers, 4 heads.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=1, num_heads=4),
    "tiny-wide": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=1, num_heads=4),
    "micro": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4),
    "small": dict(d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=2, num_heads=8),
}


def named_config(name: str, structure: str = "saicl", attn_backend: str = "auto"):
    """The ``SAICLConfig`` of a named tiny model."""
    from saicl import SAICLConfig

    fields = dict(
        vocab_size=384, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu",
    )
    fields.update(NAMED_CONFIGS[name])
    return SAICLConfig(structure=structure, attn_backend=attn_backend, **fields)


def build_model(model: str, structure: str = "saicl", attn_backend: str = "auto", seed: int = 0):
    """``(model, tokenizer)`` for a named config (initialised from ``seed``), a local path or a Hub id.

    The initialisation does not depend on ``structure``: the same ``seed`` gives the three structures
    identical starting weights, for a fair comparison.
    """
    from saicl import SAICLForConditionalGeneration

    if model in NAMED_CONFIGS:
        from transformers import ByT5Tokenizer

        torch.manual_seed(seed)
        return SAICLForConditionalGeneration(named_config(model, structure, attn_backend)), ByT5Tokenizer()
    from transformers import AutoTokenizer

    from saicl.checkpoints import load_model

    if not Path(model).exists() and ("/" not in model or model.startswith((".", "/"))):
        raise ValueError(
            f"--model {model!r} is not a named config ({sorted(NAMED_CONFIGS)}), a local folder, or a Hub id"
        )
    if Path(model).exists():  # a local folder: validated first, every problem named by file
        loaded = load_model(model, "--model", structure=structure, attn_backend=attn_backend)
    else:
        try:
            loaded = SAICLForConditionalGeneration.from_pretrained(
                model, structure=structure, attn_backend=attn_backend
            )
        except OSError as err:
            raise ValueError(f"--model {model!r}: could not load a T5 checkpoint from the Hub ({err})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"--model {model!r}: could not load its tokenizer ({err})") from err
    return loaded, tokenizer


def model_config_dict(model: str) -> dict | None:
    """The config ``--model`` builds, as a dict (``None`` for a Hub id: not checked offline)."""
    from saicl.checkpoints import checkpoint_config

    if model in NAMED_CONFIGS:
        return named_config(model).to_dict()
    if Path(model).is_dir() and (Path(model) / "config.json").is_file():
        return checkpoint_config(model)
    return None


__all__ = ["NAMED_CONFIGS", "build_model", "model_config_dict", "named_config"]
