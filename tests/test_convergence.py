"""Convergence across backends (in the style of Liger-Kernel's convergence tests): a tiny SAICL T5 trained
a few AdamW steps under each attention backend follows the eager oracle's loss curve step by step and ends
on the same weights, for every structure; and the training actually learns.

The equivalence tests (``tests/test_backends.py``, ``tests/test_triton_model.py``) check one forward and
backward on fixed weights. This checks what training sees: several steps on batches of two shapes (a
backend's per-pass preparation rebuilt every step), the optimizer applying each backend's gradients,
including the relative-bias table's, and the differences that remain compounding over the steps.

Everything runs in float64 on CPU, which every backend supports there: ``torch``; ``flex`` through its
dense path of the same ``mask_mod``/``score_mod`` (compiled FlexAttention has no backward on CPU, and no
float64); ``triton`` in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1`` without CUDA: slow,
so the model and the run are tiny). ``xformers`` runs only on CUDA and skips here with its reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from saicl import SAICLConfig, SAICLForConditionalGeneration
from saicl.attention.registry import unavailable_reason
from saicl.testing import DEFAULT_ULPS, assert_close_to_reference, segment_batch

STRUCTURES = ["saicl", "full", "fid"]
BACKENDS = ["torch", "flex", "triton", "xformers"]
D_KV = 16
STEPS, LR = 6, 3e-3
# AdamW's epsilon, stated because the weight tolerance below depends on it (this is torch's default).
ADAM_EPS = 1e-8
EPS = torch.finfo(torch.float64).eps

# Error budgets, in units of eps(float64) times the reference's largest magnitude (saicl.testing's rule).
# Measured against eager (worst over backends and structures; 1 and 2 threads on this CPU):
#   step-1 gradients  316 units (the relative-bias table; every other tensor <= 20)
#   loss curve        10.4 units at any step
#   final weights     5.6e-12 absolute (the relative-bias table; every other tensor ~1e-13)
# while the weakest defect tried (triton's bias-table gradient scaled by 1.001) moves the loss curve by
# 2.7e6 units at step 2 (budget 128); a dropped bias fails the loss of step 1 already.
#
# Gradients: the table gradient of one distance sums the score gradients of every token pair at that
# distance (hundreds here, of both signs), so its rounding error scales with the terms, not with the
# cancelled sum: 4096 units is 13x the measured 316.
GRAD_ULPS = 4096
# Loss: one forward/backward differs by at most DEFAULT_ULPS (64) between mathematically equal backends;
# over a handful of steps the weights' divergence adds at most about that much again per step (measured:
# 10.4 units, flat over the steps), so step k (from 0) gets (k + 1) x 64 units.
LOSS_ULPS_PER_STEP = DEFAULT_ULPS
# Weights: Adam divides each gradient element by its own running magnitude plus ADAM_EPS, so an element
# whose gradient is near zero turns a gradient difference of delta into an update difference of up to
# LR * delta / ADAM_EPS. With delta = GRAD_ULPS * eps * max|gradient| per step, STEPS steps allow
# STEPS * LR * GRAD_ULPS * eps * max|gradient| / ADAM_EPS (about 1.6e-6 x max|gradient| here): loose next
# to the 5.6e-12 measured, but far below the LR-sized moves a wrong gradient causes; the loss curve and
# the first step's gradients are the tight checks.
# Learning: the first and last visits of each batch differ by 1.5 nats (measured); with LR = 0 by 0.
MIN_DROP = 0.5


def _config(structure: str, backend: str) -> SAICLConfig:
    return SAICLConfig(
        vocab_size=64, d_model=32, d_kv=D_KV, d_ff=64, num_heads=2, num_layers=1, num_decoder_layers=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, structure=structure, attn_backend=backend,
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of different shapes (ragged episodes, 0 to 4 demonstrations, padding), alternated."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for demos, queries in (([[], [3], [1, 9, 2, 5]], [4, 2, 3]), ([[4, 4], [7]], [3, 5])):
        mask, segments = segment_batch(demos, queries)
        input_ids = torch.randint(2, 64, mask.shape, generator=gen) * mask
        labels = torch.randint(2, 64, (len(queries), 3), generator=gen)
        batches.append(dict(input_ids=input_ids, attention_mask=mask, segment_ids=segments, labels=labels))
    return batches


@dataclass(frozen=True)
class Run:
    """What one training run recorded.

    Attributes:
        losses: ``(STEPS,)`` float64, the loss of each step before its update.
        first_grads: parameter name -> gradient of step 1 (all backends start from the same weights).
        initial, final: parameter name -> weights before the first and after the last step.
        max_grad: the largest gradient element of any step.
    """

    losses: torch.Tensor
    first_grads: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    max_grad: float


@functools.cache
def _initial_weights(structure: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SAICLForConditionalGeneration(_config(structure, "eager")).double()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _train(structure: str, backend: str) -> Run:
    model = SAICLForConditionalGeneration(_config(structure, backend)).double()
    model.load_state_dict(_initial_weights(structure))
    model.train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    batches = _batches()
    losses, first_grads, max_grad = [], {}, 0.0
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        first_grads = first_grads or grads
        max_grad = max(max_grad, *(g.abs().max().item() for g in grads.values()))
        optimizer.step()
        losses.append(loss.detach())
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    return Run(torch.stack(losses), first_grads, initial, final, max_grad)


@functools.cache
def _eager_run(structure: str) -> Run:
    """The oracle's run, shared by the tests of every backend (read-only)."""
    return _train(structure, "eager")


