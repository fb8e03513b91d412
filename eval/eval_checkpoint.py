"""``saicl-eval``'s model and tokenizer from a ``save_pretrained`` folder (the model via :mod:`saicl.checkpoints`)."""

from __future__ import annotations

import sys

import torch

from .cli import CLIError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(path: str, tokenizer_name: str | None, attn_backend: str, device: str, dtype: str,
                    structure: str | None = None):
    """``(model, tokenizer)`` from a ``save_pretrained`` folder (any T5 or SAICL checkpoint).

    The folder is validated first (:func:`saicl.checkpoints.load_model`): a missing, truncated or empty
    file is named. ``structure`` overrides the one in ``config.json`` (also an unknown one).
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    from saicl.checkpoints import load_model

    overrides = {"structure": structure} if structure is not None else {}
    model = load_model(path, "--checkpoint", attn_backend=attn_backend, dtype=TORCH_DTYPES[dtype], **overrides)
    model.to(device)
    if tokenizer_name == "byt5":
        return model, ByT5Tokenizer()
    try:
        return model, AutoTokenizer.from_pretrained(tokenizer_name or path)
    except (OSError, ValueError, TypeError) as err:
        if tokenizer_name is None and model.config.vocab_size == 384:
            print(f"note: no tokenizer in {path}; vocabulary size 384 is ByT5's, using ByT5Tokenizer", file=sys.stderr)
            return model, ByT5Tokenizer()
        raise CLIError(f"could not load a tokenizer from {tokenizer_name or path} ({err}); pass --tokenizer") from err


__all__ = ["TORCH_DTYPES", "load_checkpoint"]
