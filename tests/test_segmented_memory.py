"""The ``torch`` backend's memory is linear in the number of demonstrations (no ``L x L`` tensor).

Each measurement runs in a fresh subprocess: after a warm-up call it returns freed heap memory to
the OS (``malloc_trim``), resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``;
falls back to ``ru_maxrss``) and reads the peak during a second call minus the resident set before
it: the extra memory of the call alone. Four times the demonstrations must cost
less than 4.5 times the memory (dense attention would cost about 16 times).
"""

import json
import subprocess
import sys

import pytest

# heads 8, head dim 64, demonstrations of 64 tokens, query 64, fp32 (the benchmark's shape).
_CHILD = r"""
import ctypes, gc, json, resource, sys
import torch
from saicl.attention import get_backend
from saicl.layout import build_layout
from saicl.testing import segment_batch

n_demos, mode = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
heads, head_dim, max_distance = 8, 64, 128
mask, seg = segment_batch([[64] * n_demos], [64])
layout = build_layout(mask, seg, "saicl")
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, layout.length, heads, head_dim, generator=gen) for _ in range(3))
table = torch.randn(heads, 2 * max_distance + 1, generator=gen)
backend = get_backend("torch")
if mode == "train":
    for t in (q, k, v, table):
        t.requires_grad_(True)
    grad_out = torch.randn(q.shape, generator=gen)

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def baseline_kb():
    # Return freed heap pages to the OS so the call cannot hide in memory kept from the setup,
    # then reset the high-water mark (VmHWM) so an earlier transient peak does not mask the call.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kb("VmRSS"), True
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False

def peak_kb(hwm_reset):
    return status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def call():
    if mode == "train":
        out = backend(q, k, v, layout, table)
        out.backward(grad_out)
    else:
        with torch.no_grad():
            backend(q, k, v, layout, table)

call()  # warm-up: one-time allocations (thread pools, caches) are not part of the scaling
before, hwm_reset = baseline_kb()
call()
print(json.dumps({"peak_kb": peak_kb(hwm_reset) - before}))
"""


def _peak_kb(n_demos: int, mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n_demos), mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"]


@pytest.mark.slow
# Forward (inference) at the required 128 vs 512 demonstrations; forward + backward at 64 vs 256
# (same factor of four) to keep the test fast.
@pytest.mark.parametrize(("mode", "n_small"), [("inference", 128), ("train", 64)])
def test_peak_memory_is_linear_in_demonstrations(mode, n_small):
    n_large = 4 * n_small
    small, large = _peak_kb(n_small, mode), _peak_kb(n_large, mode)
    # The smaller call must allocate something measurable, or the ratio means nothing.
    assert small > 10_000, f"implausibly small peak for {n_small} demonstrations: {small} kB"
    assert large < 4.5 * small, (
        f"{mode}: peak {large} kB at {n_large} demos vs {small} kB at {n_small} (ratio {large / small:.2f})"
    )
