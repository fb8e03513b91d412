"""Damaged or mismatched checkpoints: one clear line naming the file, never a library traceback.

Covers the shared loader (saicl.checkpoints) through its three entry points: ``saicl-eval --checkpoint``,
``saicl-train --model`` and ``saicl-train --resume``.
"""

import json
import shutil

import pytest

from saicl.checkpoints import CheckpointError, check_checkpoint, load_model
from saicl.eval.evaluate import main as eval_main
from saicl.meta_train.cli import main as train_main


def _damage(file, how):
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        file.write_bytes(bytes(len(data)))
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "header-only":
        file.write_bytes(data[:4096])
    else:
        raise AssertionError(how)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from saicl.testing import save_tiny_t5

    path = tmp_path_factory.mktemp("good")
    save_tiny_t5(path, seed=3)
    return path


@pytest.fixture
def copy_of(tmp_path):
    def copy(path, name="copy"):
        return shutil.copytree(path, tmp_path / name)

    return copy


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    rows = [{"task": "t", "input": f"x{i}", "output": "yes" if i % 2 else "no", "options": ["yes", "no"]}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EVAL = ["--seeds", "100", "--orders", "1", "--k", "1", "--max-queries", "1", "--tokenizer", "byt5", "--no-progress"]
TRAIN = ["--max-steps", "4", "--batch-size", "2", "--eval-steps", "0", "--threads", "1", "--save-steps", "2",
         "--max-demo-tokens", "16", "--max-query-tokens", "16", "--no-progress"]


@pytest.mark.parametrize("how", ["truncated", "zeroed", "empty", "header-only"])
def test_damaged_weights_are_named_by_every_entry_point(checkpoint, copy_of, tasks_file, tmp_path, capsys, how):
    damaged = copy_of(checkpoint)
    _damage(damaged / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=r"copy/model\.safetensors: .*(truncated|damaged|empty)"):
        load_model(damaged)
    assert eval_main(["--checkpoint", str(damaged), "--data", str(tasks_file), *EVAL]) == 2
    assert "model.safetensors" in _one_line(capsys.readouterr().err)
    assert train_main(["--model", str(damaged), "--output-dir", str(tmp_path / "run"), *TRAIN]) == 2
    assert "model.safetensors" in _one_line(capsys.readouterr().err)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_folder_problems_are_named(checkpoint, copy_of, tasks_file, tmp_path, capsys):
    no_config = copy_of(checkpoint, "no_config")
    (no_config / "config.json").unlink()
    assert train_main(["--model", str(no_config), "--output-dir", str(tmp_path / "run"), *TRAIN]) == 2
    assert "--model" in (line := _one_line(capsys.readouterr().err)) and "no config.json inside" in line
    no_weights = copy_of(checkpoint, "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no_weights: no weights inside"):
        check_checkpoint(no_weights)
    bad_json = copy_of(checkpoint, "bad_json")
    (bad_json / "config.json").write_text('{"d_model": 32,\n')
    assert eval_main(["--checkpoint", str(bad_json), "--data", str(tasks_file), *EVAL]) == 2
    assert "bad_json/config.json, line 2: the model config is not valid JSON" in _one_line(capsys.readouterr().err)
    a_file = tmp_path / "file.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; expected a save_pretrained checkpoint folder"):
        check_checkpoint(a_file, "--checkpoint")


def test_sharded_checkpoint_with_a_missing_shard(checkpoint, copy_of):
    sharded = copy_of(checkpoint, "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: weight shard listed in the index"):
        check_checkpoint(sharded)


def test_unknown_structure_in_config_is_named_and_overridable(checkpoint, copy_of, tasks_file, capsys):
    from saicl import SAICLForConditionalGeneration

    odd = copy_of(checkpoint, "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "saicl", "structure": "ring"}))
    with pytest.raises(ValueError, match=r"odd/config\.json: structure='ring' is not a known structure.*"
                                         r"from_pretrained\(\.\.\., structure=\.\.\.\)"):
        SAICLForConditionalGeneration.from_pretrained(odd)
    assert SAICLForConditionalGeneration.from_pretrained(odd, structure="fid").config.structure == "fid"
    assert eval_main(["--checkpoint", str(odd), "--data", str(tasks_file), "--structures", "full", *EVAL]) == 0
    assert "| full |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step run of the micro model with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_main(["--model", "micro", "--output-dir", str(out), *TRAIN]) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    return out


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(run_dir, copy_of, caplog, damaged):
    run = copy_of(run_dir, "run")
    _damage(run / "checkpoint-4" / damaged, "truncated")
    with caplog.at_level("WARNING", logger="saicl.checkpoints"):  # the CLI logs warnings to stderr
        assert train_main(["--model", "micro", "--output-dir", str(run), *TRAIN, "--resume", "--json",
                           str(run / "r.json")]) == 0
    err = caplog.text
    assert f"skipping checkpoint-4, it is damaged ({run / 'checkpoint-4' / damaged}" in err
    assert "resuming from checkpoint-2" in err
    assert json.loads((run / "r.json").read_text())["results"]["saicl"]["steps"] == 4


def test_resume_refuses_a_damaged_named_checkpoint_and_names_an_intact_one(run_dir, copy_of, capsys):
    run = copy_of(run_dir, "run")
    _damage(run / "checkpoint-4" / "model.safetensors", "zeroed")
    code = train_main(["--model", "micro", "--output-dir", str(run), *TRAIN, "--resume", str(run / "checkpoint-4")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "checkpoint-4/model.safetensors" in line
    assert f"pass --resume {run / 'checkpoint-2'}" in line
    _damage(run / "checkpoint-2" / "model.safetensors", "empty")
    assert train_main(["--model", "micro", "--output-dir", str(run), *TRAIN, "--resume"]) == 2
    assert "every checkpoint in" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, expected", [
    (["--model", "micro", "--structure", "full"], ["--structure saicl", "--structure full"]),
    (["--model", "tiny"], ["--model tiny", "d_model 32 vs 64"]),
], ids=["structure", "model"])
def test_resume_with_another_structure_or_model_is_refused(run_dir, copy_of, capsys, flags, expected):
    run = copy_of(run_dir, "run")
    before = sorted(p.name for p in run.iterdir())
    assert train_main([*flags, "--output-dir", str(run), *TRAIN, "--max-steps", "6", "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert all(text in line for text in expected), line
    assert sorted(p.name for p in run.iterdir()) == before
