"""The output folder of a meta-training run: what ``saicl-train`` may write into, checked before any training.

A run folder holds only what the run wrote: ``checkpoint-N/`` folders, ``final/`` and ``.staging/`` (plus the
ownership marker and lock of :mod:`saicl.outputs`). Training is refused, with nothing changed, when

- the folder holds anything the tool did not write (a user's folder, another tool's output);
- ``final/`` (or a checkpoint) exists there but was not written by ``saicl-train``;
- the folder holds a run (a checkpoint, or only ``final/`` once checkpoints were pruned) and no ``--resume``
  was asked for;
- another ``saicl-train`` run is writing into it (the lock).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saicl.outputs import OwnedDir, OwnershipError, check_ownership

TOOL = "saicl-train"
FLAG = "--output-dir"
STAGING = ".staging"  # checkpoints are written here, then renamed into place (atomic publish)
FINAL = "final"  # the trained model in save_pretrained format: {output_dir}/final
CHECKPOINT = re.compile(r"^checkpoint-\d+$")


class CheckpointWriteError(OSError):
    """A checkpoint or the final model could not be written (disk full, ...); the message names the folder and
    the last complete checkpoint, which is untouched (only ``.staging/`` was being written)."""


# A failed save is blamed on a full disk when less than this is left (checked before the partial files go).
FULL_DISK_BYTES = 4 * 2**20


def write_failure(err: BaseException, folder: str | os.PathLike) -> str | None:
    """Why writing a checkpoint into ``folder`` failed, if the machine is to blame (an OSError, or a full disk
    whatever the library raised: torch.save reports one as a RuntimeError without errno); ``None`` for any
    other error (a bug, to be raised as is)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < FULL_DISK_BYTES or "No space left" in str(err):
        return f"No space left on device: {free / 2**20:.1f} MiB free"
    return None


def _run_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name in (FINAL, STAGING) or CHECKPOINT.match(p.name))


def _legacy_run(folder: Path) -> bool:
    """A run folder written before ownership markers existed: only checkpoints (with Trainer state), ``final``
    (with this pipeline's config) and ``.staging``, nothing else."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".saicl-")]
    for entry in entries:
        if CHECKPOINT.match(entry.name) and (entry / "trainer_state.json").is_file():
            continue
        if entry.name == FINAL and (entry / "meta_train_config.json").is_file():
            continue
        if entry.name == STAGING and entry.is_dir():
            continue
        return False
    return bool(entries)


def check_run_dir(output_dir: str | os.PathLike, resume: str | None) -> None:
    """Read-only check that a run may write into ``output_dir`` (see the module docstring); changes nothing.

    Raises:
        OutputPathError / OwnershipError (ValueErrors) naming ``--output-dir`` and how to proceed.
    """
    marker = check_ownership(output_dir, TOOL, FLAG, adopt=_legacy_run if resume is not None else None)
    folder = Path(output_dir)
    if marker is None:
        return
    owned = set(marker.get("artefacts", []))
    foreign = [name for name in _run_entries(folder) if name not in owned]
    if foreign:
        raise OwnershipError(f"{FLAG} {output_dir}: {', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} "
                             f"not written by {TOOL}; nothing was changed. Move {'it' if len(foreign) == 1 else 'them'}"
                             f" away or choose another {FLAG}")
    if resume is not None:
        return
    checkpoints = sorted((n for n in _run_entries(folder) if CHECKPOINT.match(n)), key=lambda n: int(n.split("-")[1]))
    if checkpoints:
        raise OwnershipError(f"{FLAG} {output_dir} already holds {checkpoints[-1]}: pass --resume latest to continue "
                             f"it, or choose another {FLAG}")
    if (folder / FINAL).exists():
        raise OwnershipError(f"{FLAG} {output_dir} already holds a finished run ({folder / FINAL}); nothing was "
                             f"changed. Choose another {FLAG}")


def is_main_process() -> bool:
    """Rank 0 (or no distributed launch): the one process that claims the folder and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def claimed_run_dir(output_dir: str | os.PathLike, resume: str | None) -> Iterator[OwnedDir | None]:
    """Check ``output_dir`` on every process; on the main process also claim it (marker, lock) for the run.

    Yields the :class:`~saicl.outputs.OwnedDir` on the main process (``None`` elsewhere); the lock is released
    when the block ends, however it ends.
    """
    check_run_dir(output_dir, resume)
    if not is_main_process():
        yield None
        return
    owned = OwnedDir.claim(output_dir, TOOL, FLAG, adopt=_legacy_run if resume is not None else None)
    try:
        check_run_dir(output_dir, resume)  # again under the lock
        yield owned
    finally:
        owned.release()


__all__ = ["CheckpointWriteError", "FINAL", "STAGING", "TOOL", "check_run_dir", "claimed_run_dir", "is_main_process",
           "write_failure"]
