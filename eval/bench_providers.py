"""Attention-level contenders of ``saicl-bench`` that are not registered backends.

* ``sdpa-bias``: dense ``F.scaled_dot_product_attention`` with the float ``(B, H, L, L)`` T5 bias of the
  layout, its mask folded in as ``-inf`` (what Hugging Face T5 does; under ``saicl``/``fid`` it is the
  naive dense way to run a structure). ``fwd`` builds the bias beforehand, as T5 builds its
  ``position_bias`` once for all layers; ``fwd+bwd`` builds it from a table that needs gradients.
* ``sdpa``: dense SDPA with no bias and no mask, so ``full`` only: a lower bound on the cost of dense
  attention (the flash kernel on CUDA, the fused CPU kernel otherwise).
* ``triton-kernel``: the Triton kernels alone on packed tokens (``saicl.kernels.benchmark.kernel_call``),
  the plan built beforehand; the ``triton`` backend's rows add the per-layer packing and unpacking.

Every row of every contender is counted with the structure's FLOPs (:mod:`saicl.eval.flops`), so a dense
contender's GFLOP/s is the effective rate of the work the structure needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PROVIDERS = ("sdpa-bias", "sdpa", "triton-kernel")
ALIASES = {"sdpa-dense": "sdpa-bias"}  # the name python -m saicl.eval.bench_attention used
ONLY_STRUCTURES = {"sdpa": ("full",)}  # sdpa has no mask: it computes full attention whatever the layout


def canonical(name: str) -> str:
    """A contender's name with old aliases resolved (``sdpa-dense`` -> ``sdpa-bias``)."""
    return ALIASES.get(name, name)


def runs_structure(provider: str, structure: str) -> bool:
    """Whether ``provider`` computes ``structure`` (``sdpa`` computes only ``full``)."""
    return structure in ONLY_STRUCTURES.get(provider, (structure,))


def unavailable_reason(provider: str, device: str) -> str | None:
    """``None`` if ``provider`` runs on ``device``, else why not (``triton-kernel``: as the ``triton`` backend)."""
    if provider == "triton-kernel":
        from saicl.attention.registry import unavailable_reason as backend_reason

        return backend_reason("triton", device)
    return None


def provider_call(case, q, k, v, table, layout, with_prepare: bool) -> Callable[[], object]:
    """The zero-argument call of ``case.backend`` (a provider) on ``(B, L, H, D)`` q, k, v and the bias table.

    ``with_prepare``: include the per-forward state (dense bias, kernel plan) in a ``fwd`` call, as the
    memory measurement does (the state is what differs between structures).
    """
    train = case.pass_ == "fwd+bwd"
    if case.backend == "triton-kernel":
        return _kernel_call(case, q, k, v, table, layout, with_prepare)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    if case.backend == "sdpa":
        def dense():
            return F.scaled_dot_product_attention(qt, kt, vt, scale=1.0)

        return _wrap(dense, train, (q, k, v))
    if case.backend != "sdpa-bias":
        raise ValueError(f"backend={case.backend!r}: not a provider; expected one of {PROVIDERS}")
    from saicl.attention.eager import dense_bias

    def bias() -> torch.Tensor:
        return dense_bias(layout, table).bias.to(q.dtype)

    built = None if (train or with_prepare) else bias()

    def dense_with_bias():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=built if built is not None else bias(),
                                              scale=1.0)

    return _wrap(dense_with_bias, train, (q, k, v, table))


def _wrap(run: Callable[[], torch.Tensor], train: bool, inputs: tuple) -> Callable[[], object]:
    if not train:

        def forward():
            with torch.no_grad():  # not inference_mode: see saicl.eval.scoring
                return run()

        return forward

    def forward_backward():
        for t in inputs:
            t.grad = None
        run().float().sum().backward()

    return forward_backward


def _kernel_call(case, q, k, v, table, layout, with_prepare: bool) -> Callable[[], object]:
    from saicl.attention.triton import pack_layout
    from saicl.kernels import _common
    from saicl.kernels.benchmark import kernel_call

    block_m = _common.default_block_m(q.dtype, q.shape[-1])
    packed = pack_layout(layout, block_m)
    qp, kp, vp = (packed.pack(x).detach().requires_grad_(x.requires_grad) for x in (q, k, v))
    call = kernel_call(qp, kp, vp, table, packed.plan, case.pass_)
    if not with_prepare or case.pass_ != "fwd":
        return call

    def prepare_and_forward():
        plan = pack_layout(layout, block_m).plan
        return kernel_call(qp, kp, vp, table, plan, "fwd")()

    return prepare_and_forward


__all__ = ["ALIASES", "PROVIDERS", "canonical", "provider_call", "runs_structure", "unavailable_reason"]
