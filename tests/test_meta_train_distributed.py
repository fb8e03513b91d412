"""``torchrun --nproc_per_node 2`` on CPU (gloo) against one process on the same global batch.

Two ranks that each take half of every global batch and average their gradients must train exactly what
one process trains on the whole batch: the same loss at every step (up to float rounding) and the same
weights (up to rounding amplified by Adam). Rank agreement alone proves nothing here (DDP keeps ranks
identical by construction); only this comparison catches a wrong per-rank batch size, a wrong split of
the data or a gradient that is summed instead of averaged.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from saicl.testing import assert_close_to_reference, flat_update, run_two_ranks

STEPS, BATCH, LR = 3, 8, 3e-3
# Flags shared by both runs; warm-up 0 so every step has the full learning rate, a loss logged per step.
FLAGS = dict(model="micro", max_steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=0, logging_steps=1,
             save_steps=STEPS, eval_steps=STEPS, eval_episodes=8, threads=1)
# Adam divides each update by the gradient's running RMS, so float noise in a near-zero gradient element
# becomes noise in its update: the two runs' updates measure 7e-6 apart relative to their norm. A wrong
# batch (e.g. every rank taking the whole global batch) measures 0.5; allow 1e-3.
UPDATE_RELATIVE_BUDGET = 1e-3


def _run_torchrun(out, report):
    flags = [item for name, value in FLAGS.items() for item in ("--" + name.replace("_", "-"), str(value))]
    return run_two_ranks(["-m", "saicl.meta_train.cli", *flags, "--output-dir", str(out), "--json", str(report),
                          "--no-progress"])


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    from saicl.meta_train.models import build_model
    from saicl.meta_train.train import TrainConfig, train

    out, report = tmp_path / "ddp", tmp_path / "ddp.json"
    done = _run_torchrun(out, report)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())["results"]["saicl"]
    assert result["steps"] == STEPS and len(result["rank_digests"]) == 2
    assert result["rank_digests"][0] == result["rank_digests"][1]  # DDP kept both ranks identical
    assert result["saving_ranks"] == [0]  # model, optimizer and trainer state are written by rank 0 only
    checkpoint = out / f"checkpoint-{STEPS}"
    # Trainer stores each rank's RNG state (needed for exact resume); everything else exists once.
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (out / "final" / "model.safetensors").is_file() and not (out / ".staging" / "final").exists()
    assert done.stdout.count(f"saicl: {STEPS} steps") == 1  # the summary is printed by rank 0 only

    threads = torch.get_num_threads()
    try:
        single = train(TrainConfig(**FLAGS, progress=False, output_dir=str(tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)  # train() set 1 thread; later tests in this process keep their speed
    # The logged loss of a step is the mean over all ranks, so both runs log the global batch's loss.
    assert [s for s, _ in result["losses"]] == [s for s, _ in single.losses] == list(range(1, STEPS + 1))
    assert_close_to_reference(torch.tensor([loss for _, loss in result["losses"]]),
                              torch.tensor([loss for _, loss in single.losses]), name="per-step global loss")

    initial = build_model("micro", "saicl", seed=0)[0].state_dict()
    update_ddp = flat_update(load_file(out / "final" / "model.safetensors"), initial)
    update_one = flat_update(load_file(tmp_path / "single" / "final" / "model.safetensors"), initial)
    # Adam moves every element with a gradient by about lr per step: the weights really moved.
    assert update_one.norm() > 0.25 * LR * STEPS * math.sqrt(update_one.numel())
    relative = float((update_ddp - update_one).norm() / update_one.norm())
    assert relative <= UPDATE_RELATIVE_BUDGET, f"DDP and one-process updates differ by {relative:.3g} of their norm"