def _assert_learned(run: Run, who: str) -> None:
    """Each batch's loss fell by more than MIN_DROP between its first and last visit."""
    for first in range(2):
        visits = run.losses[first::2]
        assert visits[-1] < visits[0] - MIN_DROP, f"{who}: the loss did not fall on batch {first}: {visits.tolist()}"


@pytest.mark.parametrize("structure", STRUCTURES)
def test_eager_reference_learns(structure):
    """The oracle's own run learns (so backends cannot agree with it by all standing still) and moves
    every weight tensor (AdamW moves each element that has a gradient by about LR on its first step)."""
    run = _eager_run(structure)
    _assert_learned(run, f"eager/{structure}")
    still = [name for name in run.final if (run.final[name] - run.initial[name]).abs().max() < LR / 2]
    assert not still, f"weights that did not move: {still}"


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_trains_like_eager(backend, structure):
    reason = unavailable_reason(backend, "cpu", head_dim=D_KV)
    if reason is not None:
        pytest.skip(f"{backend} cannot train on CPU here: {reason}")
    reference = _eager_run(structure)
    run = _train(structure, backend)
    who = f"{backend}/{structure}"

    # Step 1 starts from identical weights: the gradients must agree to rounding. This also catches
    # a gradient wrong by a constant factor, which Adam's scale invariance would hide from the weights.
    assert run.first_grads.keys() == reference.first_grads.keys(), who
    for name, ref in reference.first_grads.items():
        assert_close_to_reference(run.first_grads[name], ref, ulps=GRAD_ULPS, name=f"{who} step-1 grad {name}")

    # The loss curve, step by step, with a budget growing by LOSS_ULPS_PER_STEP units per step.
    scale = reference.losses.abs().max().item()
    budget = LOSS_ULPS_PER_STEP * EPS * scale * torch.arange(1, STEPS + 1, dtype=torch.float64)
    error = (run.losses - reference.losses).abs()
    assert bool((error <= budget).all()), (
        f"{who}: loss curve left eager's at step {int((error > budget).nonzero()[0])}:\n"
        f"  {backend}: {run.losses.tolist()}\n  eager: {reference.losses.tolist()}\n"
        f"  |difference| in units of eps x max|loss|: {(error / (EPS * scale)).tolist()}"
    )

    # The final weights (see the derivation of the tolerance above).
    tolerance = STEPS * LR * GRAD_ULPS * EPS * reference.max_grad / ADAM_EPS
    for name, ref in reference.final.items():
        worst = (run.final[name] - ref).abs().max().item()
        assert worst <= tolerance, f"{who}: final {name} is {worst:.3g} from eager's (tolerance {tolerance:.3g})"

    _assert_learned(run, who)
