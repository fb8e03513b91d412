"""Output paths of every tool (issue 8): checked before the work, written atomically, results never lost,
nothing the user owns overwritten or deleted; the CLI minor items (Ctrl-C, --data typos, YAML booleans, bench
flags). Each CLI test fails on the code before the fix (the work would start, or a user file would go)."""

import errno
import json
import os
from pathlib import Path

import pytest

from saicl.eval.bench import main as bench_main
from saicl.eval.main_job import main as run_main
from saicl.meta_train.cli import main as train_main
from saicl.meta_train.convert import main as data_main

T = ["--model", "micro", "--max-steps", "2", "--batch-size", "2", "--eval-episodes", "2", "--eval-steps", "0",
     "--threads", "1", "--no-progress", "--max-demo-tokens", "16", "--max-query-tokens", "16"]
UNWRITABLE = "/proc/self/saicl-test"  # not creatable even as root (procfs)


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the output paths were checked")


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([line for line in lines if "error" in line]) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def _train_cli(argv: list[str]) -> int:
    try:  # configuration errors exit through argparse
        return train_main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("mine\n")
    return path


# ---------------------------------------------------------------------------------------------------
# saicl.outputs


@pytest.mark.parametrize("kind, message", [
    ("existing-folder", "is a folder; expected a file path"),
    ("parent-is-file", "is a file, not a folder"),
    ("trailing-separator", "ends with a path separator"),
    ("unwritable", "cannot write in"),
    ("empty", "empty path"),
])
def test_validate_output_file_names_the_flag(tmp_path, a_file, kind, message):
    from saicl.outputs import OutputPathError, validate_output_file

    path = {"existing-folder": str(tmp_path), "parent-is-file": str(a_file / "sub" / "r.json"),
            "trailing-separator": str(tmp_path / "new") + "/", "unwritable": UNWRITABLE + "/r.json", "empty": ""}[kind]
    with pytest.raises(OutputPathError, match="^--json") as info:
        validate_output_file(path, "--json")
    assert message in str(info.value)


@pytest.mark.parametrize("kind, message", [
    ("is-file", "is a file; expected a folder"),
    ("parent-is-file", "is a file, not a folder"),
    ("unwritable", "cannot write in"),
])
def test_validate_output_dir_names_the_flag(a_file, kind, message):
    from saicl.outputs import OutputPathError, validate_output_dir

    path = {"is-file": a_file, "parent-is-file": a_file / "sub", "unwritable": Path(UNWRITABLE)}[kind]
    with pytest.raises(OutputPathError, match="^--out") as info:
        validate_output_dir(path, "--out")
    assert message in str(info.value)


def test_validators_accept_creatable_paths_and_create_nothing(tmp_path):
    from saicl.outputs import validate_output_dir, validate_output_file

    validate_output_file(tmp_path / "a" / "b" / "r.json", "--json")
    validate_output_dir(tmp_path / "c" / "d", "--out")
    assert list(tmp_path.iterdir()) == []  # the write probe leaves nothing behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from saicl.outputs import atomic_path, atomic_write_text

    target = tmp_path / "r.json"
    atomic_write_text(target, '{"old": 1}\n')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"new": ')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like a plain open(), not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_results_falls_back_beside_the_run(tmp_path, monkeypatch, capsys):
    from saicl.outputs import save_results

    target, run_dir = tmp_path / "out" / "r.json", tmp_path / "run"
    run_dir.mkdir()
    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    where, ok = save_results(target, lambda tmp: tmp.write_text('{"x": 1}\n'), "--json", "saicl-eval",
                             beside=[run_dir])
    assert not ok and where.parent == run_dir and json.loads(where.read_text()) == {"x": 1}
    _one_error_line(capsys.readouterr().err, "--json", "No space left on device", str(where))
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temporary file left either


def test_owned_dir_marker_refusals_and_lock(tmp_path):
    from saicl.outputs import MARKER, OwnedDir, OwnershipError, read_marker

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OwnershipError, match="was not written by saicl-data"):
        OwnedDir.claim(user, "saicl-data", "--out")
    assert [p.name for p in user.iterdir()] == ["notes.txt"]  # refused without creating anything

    out = tmp_path / "out"
    with OwnedDir.claim(out, "saicl-data", "--out") as owned:
        assert read_marker(out)["tool"] == "saicl-data" and (out / MARKER).is_file()
        with pytest.raises(OwnershipError, match=r"saicl-data \(pid \d+\) is writing into this folder"):
            OwnedDir.claim(out, "saicl-data", "--out")
        (out / "theirs.txt").write_text("user file")
        (out / "ours.txt").write_text("tool file")
        owned.record("ours.txt")
        owned.remove("theirs.txt")
        owned.remove("ours.txt")
        assert (out / "theirs.txt").exists() and not (out / "ours.txt").exists()
        with pytest.raises(OwnershipError, match="theirs.txt was not written by saicl-data"):
            owned.check_free(["theirs.txt", "ours.txt"])
    with pytest.raises(OwnershipError, match="was written by saicl-data, not saicl-run"):
        OwnedDir.claim(out, "saicl-run", "--out")
    OwnedDir.claim(out, "saicl-data", "--out").release()  # the lock went with the first run


