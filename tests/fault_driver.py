"""Fault injection driver for tests/test_fault_injection.py (run as a child process, not collected by pytest).

    python tests/fault_driver.py WORKDIR KILLS SEED

For each writer (a training checkpoint save, the eval JSON, the bench CSV, the report, a data conversion) it
first runs the writer once under a profile hook that counts the interpreter's call/return events (``T``),
then forks one child per kill point ``p`` in ``[1, T]`` (evenly spread plus seeded random points): the
child runs the writer with a hook that sends itself SIGKILL at event ``p``, i.e. at an arbitrary point
of the Python code, between any two C calls (open, write, fsync, rename, ...). Each killed child leaves
its folder ``WORKDIR/{writer}/kill-{i}`` behind for the test to inspect; ``WORKDIR/{writer}/reference``
holds the complete output. A JSON line per writer on stdout gives ``T``, the points and how many children
died by the signal.
"""

from __future__ import annotations

import gc
import io
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")


# C functions that touch the file system: os.* and file-object methods, plus the writers of torch.save and
# safetensors. The driver kills just before and just after each of them (where a non-atomic writer leaves a
# truncated or half-written file), plus at uniformly drawn events.
NATIVE_WRITERS = {"write_record", "serialize_file", "serialize"}
PUBLISH_CALLS = {"replace", "rename"}  # the moments a result becomes visible: every one of them is a kill point


def is_io_call(fn) -> bool:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, types.ModuleType):
        return owner.__name__ in ("posix", "_io", "io")
    return isinstance(owner, io.IOBase) or getattr(fn, "__name__", "") in NATIVE_WRITERS


def count_events(fn: Callable[[], object]) -> tuple[int, list[tuple[int, str]]]:
    """``(events, [(event number just before / just after a file-system call, the call's name)])`` of ``fn``."""
    count, io_points = 0, []

    def hook(frame, event, arg):
        nonlocal count
        count += 1
        if event in ("c_call", "c_return") and is_io_call(arg):
            io_points.append((count + (1 if event == "c_return" else 0), arg.__name__))

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count, io_points


CHILD_TIMEOUT_S = 60.0
HUNG: list[int] = []  # kill points whose child hung (and was killed by the driver): must stay empty


def run_killed_at(point: int, fn: Callable[[], object]) -> bool:
    """Fork; the child runs ``fn`` and SIGKILLs itself at profile event ``point``. True if it was killed."""
    pid = os.fork()
    if pid == 0:  # child
        count = 0

        def hook(frame, event, arg):
            nonlocal count
            count += 1
            if count >= point:
                os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(hook)
        try:
            fn()
        finally:
            sys.setprofile(None)
            os._exit(0)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if time.monotonic() > deadline:  # a hung child is a harness failure: reported, never waited on forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            HUNG.append(point)
            return False
        time.sleep(0.002)


MAX_IO_POINTS = 80  # a writer with more file-system boundaries than this gets an even sample of n of them


