"""``attn_backend="xformers"``: reserved name, CUDA only.

xFormers' memory-efficient attention runs only on CUDA (FINDINGS: every op raises on CPU), and a
structured SAICL path over it (block-diagonal masks plus a per-pair T5 bias) is not written yet;
``flex`` and ``triton`` cover CUDA. The backend reports itself unavailable with that reason.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import AttentionBackend


class XFormersBackend(AttentionBackend):
    name = "xformers"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("xformers") is None:
            return "the xformers package is not installed (pip install 'saicl[xformers]', CUDA only)"
        if device.type != "cuda":
            return "xformers attention runs only on CUDA devices"
        return "the xformers structured-attention path is not implemented yet; use attn_backend='flex' or 'triton'"

    def prepare(self, layout, table):
        raise NotImplementedError(self.unavailable_reason(layout.device))

    def attend(self, q, k, v, prepared):
        raise NotImplementedError("xformers backend is not implemented")
