"""Where a measurement comes from: the machine, its load and the versions of the code (one helper for all tools).

Every ``saicl-bench`` row carries :func:`versions` (torch, triton, saicl, the git commit of the checkout the
package was imported from) and the device it ran on; the run as a whole carries :func:`machine_info`.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (``None`` where the OS does not report them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :func:`platform.processor` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha(folder: str | os.PathLike) -> str | None:
    """The commit checked out at ``folder`` (``-dirty`` appended when tracked files differ from it).

    ``None`` unless ``folder`` is a *tracked* folder of a git checkout: a package installed into a
    virtual environment that happens to sit inside some repository is not that repository's code.
    """
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)

    try:
        tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
        head = git("rev-parse", "HEAD")
        if tracked.returncode != 0 or head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    sha = head.stdout.strip()
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """``{"torch", "triton", "saicl", "git_sha"}`` of this process (``None`` where unknown)."""
    import saicl

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "saicl": saicl.__version__,
            "git_sha": git_sha(Path(saicl.__file__).parent)}


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def machine_info(device: str) -> dict:
    """CPU, cores, torch threads, load, versions, Python and (for CUDA) the GPU of a run on ``device``."""
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **versions(), "python": platform.python_version(), "device": device, "loadavg_start": loadavg()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


__all__ = ["cpu_model", "device_name", "git_sha", "loadavg", "machine_info", "versions"]
