"""Meta-training on CPU: checkpoints that load, exact resume, the NaN guard, the CLI and its bad input."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from saicl.meta_train.cli import main
from saicl.meta_train.models import build_model
from saicl.meta_train.train import TrainConfig, train, weights_digest
from saicl.testing import assert_close_to_reference

TINY = dict(model="micro", batch_size=8, eval_episodes=8, logging_steps=1, threads=1, progress=False,
            warmup_steps=2, max_demo_tokens=16, max_query_tokens=16)


def test_a_few_steps_give_a_checkpoint_that_loads(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    import saicl  # noqa: F401  (registers the Auto classes)
    from saicl import SAICLForConditionalGeneration

    result = train(TrainConfig(**TINY, max_steps=4, save_steps=2, eval_steps=2, output_dir=str(tmp_path / "run")))
    assert result.stopped == "max_steps" and result.steps == 4 and len(result.step_losses) == 4
    assert [e["step"] for e in result.evals] == [2, 4] and 0 <= result.evals[-1]["accuracy"] <= 1
    assert result.last_checkpoint.endswith("checkpoint-4") and not (tmp_path / "run" / ".staging" / "final").exists()
    loaded = SAICLForConditionalGeneration.from_pretrained(result.model_dir)
    assert loaded.config.structure == "saicl" and weights_digest(loaded) == result.rank_digests[0]
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(result.last_checkpoint), SAICLForConditionalGeneration)
    assert json.loads((tmp_path / "run" / "final" / "meta_train_config.json").read_text())["max_steps"] == 4


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_exact_resume(tmp_path):
    """2N steps straight == N steps, stop, resume N more: identical losses and bitwise-identical weights."""
    n = 3
    common = dict(**TINY, max_steps=2 * n, save_steps=n, eval_steps=0, lr_scheduler="linear", k="1-3")
    straight = train(TrainConfig(**common, output_dir=str(tmp_path / "a")))
    first = train(TrainConfig(**common, output_dir=str(tmp_path / "b")), callbacks=[_StopAt(n)])
    assert first.steps == n
    resumed = train(TrainConfig(**common, output_dir=str(tmp_path / "b"), resume="latest"))
    assert resumed.steps == 2 * n
    assert first.step_losses + resumed.step_losses == straight.step_losses
    assert resumed.rank_digests == straight.rank_digests
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in straight.losses]  # history restored


class _PoisonAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.shared.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from saicl import SAICLForConditionalGeneration

    result = train(TrainConfig(**TINY, max_steps=6, save_steps=2, eval_steps=0, output_dir=str(tmp_path / "r")),
                   callbacks=[_PoisonAt(3)])
    assert result.stopped == "nan" and result.model_dir is None and "step 4" in result.message
    assert result.last_checkpoint.endswith("checkpoint-2") and "checkpoint-2" in result.message
    kept = SAICLForConditionalGeneration.from_pretrained(result.last_checkpoint)
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_structures_share_the_initialisation():
    digests = {s: weights_digest(build_model("micro", s, seed=7)[0]) for s in ("saicl", "full", "fid")}
    assert len(set(digests.values())) == 1
    assert weights_digest(build_model("micro", "saicl", seed=8)[0]) != digests["saicl"]


def test_cli_yaml_structures_and_json(tmp_path):
    collection = tmp_path / "syn"
    assert main_data(["synthetic", "--out", str(collection)]) == 0
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: micro\nmax-steps: 2\nbatch_size: 4\neval_steps: 2\neval_episodes: 4\n"
                         "save_steps: 2\nthreads: 1\nk: 2-3\n")
    out = tmp_path / "out"
    code = main(["--config", str(yaml_file), "--structure", "saicl,fid", "--data", str(collection), "--output-dir",
                 str(out), "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["structures"] == ["saicl", "fid"] and report["config"]["max_steps"] == 2
    for structure in ("saicl", "fid"):
        result = report["results"][structure]
        assert result["steps"] == 2 and (out / structure / "final" / "config.json").is_file()
        assert json.loads((out / structure / "final" / "config.json").read_text())["structure"] == structure
        assert all(math.isfinite(loss) for loss in result["step_losses"]) and result["evals"]


def main_data(argv):
    from saicl.meta_train.convert import main as data_main

    return data_main(argv + ["--no-progress"])


@pytest.mark.parametrize("argv,message", [
    (["--structure", "sparse"], "structure='sparse'"),
    (["--k", "8-2"], "empty or negative"),
    (["--max-steps", "0"], "max_steps=0"),
    (["--data", "/nonexistent/tasks.jsonl"], "no such file or folder"),
    (["--model", "./no-such-model"], "not a named config"),
    (["--resume", "/no/such/checkpoint"], "resume="),
    (["--config", "/no/such.yaml"], "no such file"),
], ids=["structure", "k-range", "steps", "data", "model", "resume", "config"])
def test_cli_bad_input(argv, message, tmp_path, capsys):
    try:  # configuration errors exit from argparse, data/model errors return the code
        code = main(argv + ["--output-dir", str(tmp_path / "o"), "--no-progress"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def test_cli_refuses_to_overwrite_and_resumes_on_request(tmp_path, capsys):
    args = ["--model", "micro", "--max-steps", "2", "--batch-size", "4", "--save-steps", "2", "--eval-steps", "0",
            "--threads", "1", "--output-dir", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2 and "--resume latest" in capsys.readouterr().err
    assert main([*args[:3], "4", *args[4:], "--resume"]) == 0



# Mixed precision defaults (bf16 autocast on CUDA where supported, fp32 on CPU).
@pytest.mark.parametrize(
    "bf16, cuda, bf16_ok, tf32_ok, expected",
    [
        pytest.param(None, False, False, False, {"bf16": False, "tf32": None}, id="cpu-default-fp32"),
        pytest.param(None, True, True, True, {"bf16": True, "tf32": False}, id="cuda-default-bf16"),
        pytest.param(None, True, False, False, {"bf16": False, "tf32": False}, id="old-gpu-fp32"),
        pytest.param(False, True, True, True, {"bf16": False, "tf32": True}, id="cuda-fp32-uses-tf32"),
        pytest.param(True, True, True, True, {"bf16": True, "tf32": False}, id="cuda-explicit-bf16"),
    ],
)
def test_precision_defaults_to_bf16_on_cuda_and_fp32_on_cpu(bf16, cuda, bf16_ok, tf32_ok, expected):
    from saicl.meta_train.config import resolve_precision

    assert resolve_precision(bf16, cuda, bf16_ok, tf32_ok) == expected


def test_bf16_without_a_supporting_device_is_refused_by_name():
    from saicl.meta_train.config import TrainConfig, resolve_precision

    assert TrainConfig().bf16 is None  # the default is the device's choice, not a fixed fp32
    with pytest.raises(ValueError, match="bf16=True"):
        resolve_precision(True, False, False, False)


def test_training_arguments_on_this_cpu_stay_fp32():
    from saicl.meta_train.config import TrainConfig
    from saicl.meta_train.train import training_arguments

    if torch.cuda.is_available():
        pytest.skip("this test checks the CPU default; the CUDA default is covered by the resolver tests")
    args = training_arguments(TrainConfig(output_dir="unused"), world_size=1, has_eval=False)
    assert args.bf16 is False


def test_training_accuracy_uses_the_evaluation_tie_rule():
    """Options whose NLLs differ by less than the rounding go to the first listed option, in training too."""
    from saicl.meta_train.evaluate import option_accuracy

    class _Batch(dict):
        def to(self, device):
            return self

    class _Model:
        device = torch.device("cpu")
        training = False

        def eval(self):
            pass

        def train(self, mode=True):
            pass

        def score_options(self, options, **kwargs):
            # the gold (first) option is worse by 1e-7 nats: a tie after rounding to 1e-5
            return [torch.tensor([1.0 + 1e-7, 1.0]) for _ in options]

    episodes = [{"demonstrations": [], "query": "q", "options": ["yes", "no"], "output": "yes"}]
    result = option_accuracy(_Model(), lambda chunk: _Batch(), None, episodes)
    assert result["accuracy"] == 1.0


def test_step_losses_are_read_at_logging_steps_and_bounded(tmp_path, monkeypatch):
    """Per-step losses stay on the device between logging steps and only the newest LOSS_HISTORY are kept;
    each logged loss is still the mean of the kept per-step losses of its logging interval."""
    import saicl.meta_train.train as train_module

    reads = []

    class _Reads(TrainerCallback):  # how many per-step losses reached the host by the end of each step
        def __init__(self):
            self.trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            reads.append(len(self.trainer.step_losses))

    monkeypatch.setattr(train_module, "LOSS_HISTORY", 4)
    spy = _Reads()
    original_init = train_module.MetaTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        spy.trainer = self

    monkeypatch.setattr(train_module.MetaTrainer, "__init__", init)
    result = train(TrainConfig(**{**TINY, "logging_steps": 2}, max_steps=6, save_steps=6, eval_steps=0,
                               output_dir=str(tmp_path / "run")), callbacks=[spy])
    assert result.steps == 6 and len(result.step_losses) == 4  # bounded: steps 3-6 of 6
    # on_step_end runs before the step's logging: the host has read nothing since the last logging step
    assert reads == [0, 0, 2, 2, 4, 4]
    logged = dict(result.losses)
    assert sorted(logged) == [2, 4, 6]
    # Trainer sums the interval's losses in float32 and divides on the host: a few float32 roundings
    for step, pair in ((4, result.step_losses[0:2]), (6, result.step_losses[2:4])):
        assert_close_to_reference(torch.tensor(logged[step]), torch.tensor(sum(pair) / 2), dtype=torch.float32,
                                  ulps=4, name=f"logged loss at step {step}")