def kill_points(total: int, io_points: list[tuple[int, str]], n: int, rng: random.Random) -> list[int]:
    """Every file-system boundary (or, past ``MAX_IO_POINTS`` of them, ``n`` evenly spread ones, first and last
    included, and every rename), plus ``n // 4`` events drawn uniformly from ``[1, total]``."""
    io = sorted({p for p, _ in io_points if 1 <= p <= total})
    chosen = set(io)
    if len(io) > MAX_IO_POINTS:
        chosen = {io[round(i * (len(io) - 1) / max(1, n - 1))] for i in range(n)}
        chosen |= {p for p, name in io_points if name in PUBLISH_CALLS and 1 <= p <= total}
    target = min(total, len(chosen) + n // 4)
    while len(chosen) < target:
        chosen.add(rng.randint(1, total))
    return sorted(chosen)


def inject(name: str, root: Path, write: Callable[[Path], object], n: int, rng: random.Random) -> dict:
    """Kill ``write(folder)`` at ``n`` points, each into its own folder under ``root/name``."""
    base = root / name
    write(base / "warm-up")  # first-call costs (imports, caches) must not shift the counted events
    shutil.rmtree(base / "warm-up")
    total, io_points = count_events(lambda: write(base / "reference"))
    points = kill_points(total, io_points, n, rng)
    killed = sum(run_killed_at(p, lambda i=i: write(base / f"kill-{i}")) for i, p in enumerate(points))
    return {"writer": name, "events": total, "io_boundaries": len({p for p, _ in io_points}), "points": points,
            "killed": killed}


# ---------------------------------------------------------------------------------------------------
# The writers


def checkpoint_faults(root: Path, n: int, rng: random.Random) -> tuple[dict, dict]:
    """Train 2 steps, saving at each; at the second save, kill ``n`` forked copies of the trainer mid-save,
    snapshotting the run folder after each kill. Returns the summary and the TrainResult as a dict."""
    from saicl.meta_train.train import MetaTrainer, TrainConfig, train

    original = MetaTrainer._save_checkpoint
    run_dir = root / "checkpoint" / "run"
    summary = {"writer": "checkpoint"}

    def reset() -> None:
        shutil.rmtree(run_dir / "checkpoint-2", ignore_errors=True)
        shutil.rmtree(run_dir / ".staging" / "checkpoint-2", ignore_errors=True)

    def save_with_faults(self, model, trial):
        if self.state.global_step == 2:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                counted = count_events(lambda: original(self, model, trial))
                with os.fdopen(write, "w") as pipe:
                    pipe.write(json.dumps(counted))
                os._exit(0)
            os.close(write)
            total, io_points = json.loads(_read_all(read))  # (read before waiting: the pipe may fill)
            os.waitpid(pid, 0)
            reset()
            points = kill_points(total, io_points, n, rng)
            killed = 0
            for i, point in enumerate(points):
                killed += run_killed_at(point, lambda: original(self, model, trial))
                shutil.copytree(run_dir, root / "checkpoint" / f"kill-{i}", symlinks=True)
                reset()
            summary.update(events=total, io_boundaries=len({p for p, _ in io_points}), points=points, killed=killed)
        return original(self, model, trial)

    MetaTrainer._save_checkpoint = save_with_faults
    try:
        result = train(TrainConfig(model="micro", max_steps=2, save_steps=1, batch_size=2, eval_episodes=2,
                                   eval_steps=0, threads=1, progress=False, warmup_steps=0, logging_steps=1,
                                   max_demo_tokens=16, max_query_tokens=16, output_dir=str(run_dir)))
    finally:
        MetaTrainer._save_checkpoint = original
    shutil.copytree(run_dir, root / "checkpoint" / "reference", symlinks=True)
    return summary, result.to_dict()


def eval_results(root: Path) -> dict:
    """A real (tiny) saicl-eval result: a random tiny T5 on a synthetic collection."""
    from transformers import ByT5Tokenizer

    from saicl import SAICLForConditionalGeneration
    from saicl.eval.evaluate import EvalConfig, evaluate_model
    from saicl.meta_train.synthetic import write_synthetic_collection
    from saicl.testing import save_tiny_t5

    save_tiny_t5(root / "inputs" / "ckpt", seed=3)
    data = write_synthetic_collection(root / "inputs" / "data", seed=0, families=["lookup"], n_train_tasks=1,
                                      n_test_tasks=2, n_queries=3)
    model = SAICLForConditionalGeneration.from_pretrained(root / "inputs" / "ckpt", attn_backend="torch")
    config = EvalConfig(data=str(data), structures=("saicl", "full"), seeds=(100, 13), ks=(2, 4), orders=2,
                        batch_size=8, max_demo_tokens=32, max_query_tokens=32)
    return evaluate_model(model, ByT5Tokenizer(), config, show_progress=False)


def bench_rows() -> list[dict]:
    from saicl.eval.bench import add_speedups
    from saicl.eval.bench_cases import BenchCase, case_flops

    rows = []
    for structure in ("saicl", "full", "fid"):
        for n in (1, 4, 16, 64, 256):
            case = BenchCase(what="encoder", structure=structure, backend="torch", pass_="fwd", n_demos=n)
            rows.append({**case.to_row(), "status": "ok", "reason": "", "flops": case_flops(case),
                         "ms_median": 1.5 * n, "peak_mem_mb": 2.0 * n, "repeats": 3})
    add_speedups(rows)
    return rows


def main() -> None:
    root, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    gc.disable()  # collections (and their __del__ calls) at varying moments would shift the event counts
    # tqdm's default lock is a semaphore shared with forked children: one killed inside a progress bar would
    # hold it forever and hang the next. A per-process lock instead, and no bars from transformers.
    from tqdm import std as tqdm_std
    from transformers.utils import logging as hf_logging

    tqdm_std.tqdm.set_lock(threading.RLock())
    hf_logging.disable_progress_bar()
    import torch

    torch.set_num_threads(1)
    from saicl.eval.bench import machine_info, write_csv
    from saicl.eval.cli import save_json
    from saicl.eval.report import write_report
    from saicl.meta_train.convert import main as data_main

    summaries = []
    summary, training = checkpoint_faults(root, n, rng)
    summaries.append(summary)
    results = eval_results(root)
    summaries.append(inject("eval-json", root, lambda d: save_json(d / "eval.json", results, "--json", "saicl-eval"),
                            n, rng))
    rows = bench_rows()
    summaries.append(inject("bench-csv", root, lambda d: write_csv(rows, d / "bench.csv"), n, rng))
    report = {"command": "saicl-run (fault injection)", "version": "test", "wall_s": 1.0,
              "machine": {**machine_info("cpu"), "loadavg_end": None, "wall_s": 0.0}, "notes": ["a note"],
              "phases": {"meta-training": 1.0}, "train_config": {"seed": 0, "model": "micro", "data": "synthetic",
                                                                  "k": "2", "max_steps": 2, "batch_size": 2,
                                                                  "lr": 0.003},
              "training": {"saicl": training}, "eval_description": "tiny", "evaluation": results, "bench": None,
              "bench_command": ""}
    summaries.append(inject("report", root, lambda d: write_report(_mkdir(d), report), n, rng))
    summaries.append(inject("data", root, lambda d: data_main(
        ["synthetic", "--out", str(d), "--no-progress", "--train-tasks", "2", "--test-tasks", "2"]), n, rng))
    for summary in summaries:
        print(json.dumps({**summary, "hung": len(HUNG)}))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


if __name__ == "__main__":
    main()
