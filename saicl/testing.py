"""Helpers shared by tests and benchmarks (never copied): synthetic inputs, tiny T5 checkpoints, and the
one rule for comparing a computed output with an oracle (:func:`assert_close_to_reference`)."""

from __future__ import annotations

import torch

from .structures import QUERY_SEGMENT

# Error budget of a computation that is mathematically equal to its reference, in units of
# ``eps(dtype) * max|reference|`` (a normwise bound: rounding errors scale with the largest magnitudes
# in play, not with each element's own size). Summation order differs between implementations and
# between CPUs (vector widths, BLAS blocking), so the budget must cover any x86 CPU, not just one: the
# tiny test models (2 layers, sums of up to a few hundred terms) measure 2-4 units here and on a
# Xeon. 64 units is over 10x that margin while a real bug (outputs moved by ~1e-2 on logits of
# magnitude ~5-20: thousands of units in fp32) still fails by a wide margin.
DEFAULT_ULPS = 64


def reference_tolerance(reference: torch.Tensor, dtype: torch.dtype | None = None, ulps: float = DEFAULT_ULPS) -> float:
    """Largest absolute error accepted against ``reference``: ``ulps * eps(dtype) * max|reference|``.

    Args:
        reference: the oracle's output (any shape, any floating dtype).
        dtype: the precision the checked output was computed in (default: ``reference.dtype``); a
            bf16 computation checked against an fp32 reference gets the bf16 budget.
        ulps: the budget in units of ``eps(dtype) * max|reference|`` (see :data:`DEFAULT_ULPS`).
    """
    dtype = dtype or reference.dtype
    magnitudes = reference.detach().abs().double()
    magnitudes = magnitudes[torch.isfinite(magnitudes)]
    scale = magnitudes.max().item() if magnitudes.numel() else 0.0
    # A reference of exact zeros still allows rounding-level noise of the dtype's smallest normal.
    return ulps * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def assert_close_to_reference(
    actual: torch.Tensor, reference: torch.Tensor, *, dtype: torch.dtype | None = None, ulps: float = DEFAULT_ULPS,
    name: str = "output",
) -> float:
    """Assert ``max|actual - reference| <= reference_tolerance(reference, dtype, ulps)``; return the error.

    Shapes must match; NaN or infinity in ``actual`` where the reference is finite fails. Both are
    compared in float64, so a low-precision ``actual`` can be checked against a higher-precision
    reference (pass ``dtype=actual.dtype``, or leave ``dtype`` unset to use ``actual``'s dtype).

    Args:
        actual: the output under test.
        reference: the oracle's output, same shape.
        dtype: precision whose epsilon sets the budget (default: the lower precision of the two).
        ulps: budget in units of ``eps(dtype) * max|reference|``.
        name: what is compared, for the failure message.
    Returns:
        The largest absolute error (float), for tests that also want to report or bound it.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    if dtype is None:
        dtype = max((actual.dtype, reference.dtype), key=lambda d: torch.finfo(d).eps)
    tolerance = reference_tolerance(reference, dtype, ulps)
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    if not torch.equal(torch.isfinite(a), torch.isfinite(r)):
        raise AssertionError(f"{name}: {int((torch.isfinite(a) != torch.isfinite(r)).sum())} elements are "
                             "finite in one tensor and not in the other")
    finite = torch.isfinite(r)
    diff = (a - r).abs().where(finite, torch.zeros_like(a))
    error = float(diff.max()) if diff.numel() else 0.0
    if error > tolerance:
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max |actual - reference| = {error:.3g} at {where} exceeds {tolerance:.3g} "
            f"= {ulps:g} x eps({str(dtype).removeprefix('torch.')}) x max|reference| "
            f"({error / max(tolerance / ulps, 1e-300):.1f} units of eps x max|reference|)"
        )
    return error


def segment_batch(
    demo_lengths: list[list[int]], query_lengths: list[int], pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_mask`` and ``segment_ids`` (as :class:`saicl.ICLProcessor` makes them) for episodes of
    the given token counts.

    Args:
        demo_lengths: per episode, the token count of each demonstration (may be empty).
        query_lengths: per episode, the query's token count (>= 1).
        pad_to: total length; defaults to the longest episode.
    Returns:
        ``(attention_mask, segment_ids)``, both ``(batch, length)`` long tensors.
    """
    rows = []
    for demos, lq in zip(demo_lengths, query_lengths, strict=True):
        ids = [i for i, n in enumerate(demos) for _ in range(n)] + [QUERY_SEGMENT] * lq
        rows.append(ids)
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    segment_ids = torch.full((len(rows), length), QUERY_SEGMENT, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        segment_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
    return attention_mask, segment_ids


def random_qkv(
    batch: int, length: int, heads: int, head_dim: int, dtype=torch.float64, device="cpu", seed: int = 0,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(batch, length, heads, head_dim)`` q, k, v from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, length, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype).to(device)
        for _ in range(3)
    ]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tuple(tensors)


def random_table(heads: int, max_distance: int = 128, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """A random per-distance bias table ``(heads, 2 * max_distance + 1)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, 2 * max_distance + 1, generator=gen, dtype=torch.float64).to(dtype)


def tiny_t5_config(gated: bool = False, **overrides):
    """A tiny ``T5Config`` (ByT5 vocabulary of 384) for tests and demos; ``gated`` = t5-v1_1 style."""
    from transformers import T5Config

    fields = dict(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    if gated:
        fields["tie_word_embeddings"] = False  # as t5-v1_1 checkpoints: no decoder-output scaling
    fields.update(overrides)
    return T5Config(**fields)


def save_tiny_t5(path, gated: bool = False, seed: int = 0, **overrides):
    """Build a randomly initialised Hugging Face ``T5ForConditionalGeneration`` and save it to ``path``."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_t5_config(gated=gated, **overrides))
    model.save_pretrained(path)
    return model


def run_two_ranks(args: list[str], timeout_s: float = 240.0, show_worker_errors: bool = False):
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with one thread per rank; a ``CompletedProcess``.

    The launch gets its own process group, so a hang is killed whole (torchrun's workers would outlive a plain
    kill) and reported with the tail of its stderr. ``show_worker_errors`` prints the workers' own error output
    when the launch fails (torchrun's summary alone rarely names the cause).
    """
    import os
    import signal
    import subprocess
    import sys

    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout_s:.0f} s:\n{stderr[-3000:]}")
    if process.returncode and show_worker_errors:
        print(stderr[-20000:], file=sys.stderr)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def flat_update(weights: dict, initial: dict) -> torch.Tensor:
    """All saved parameters minus their initial values, flattened in name order (float64; tied copies are saved
    once, so only the names both sides share count)."""
    names = sorted(set(weights) & set(initial))
    assert len(names) >= 30, names
    return torch.cat([(weights[name].double() - initial[name].double()).flatten() for name in names])