# ---------------------------------------------------------------------------------------------------
# Item 1: saicl-train never deletes what the user had in --output-dir


def test_train_never_replaces_a_user_final_folder(tmp_path, capsys):
    (tmp_path / "u" / "final").mkdir(parents=True)
    (tmp_path / "u" / "final" / "README.txt").write_text("mine\n")
    assert _train_cli([*T, "--output-dir", str(tmp_path / "u")]) == 2
    assert (tmp_path / "u" / "final" / "README.txt").read_text() == "mine\n"
    _one_error_line(capsys.readouterr().err, "--output-dir", "was not written by saicl-train")


def test_train_refuses_a_finished_run_whose_checkpoints_were_pruned(tmp_path, capsys):
    import shutil

    out = tmp_path / "o"
    assert _train_cli([*T, "--output-dir", str(out)]) == 0
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    weights = (out / "final" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _train_cli([*T, "--seed", "5", "--output-dir", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "already holds a finished run")
    assert (out / "final" / "model.safetensors").read_bytes() == weights


def test_resuming_replaces_only_its_own_final(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train_cli([*T, "--save-steps", "2", "--output-dir", str(out)]) == 0
    (out / "final.old").mkdir()
    (out / "final.old" / "mine.txt").write_text("user file")  # a name the old publish() deleted
    assert _train_cli([*T[:3], "4", *T[4:], "--save-steps", "2", "--output-dir", str(out), "--resume"]) == 0
    assert (out / "final.old" / "mine.txt").read_text() == "user file"
    assert json.loads((out / "final" / "meta_train_config.json").read_text())["max_steps"] == 4


# ---------------------------------------------------------------------------------------------------
# Item 2: saicl-data never overwrites the user's files


def test_data_never_overwrites_user_files(tmp_path, capsys):
    out = tmp_path / "y"
    out.mkdir()
    (out / "splits.json").write_text("mine\n")
    assert data_main(["synthetic", "--out", str(out), "--no-progress"]) == 2
    assert [p.name for p in out.iterdir()] == ["splits.json"] and (out / "splits.json").read_text() == "mine\n"
    _one_error_line(capsys.readouterr().err, "--out", "was not written by saicl-data")


def test_data_rewrites_its_own_folder_and_leaves_the_rest(tmp_path):
    from saicl.meta_train.data import load_tasks

    out = tmp_path / "y"
    assert data_main(["synthetic", "--out", str(out), "--no-progress", "--seed", "1"]) == 0
    (out / "notes.txt").write_text("mine\n")
    assert data_main(["synthetic", "--out", str(out), "--no-progress", "--seed", "2",
                      "--families", "lookup"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"
    assert set(load_tasks(out, split="test", k=4)) == {f"lookup_test_{i:02d}" for i in range(4)}
    assert not [p for p in out.iterdir() if p.name.startswith(".saicl-tmp")]  # no staging left


# ---------------------------------------------------------------------------------------------------
# Item 7: every output path is checked before the work


@pytest.fixture
def eval_inputs(tmp_path_factory):
    from saicl.meta_train.synthetic import write_synthetic_collection
    from saicl.testing import save_tiny_t5

    root = tmp_path_factory.mktemp("eval_inputs")
    save_tiny_t5(root / "ckpt", seed=3)
    data = write_synthetic_collection(root / "data", seed=0, families=["lookup"], n_train_tasks=1, n_test_tasks=1,
                                      n_queries=2)
    return ["--checkpoint", str(root / "ckpt"), "--data", str(data), "--structures", "saicl", "--seeds", "100",
            "--orders", "1", "--k", "2", "--max-queries", "2", "--no-progress"]


@pytest.mark.parametrize("flag, kind", [("--json", "parent-is-file"), ("--json", "folder"),
                                        ("--plot-dir", "file")])
def test_eval_checks_outputs_before_the_work(eval_inputs, a_file, tmp_path, monkeypatch, capsys, flag, kind):
    from saicl.eval import evaluate

    monkeypatch.setattr(evaluate, "evaluate_model", _no_work)
    monkeypatch.setattr(evaluate, "load_checkpoint", _no_work)
    path = {"parent-is-file": a_file / "r.json", "folder": tmp_path, "file": a_file}[kind]
    assert evaluate.main([*eval_inputs, flag, str(path)]) == 2
    _one_error_line(capsys.readouterr().err, f"saicl-eval: error: {flag}")


@pytest.mark.parametrize("flag, kind", [("--json", "folder"), ("--csv", "parent-is-file"),
                                        ("--plot", "parent-is-file"), ("--plot", "unwritable")])
def test_bench_checks_outputs_before_the_work(a_file, tmp_path, monkeypatch, capsys, flag, kind):
    from saicl.eval import bench

    monkeypatch.setattr(bench, "run_bench", _no_work)
    path = {"folder": tmp_path, "parent-is-file": a_file / "b.out", "unwritable": UNWRITABLE + "/b.png"}[kind]
    assert bench_main(["--no-progress", flag, str(path)]) == 2
    _one_error_line(capsys.readouterr().err, f"saicl-bench: error: {flag}")


@pytest.mark.parametrize("flag, kind", [("--json", "parent-is-file"), ("--output-dir", "file")])
def test_train_checks_outputs_before_the_work(a_file, monkeypatch, capsys, flag, kind):
    from saicl.meta_train import train

    monkeypatch.setattr(train, "build_model", _no_work)
    path = {"parent-is-file": a_file / "r.json", "file": a_file}[kind]
    extra = ["--output-dir", str(a_file.parent / "o")] if flag == "--json" else []
    assert _train_cli([*T, *extra, flag, str(path)]) == 2
    _one_error_line(capsys.readouterr().err, flag)


@pytest.mark.parametrize("flag, kind", [("--out", "file"), ("--json", "parent-is-file")])
def test_data_checks_outputs_before_the_work(a_file, tmp_path, capsys, flag, kind):
    out = tmp_path / "collection"
    argv = ["synthetic", "--out", str(a_file if flag == "--out" else out), "--no-progress"]
    if flag == "--json":
        argv += ["--json", str(a_file / "s.json")]
    assert data_main(argv) == 2
    _one_error_line(capsys.readouterr().err, f"saicl-data: error: {flag}")
    assert not out.exists() and a_file.read_text() == "mine\n"


@pytest.mark.parametrize("flag, kind", [("--out", "file"), ("--json", "parent-is-file")])
def test_run_checks_outputs_before_the_work(a_file, tmp_path, monkeypatch, capsys, flag, kind):
    from saicl.eval import main_job

    monkeypatch.setattr(main_job, "train_models", _no_work)
    argv = ["--out", str(a_file if flag == "--out" else tmp_path / "r"), "--max-steps", "1", "--no-progress"]
    if flag == "--json":
        argv += ["--json", str(a_file / "s.json")]
    assert run_main(argv) == 2
    _one_error_line(capsys.readouterr().err, f"saicl-run: error: {flag}")


def _canned_bench(config, show_progress=True):
    from saicl.eval.bench import machine_info

    machine = {**machine_info("cpu"), "loadavg_end": None, "wall_s": 0.0}
    return {"machine": machine, "config": {}, "rows": [], "targets": []}


def _remove_folder_and_put_a_file(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)
    folder.write_text("the folder went away during the run\n")


def test_bench_keeps_its_results_when_the_write_fails_at_the_end(tmp_path, monkeypatch, capsys):
    from saicl.eval import bench

    target = tmp_path / "gone" / "b.json"
    target.parent.mkdir()

    def run_then_lose_the_folder(config, show_progress=True):
        _remove_folder_and_put_a_file(target.parent)
        return _canned_bench(config)

    monkeypatch.setattr(bench, "run_bench", run_then_lose_the_folder)
    monkeypatch.chdir(tmp_path)
    assert bench_main(["--no-progress", "--json", str(target)]) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "--json", "the results were saved to")
    saved = Path(err.split("the results were saved to ")[1].split(" instead")[0])
    assert saved.parent == tmp_path and json.loads(saved.read_text())["rows"] == []


def test_train_keeps_its_results_when_the_json_write_fails_at_the_end(tmp_path, monkeypatch, capsys):
    from saicl.meta_train import train

    real_train = train.train
    target = tmp_path / "gone" / "r.json"
    target.parent.mkdir()

    def train_then_lose_the_folder(config, callbacks=()):
        result = real_train(config, callbacks)
        _remove_folder_and_put_a_file(target.parent)
        return result

    monkeypatch.setattr(train, "train", train_then_lose_the_folder)
    assert _train_cli([*T, "--output-dir", str(tmp_path / "o"), "--json", str(target)]) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "--json", "the results were saved to")
    saved = next((tmp_path / "o").glob("saicl-train-r-*.json"))  # beside the run
    assert json.loads(saved.read_text())["results"]["saicl"]["steps"] == 2


# ---------------------------------------------------------------------------------------------------
# Item 8: bad settings found before the expensive phases; finished structures kept


@pytest.mark.parametrize("extra, message", [
    (["--bench-backends", "bogus"], "--bench-backends bogus: unknown bogus"),
    (["--no-bench", "--eval-k", "4096"], "--eval-k 4096: the held-out noisy-keys tasks have 2048 demonstration"),
])
def test_run_checks_settings_before_training(tmp_path, monkeypatch, capsys, extra, message):
    from saicl.eval import main_job

    monkeypatch.setattr(main_job, "train_models", _no_work)
    assert run_main(["--out", str(tmp_path / "r"), "--no-progress", *extra]) == 2
    _one_error_line(capsys.readouterr().err, message)


def test_train_structures_checks_every_folder_first(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train_cli([*T, "--structure", "full", "--save-steps", "2", "--output-dir", str(out / "full")]) == 0
    capsys.readouterr()
    assert _train_cli([*T, "--structure", "saicl,full", "--output-dir", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "--output-dir", "full", "--resume latest")
    assert not (out / "saicl").exists()  # nothing was trained


def test_train_structures_keeps_the_finished_results(tmp_path, monkeypatch, capsys):
    from saicl.meta_train import train

    real_build = train.build_model

    def fails_for_fid(model, structure, *args, **kwargs):
        if structure == "fid":
            raise ValueError("fid: simulated failure")
        return real_build(model, structure, *args, **kwargs)

    monkeypatch.setattr(train, "build_model", fails_for_fid)
    out = tmp_path / "o"
    assert _train_cli([*T, "--structure", "saicl,fid", "--output-dir", str(out), "--json",
                       str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, "fid: simulated failure")
    assert "saicl: 2 steps" in captured.out and (out / "saicl" / "final" / "config.json").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["results"]) == {"saicl"} and "simulated failure" in report["error"]


# ---------------------------------------------------------------------------------------------------
# Minor items


def test_train_ctrl_c_prints_interrupted_not_a_traceback(tmp_path, monkeypatch, capsys):
    from saicl.meta_train import train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_model", interrupt)
    assert _train_cli([*T, "--output-dir", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "saicl-train: interrupted"


@pytest.mark.parametrize("value", ["data/offlin", "tasks.json", "a/b/c", "./x"])
def test_a_mistyped_local_data_path_is_not_tried_on_the_hub(tmp_path, monkeypatch, capsys, value):
    from saicl.meta_train import data

    monkeypatch.setattr(data, "_load_hub", _no_work)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert _train_cli([*T, "--data", value, "--output-dir", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, f"data={value!r}: no such file or folder")


def test_hub_ids_still_go_to_the_hub():
    from saicl.meta_train.config import looks_like_local_path

    assert not looks_like_local_path("allenai/metaicl") and not looks_like_local_path("glue")


@pytest.mark.parametrize("line, message", [
    ('bf16: "no"', "bf16='no': expected true or false"),
    ("gradient_checkpointing: 1", "gradient_checkpointing=1: expected true or false"),
    ("max_steps: 2.5", "max_steps=2.5: expected an integer"),
    ("lr: fast", "lr='fast': expected a number"),
])
def test_yaml_values_are_type_checked(tmp_path, monkeypatch, capsys, line, message):
    from saicl.meta_train import train

    monkeypatch.setattr(train, "build_model", _no_work)
    config = tmp_path / "run.yaml"
    config.write_text(line + "\n")
    assert _train_cli([*T, "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, str(config), message)


def test_yaml_numbers_pyyaml_reads_as_text_are_accepted(tmp_path):
    from saicl.meta_train.cli import build_parser, config_from_args

    config = tmp_path / "run.yaml"
    config.write_text("lr: 3e-3\nk: 2\nbf16: false\n")
    train_config, _ = config_from_args(build_parser().parse_args(["--config", str(config)]))
    assert train_config.lr == 0.003 and train_config.k == "2" and train_config.bf16 is False


@pytest.mark.parametrize("extra, message", [
    (["--mem-limit-gb", "-1"], "--mem-limit-gb -1.0: expected a positive number"),
    (["--mem-limit-gb", "0"], "--mem-limit-gb 0.0: expected a positive number"),
    (["--vocab-size", "0"], "--vocab-size 0: expected a value >= 1"),
])
def test_bench_rejects_bad_limits(monkeypatch, capsys, extra, message):
    from saicl.eval import bench

    monkeypatch.setattr(bench, "run_bench", _no_work)
    assert bench_main(["--no-progress", *extra]) == 2
    _one_error_line(capsys.readouterr().err, message)


def test_bench_plot_into_a_missing_folder_is_created(tmp_path, monkeypatch, capsys):
    from saicl.eval import bench

    monkeypatch.setattr(bench, "run_bench", _canned_bench)
    plot = tmp_path / "new" / "folder" / "b.png"
    assert bench_main(["--no-progress", "--plot", str(plot)]) == 0, capsys.readouterr().err
    assert plot.read_bytes().startswith(b"\x89PNG")
