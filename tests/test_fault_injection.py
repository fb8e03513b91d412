"""Fault injection: kill -9 inside every writer, a full disk during checkpoint saves, concurrent runs.

``tests/fault_driver.py`` (one child process) kills forked copies of each writer with SIGKILL just before
and just after its file-system calls and at random events (a training checkpoint save, the eval JSON, the
bench CSV, the main job's report, a data conversion); the tests here check every folder left behind:
nothing published is partial (each published file is absent or identical to the complete output), and
the run can be continued (resume, rerun) to the same result.
"""

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saicl.meta_train.cli import main as train_main

KILLS_PER_WRITER = 16
WRITERS = ("checkpoint", "eval-json", "bench-csv", "report", "data")
T = ["--model", "micro", "--max-steps", "2", "--batch-size", "2", "--eval-episodes", "2", "--eval-steps", "0",
     "--threads", "1", "--no-progress", "--max-demo-tokens", "16", "--max-query-tokens", "16", "--save-steps", "1"]
TMP = ".saicl-tmp-"  # temporary names of saicl.outputs (never a published name)


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> tuple[Path, dict]:
    """Run the driver once: ``(its work folder, {writer: summary})``."""
    root = tmp_path_factory.mktemp("faults")
    driver = Path(__file__).with_name("fault_driver.py")
    done = subprocess.run([sys.executable, str(driver), str(root), str(KILLS_PER_WRITER), "0"], capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {s["writer"]: s for s in map(json.loads, done.stdout.strip().splitlines()[-len(WRITERS):])}
    assert set(summaries) == set(WRITERS)
    (root / "summary.json").write_text(json.dumps(summaries, indent=1))
    return root, summaries


def _published(folder: Path) -> list[Path]:
    """What a reader sees: every entry except the machinery's own (marker, lock, temporary files)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".saicl-")) if folder.is_dir() else []


def _kill_folders(root: Path, writer: str) -> list[Path]:
    return [root / writer / f"kill-{i}" for i in range(len(json.loads((root / "summary.json").read_text())[writer]
                                                            ["points"]))]


def test_every_fault_was_injected(faults):
    _, summaries = faults
    for writer, summary in summaries.items():
        # (a point past the end of a child's run lets it finish: its folder is then checked as complete)
        assert len(summary["points"]) >= KILLS_PER_WRITER and summary["killed"] >= len(summary["points"]) - 2, \
            (writer, summary)
        assert summary["io_boundaries"] > 0 and summary["hung"] == 0, writer


@pytest.mark.parametrize("writer, name", [("eval-json", "eval.json"), ("bench-csv", "bench.csv"),
                                          ("report", "report.md")])
def test_a_killed_writer_never_publishes_a_partial_file(faults, writer, name):
    root, _ = faults
    reference = (root / writer / "reference" / name).read_bytes()
    if name.endswith(".json"):
        json.loads(reference)
    published = 0
    for folder in _kill_folders(root, writer):
        entries = _published(folder)
        assert [p.name for p in entries] in ([], [name]), folder
        if entries:
            assert entries[0].read_bytes() == reference, f"{entries[0]} is partial"
            published += 1
        assert all(p.name.startswith(TMP) for p in folder.iterdir() if p not in entries) if folder.is_dir() else True
    assert 0 < published < len(_kill_folders(root, writer))  # kills landed both before and after the publish


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".saicl-") for part in p.relative_to(folder).parts)}


def test_a_killed_data_conversion_publishes_only_complete_tasks_and_reruns(faults):
    from saicl.meta_train.convert import main as data_main

    root, _ = faults
    reference = _tree(root / "data" / "reference")
    argv = ["synthetic", "--no-progress", "--train-tasks", "2", "--test-tasks", "2"]
    folders = _kill_folders(root, "data")
    rerun = set(folders[:: max(1, len(folders) // 8)])  # a spread sample (each rerun is a whole conversion)
    for folder in folders:
        for entry in _published(folder):
            got = _tree(folder) if entry.is_file() else {f"{entry.name}/{k}": v for k, v in _tree(entry).items()}
            want = {k: v for k, v in reference.items() if k == entry.name or k.startswith(entry.name + "/")}
            assert {k: got[k] for k in got if k.split("/")[0] == entry.name} == want, f"{entry} is partial"
        if (folder / "splits.json").exists():  # splits.json is published last: the collection is complete
            assert _tree(folder) == reference
        if folder in rerun:  # the killed run's lock and leftovers are no obstacle to a rerun
            assert data_main([*argv, "--out", str(folder)]) == 0
            assert _tree(folder) == reference and not [p for p in folder.iterdir() if p.name.startswith(TMP)]


def _checkpoint_complete(folder: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir()), folder
    load_file(folder / "model.safetensors")
    torch.load(folder / "optimizer.pt", weights_only=True)
    json.loads((folder / "trainer_state.json").read_text())


def test_a_killed_checkpoint_save_leaves_complete_checkpoints_and_resumes_exactly(faults):
    from safetensors.torch import load_file

    from saicl.meta_train.train import TrainConfig, train

    root, _ = faults
    reference = root / "checkpoint" / "reference"
    resumable = None
    for folder in _kill_folders(root, "checkpoint"):
        names = [p.name for p in _published(folder)]
        assert names in (["checkpoint-1"], ["checkpoint-1", "checkpoint-2"], [".staging", "checkpoint-1"],
                         [".staging", "checkpoint-1", "checkpoint-2"]), (folder, names)
        _checkpoint_complete(folder / "checkpoint-1", reference / "checkpoint-1")
        if (folder / "checkpoint-2").exists():
            _checkpoint_complete(folder / "checkpoint-2", reference / "checkpoint-2")
        elif any((folder / ".staging").glob("checkpoint-2/*")):
            resumable = folder  # killed mid-save: a half-written checkpoint-2 under .staging only
    assert resumable is not None
    result = train(TrainConfig(model="micro", max_steps=2, save_steps=1, batch_size=2, eval_episodes=2, eval_steps=0,
                               threads=1, progress=False, warmup_steps=0, logging_steps=1, max_demo_tokens=16,
                               max_query_tokens=16, output_dir=str(resumable), resume="latest"))
    assert result.steps == 2 and result.model_dir is not None
    resumed, straight = load_file(Path(result.model_dir) / "model.safetensors"), load_file(
        reference / "final" / "model.safetensors")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


# ---------------------------------------------------------------------------------------------------
# Disk full


def _assert_disk_full_handled(out: Path, err: str, step: int) -> None:
    lines = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"could not write checkpoint-{step}" in lines[0] and "No space left on device" in lines[0]
    assert f"the last complete checkpoint is {out / f'checkpoint-{step - 1}'}" in lines[0]
    assert not (out / f"checkpoint-{step}").exists() and not (out / ".staging" / f"checkpoint-{step}").exists()
    from safetensors.torch import load_file

    load_file(out / f"checkpoint-{step - 1}" / "model.safetensors")  # the previous checkpoint is intact


def test_disk_full_during_a_checkpoint_save_simulated(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "o"
    assert train_main([*T, "--output-dir", str(out)]) == 1
    _assert_disk_full_handled(out, capsys.readouterr().err, step=2)
    monkeypatch.setattr(torch, "save", real_save)  # room again: continue from checkpoint-1
    assert train_main([*T, "--output-dir", str(out), "--resume", "latest"]) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_disk_full_while_writing_the_final_model(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    real_save_model = Trainer.save_model

    def full(self, output_dir=None, *args, **kwargs):
        if str(output_dir).endswith("final"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_model(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_model", full)
    out = tmp_path / "o"
    assert train_main([*T, "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "could not write the final model" in err and "checkpoint-2" in err
    assert not (out / "final").exists() and (out / "checkpoint-2" / "model.safetensors").is_file()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root and mount permission needed; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:100]}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_disk_full_during_a_checkpoint_save_on_a_real_tiny_file_system(tiny_tmpfs, capsys):
    out = tiny_tmpfs / "o"  # one micro checkpoint (~0.6 MB) fits, the second does not
    assert train_main([*T, "--output-dir", str(out)]) == 1
    _assert_disk_full_handled(out, capsys.readouterr().err, step=2)


# ---------------------------------------------------------------------------------------------------
# Concurrent runs into the same folder

HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outputs)
held = [outputs.OwnedDir.claim(folder, tool, "--out") for folder, tool in zip(sys.argv[2::2], sys.argv[3::2])]
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    import saicl.outputs
    from saicl.eval.main_job import main as run_main
    from saicl.meta_train.convert import main as data_main

    folders = {"saicl-train": tmp_path / "train", "saicl-data": tmp_path / "data", "saicl-run": tmp_path / "run"}
    argv = [sys.executable, "-c", HOLDER, saicl.outputs.__file__]
    for tool, folder in folders.items():
        argv += [str(folder), tool]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        runs = {"saicl-train": lambda: train_main([*T, "--output-dir", str(folders["saicl-train"])]),
                "saicl-data": lambda: data_main(["synthetic", "--out", str(folders["saicl-data"]), "--no-progress"]),
                "saicl-run": lambda: run_main(["--out", str(folders["saicl-run"]), "--no-train", "--no-bench",
                                               "--no-progress"])}
        for tool, run in runs.items():
            start = time.perf_counter()
            assert run() == 2, tool
            err = capsys.readouterr().err
            assert f"{tool} (pid {holder.pid}) is writing into this folder" in err and "Traceback" not in err, err
            assert time.perf_counter() - start < 30  # refused up front, not after the work
            assert _published(folders[tool]) == [], tool  # the second run wrote nothing
    finally:
        holder.communicate("\n", timeout=30)
    assert data_main(["synthetic", "--out", str(folders["saicl-data"]), "--no-progress"]) == 0  # lock released
