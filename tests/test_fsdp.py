"""FSDP2 meta-training (``saicl-train --fsdp``): the flag, and 2 gloo ranks on CPU against one process.

The 2-rank test launches ``tests/fsdp_driver.py`` under ``torchrun`` once (a straight run with sharded
checkpoints, then a fresh run resumed from its first checkpoint) and trains the same global batch in this
process. It checks what only a real sharded run shows: each rank wrote its own shard (FSDP ran, not a silent
DDP fallback), the per-step global loss equals one process's, the final folder is one consolidated
``save_pretrained`` model, and a resume from the sharded checkpoint continues bit for bit.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saicl.testing import assert_close_to_reference, flat_update, run_two_ranks

DRIVER = Path(__file__).with_name("fsdp_driver.py")
STEPS, SAVE, BATCH, LR = 6, 3, 8, 3e-3
# warm-up 0: every step has the full learning rate; a loss logged per step; held-out accuracy once at the end
# (score_options under FSDP); one thread per rank on a 2-core machine.
FLAGS = dict(model="micro", max_steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=0, logging_steps=1,
             save_steps=SAVE, eval_steps=STEPS, eval_episodes=8, threads=1, progress=False)
# The two runs see the same 8 episodes per step; they differ only in float rounding: the logged loss is the
# mean of two 4-episode means instead of one 8-episode mean, and sharded gradients are reduced in another
# order, which Adam (dividing by each gradient's running RMS) amplifies in the weights step after step.
# Measured: the 6 losses agree to 2.3 units of eps(float32) x max|loss|; a wrong batch split (each rank
# taking the whole global batch) differs by 4.7e5 units. assert_close_to_reference's budget is 64 units.
UPDATE_RELATIVE_BUDGET = 1e-3  # as in the DDP test: measured 7e-6 (DDP); a wrong batch gives ~0.5


def _run_driver(workdir: Path, flags: dict) -> subprocess.CompletedProcess:
    return run_two_ranks([str(DRIVER), str(workdir), json.dumps(flags)], show_worker_errors=True)


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process_save_consolidated_and_resume_exactly(tmp_path):
    from saicl import SAICLForConditionalGeneration
    from saicl.checkpoints import load_model
    from saicl.meta_train.models import build_model
    from saicl.meta_train.train import TrainConfig, train, weights_digest

    done = _run_driver(tmp_path, {**FLAGS, "fsdp": "full_shard"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    straight, resumed = results["straight"], results["resumed"]
    assert straight["steps"] == resumed["steps"] == STEPS and straight["saving_ranks"] == [0]

    # FSDP really ran: every rank wrote its shard of the model and of the optimizer state (DDP writes one
    # consolidated file), and no gathered copy sits beside them.
    checkpoint = tmp_path / "straight" / f"checkpoint-{SAVE}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoint.glob("*.safetensors")) and (checkpoint / "config.json").is_file()

    # The final model is one consolidated save_pretrained folder that loads in one process.
    final = Path(straight["model_dir"])
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert weights_digest(SAICLForConditionalGeneration.from_pretrained(final)) == straight["rank_digests"][0]
    assert weights_digest(load_model(final)) == straight["rank_digests"][1]  # digest of the gathered weights

    # The same global batch in one process: the same loss at every step, the same weights up to rounding.
    threads = torch.get_num_threads()
    try:
        single = train(TrainConfig(**FLAGS, output_dir=str(tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)  # train() set 1 thread; later tests in this process keep their speed
    assert [s for s, _ in straight["losses"]] == [s for s, _ in single.losses] == list(range(1, STEPS + 1))
    assert_close_to_reference(torch.tensor([loss for _, loss in straight["losses"]]),
                              torch.tensor([loss for _, loss in single.losses]), name="per-step global loss")
    initial = build_model("micro", "saicl", seed=0)[0].state_dict()
    weights_fsdp = load_file(final / "model.safetensors")
    weights_one = load_file(Path(single.model_dir) / "model.safetensors")
    assert sorted(weights_fsdp) == sorted(weights_one)  # tied embedding saved once, under the same name
    update_fsdp, update_one = flat_update(weights_fsdp, initial), flat_update(weights_one, initial)
    assert update_one.norm() > 0.25 * LR * STEPS * math.sqrt(update_one.numel())  # the weights really moved
    relative = float((update_fsdp - update_one).norm() / update_one.norm())
    assert relative <= UPDATE_RELATIVE_BUDGET, f"FSDP and one-process updates differ by {relative:.3g} of their norm"

    # Resumed from the sharded checkpoint at step SAVE: the same losses and bitwise the same final weights as
    # the uninterrupted run (model shards, optimizer shards, scheduler, RNG and data position all restored).
    assert resumed["step_losses"] == straight["step_losses"][SAVE:]
    assert resumed["losses"] == straight["losses"]
    assert resumed["rank_digests"] == straight["rank_digests"]
    assert resumed["evals"] and resumed["evals"][-1]["loss"] == straight["evals"][-1]["loss"]
    assert resumed["evals"][-1]["accuracy"] == straight["evals"][-1]["accuracy"]  # score_options under FSDP


@pytest.mark.parametrize("value,expected", [
    ("full_shard", {"reshard_after_forward": True, "cpu_offload": False}),
    ("shard_grad_op", {"reshard_after_forward": False, "cpu_offload": False}),
    ("full_shard offload", {"reshard_after_forward": True, "cpu_offload": True}),
    ("offload", {"reshard_after_forward": True, "cpu_offload": True}),
    ("full_shard auto_wrap", {"reshard_after_forward": True, "cpu_offload": False}),
    ("", None),
])
def test_fsdp_flag_grammar(value, expected):
    from saicl.meta_train.fsdp import parse_fsdp

    assert parse_fsdp(value) == expected


def test_fsdp_training_arguments_shard_checkpoints_and_move_activation_checkpointing(monkeypatch):
    from saicl.meta_train.config import TrainConfig
    from saicl.meta_train.fsdp import fsdp_training_arguments
    from saicl.meta_train.train import training_arguments

    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun
    config = TrainConfig(output_dir="unused", fsdp="shard_grad_op", gradient_checkpointing=True)
    kwargs = fsdp_training_arguments(config.fsdp, config.gradient_checkpointing, world_size=2)
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"] == {
        "version": 2, "reshard_after_forward": False, "cpu_offload": False,
        "state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": True}
    monkeypatch.delenv("LOCAL_RANK")  # one local process: TrainingArguments must not start torch.distributed
    args = training_arguments(config.replace(fsdp=""), world_size=1, has_eval=False)
    assert not args.fsdp and args.gradient_checkpointing


@pytest.mark.parametrize("argv,message", [
    (["--fsdp", "hybrid_shard"], "fsdp='hybrid_shard': expected 'full_shard' or 'shard_grad_op'"),
    (["--fsdp", "full_shard shard_grad_op"], "expected 'full_shard' or 'shard_grad_op'"),
    (["--fsdp"], "fsdp='full_shard': FSDP shards over processes; launch with torchrun"),
    (["--fsdp", "--deepspeed", "ds.json"], "choose one engine"),
], ids=["fsdp1-only-strategy", "two-strategies", "no-launcher", "with-deepspeed"])
def test_fsdp_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    from saicl.meta_train.cli import main

    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    try:
        code = main(argv + ["--model", "micro", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # refused before the output folder was claimed
