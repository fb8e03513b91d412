"""``torchrun --nproc_per_node 2`` on CPU (gloo): a few steps, identical weights on both ranks, only rank 0 writes."""

import json
import os
import signal
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    out, report = tmp_path / "ddp", tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "saicl.meta_train.cli", "--model", "micro", "--max-steps", "3", "--batch-size", "8",
               "--save-steps", "3", "--eval-steps", "3", "--eval-episodes", "8", "--threads", "1",
               "--output-dir", str(out), "--json", str(report), "--no-progress"]
    # Own process group, so a hang is cleaned up whole (torchrun's workers would outlive a plain kill).
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{stderr[-3000:]}")
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())["results"]["saicl"]
    assert result["steps"] == 3 and len(result["rank_digests"]) == 2
    assert result["rank_digests"][0] == result["rank_digests"][1]  # DDP kept both ranks identical
    assert result["saving_ranks"] == [0]  # model, optimizer and trainer state are written by rank 0 only
    checkpoint = out / "checkpoint-3"
    # Trainer stores each rank's RNG state (needed for exact resume); everything else exists once.
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (out / "final" / "model.safetensors").is_file() and not (out / ".staging" / "final").exists()
    assert done.stdout.count("saicl: 3 steps") == 1  # the summary is printed by rank 0 only
