"""Where the command-line tools write, shared by all of them: checked before any work, written atomically,
never lost, and never over anything the user owns.

- :func:`validate_output_file` / :func:`validate_output_dir`: called by every tool before it starts working;
  an unwritable location, a parent that is a file, a folder given as a file or a file given as a folder
  raise :class:`OutputPathError` (a ``ValueError``) naming the flag. The tools turn it into exit code 2.
- :func:`atomic_path`, :func:`atomic_write_text`: results are written to a temporary file in the same
  folder, flushed to disk, then renamed over the target, so a reader (or a crash, or ``kill -9``) only ever
  sees the old file or the complete new one.
- :func:`save_results`: an atomic write that, if it still fails at the end of a run, writes the results
  beside the run instead and says where in one line: computed results are never lost.
- :class:`OwnedDir`: a folder a tool created carries a marker (``.saicl-output.json``, the tool's name and
  the entries it wrote). A tool writes into an existing non-empty folder only if its marker is there, and
  replaces or deletes only the entries the marker lists. A lock file (``fcntl.flock``) refuses a second
  concurrent run into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

MARKER = ".saicl-output.json"  # the ownership marker of a folder a tool created
LOCK = ".saicl-output.lock"  # held (flock) while a tool writes into the folder
TMP_PREFIX = ".saicl-tmp-"  # temporary files and folders, renamed into place once complete
INTERNAL_PREFIX = ".saicl-"  # entries of the machinery itself: never count as the user's content
# Made only by a run holding a folder's lock (staging, replaced entries set aside, marker updates).
_LEFTOVERS = (f"{TMP_PREFIX}staging-", f"{TMP_PREFIX}old-", f"{TMP_PREFIX}{Path(MARKER).stem}-")


class OutputPathError(ValueError):
    """An output path the tool cannot or must not write (the message names the flag)."""


class OwnershipError(OutputPathError):
    """The folder holds things this tool did not create, or another run is writing into it."""


# ---------------------------------------------------------------------------------------------------
# Validation (before any work)


def _describe(flag: str, path: str | os.PathLike) -> str:
    return f"{flag} {os.fspath(path)}" if flag else os.fspath(path)


def _probe_writable(folder: Path, flag: str, path: str | os.PathLike) -> None:
    """Raise unless a file can be created in the existing ``folder`` (``os.access`` is not enough as root or
    on read-only file systems, so a hidden probe file is created and removed at once)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{_describe(flag, path)}: cannot write in {folder} (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + "probe-")
    except OSError as err:
        raise OutputPathError(f"{_describe(flag, path)}: cannot write in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable(folder: Path, flag: str, path: str | os.PathLike) -> None:
    """``folder`` exists and is writable, or can be created (its nearest existing ancestor is a writable folder)."""
    ancestor = _nearest_existing(folder)
    if not ancestor.is_dir():
        raise OutputPathError(f"{_describe(flag, path)}: {ancestor} is a file, not a folder")
    _probe_writable(ancestor, flag, path)


def validate_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Check that ``path`` can be written as a file (its folder may still have to be created).

    Raises:
        OutputPathError naming ``flag``: empty path, an existing folder, a path ending in a separator, a
        read-only file, a parent that is a file, or a location that cannot be written.
    """
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise OutputPathError(f"{flag}: empty path")
    target = Path(text).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{_describe(flag, text)}: is a folder; expected a file path")
    if str(text).endswith(("/", os.sep)):
        raise OutputPathError(f"{_describe(flag, text)}: ends with a path separator; expected a file path")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{_describe(flag, text)}: the file exists and is read-only")
    _check_creatable(target.parent, flag, text)
    return target


def validate_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check that ``path`` is a writable folder or can be created as one.

    Raises:
        OutputPathError naming ``flag``: empty path, an existing file, a parent that is a file, or a location
        that cannot be written.
    """
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise OutputPathError(f"{flag}: empty path")
    target = Path(text).expanduser()
    if os.path.lexists(target) and not target.is_dir():
        raise OutputPathError(f"{_describe(flag, text)}: is a file; expected a folder")
    _check_creatable(target, flag, text)
    return target


# ---------------------------------------------------------------------------------------------------
# Atomic writing


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (``mkstemp`` makes them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder entry to disk (best effort on file systems without folder fsync)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); when the block ends without an error the
    temporary file is flushed and renamed over ``path``, else removed. Parents are created.

    A crash or ``kill -9`` at any point leaves ``path`` either as it was or complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data, indent: int = 1) -> Path:
    """Write ``data`` as strict JSON (no NaN) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def fallback_path(path: str | os.PathLike, tool: str, beside: Sequence[str | os.PathLike] = ()) -> Path:
    """Where results go when ``path`` cannot be written: the first writable folder among ``beside`` (the run's
    own folder), the current folder and the temporary folder, under a name that never replaces a file."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{tool}-{path.stem or 'results'}-{stamp}-{os.getpid()}{path.suffix}"
    for folder in [*map(Path, beside), Path.cwd(), Path(tempfile.gettempdir())]:
        try:
            _probe_writable(folder, "", folder)
        except (OutputPathError, OSError):
            continue
        return folder / name
    return Path(tempfile.gettempdir()) / name


def save_results(path: str | os.PathLike, write: Callable[[Path], object], flag: str, tool: str,
                 beside: Sequence[str | os.PathLike] = ()) -> tuple[Path, bool]:
    """Write results with ``write(tmp_path)`` atomically to ``path``; if that fails (disk full, the folder
    went away), write them to :func:`fallback_path` and print one line on stderr saying where.

    Returns:
        ``(where the results are, whether that is path)``. Raises only if the fallback fails too.
    """
    try:
        with atomic_path(path) as tmp:
            write(tmp)
        return Path(path), True
    except OSError as err:
        reason = err.strerror or str(err)
    target = fallback_path(path, tool, beside)
    with atomic_path(target) as tmp:
        write(tmp)
    print(f"{tool}: error: could not write {_describe(flag, path)} ({reason}); the results were saved to "
          f"{target} instead", file=sys.stderr)
    return target, False


def publish_entry(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a completely written file or folder ``src`` to ``dst`` by rename, replacing an older ``dst``.

    A folder cannot be renamed over another, so an older ``dst`` is first renamed aside (hidden) and removed
    afterwards: a crash in between leaves ``dst`` absent, never half-written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir() or not dst.is_dir():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{TMP_PREFIX}old-{dst.name}-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root`` to disk (before publishing it by rename)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


# ---------------------------------------------------------------------------------------------------
# Ownership and locking


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The ownership marker of ``folder`` (``{"tool", "artefacts", ...}``), or ``None`` if it has none."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("tool"), str) else None


def user_entries(folder: str | os.PathLike) -> list[str]:
    """Entries of ``folder`` other than the machinery's own (marker, lock, temporary files)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith(INTERNAL_PREFIX))


def check_ownership(path: str | os.PathLike, tool: str, flag: str,
                    adopt: Callable[[Path], bool] | None = None) -> dict | None:
    """Read-only check that ``tool`` may write into the folder ``path``; changes nothing.

    Returns:
        ``None`` if the folder does not exist or is empty (the tool will create/claim it), else the marker.
        ``adopt(path)`` may accept a folder without marker that the tool recognises as its own output from
        before markers existed (it is then claimed with all its entries).
    Raises:
        OutputPathError / OwnershipError naming ``flag`` and saying how to proceed.
    """
    folder = validate_output_dir(path, flag)
    if not folder.is_dir() or not user_entries(folder):
        return None
    marker = read_marker(folder)
    if marker is None:
        if adopt is not None and adopt(folder):
            return {"tool": tool, "artefacts": user_entries(folder), "adopted": True}
        raise OwnershipError(
            f"{_describe(flag, path)}: the folder is not empty and was not written by {tool} (no {MARKER} "
            "inside); nothing was changed. Choose a new or empty folder"
        )
    if marker["tool"] != tool:
        raise OwnershipError(f"{_describe(flag, path)}: the folder was written by {marker['tool']}, not {tool}; "
                             "nothing was changed. Choose another folder")
    return marker


class OwnedDir:
    """A folder claimed by one run of a tool: marker written, lock held until :meth:`release`.

    Use :meth:`claim` (or ``with OwnedDir.claim(...) as owned``). Entries the tool writes are recorded
    (:meth:`record`) so a later run replaces or removes only those (:meth:`owns`, :meth:`remove`).
    """

    def __init__(self, path: Path, tool: str, flag: str, marker: dict, lock_fd: int | None):
        self.path, self.tool, self.flag = path, tool, flag
        self.marker = marker
        self._lock_fd = lock_fd

    @classmethod
    def claim(cls, path: str | os.PathLike, tool: str, flag: str,
              adopt: Callable[[Path], bool] | None = None) -> OwnedDir:
        """Check ownership, create the folder if needed, take its lock and write the marker.

        Raises:
            OwnershipError: the folder holds the user's files, another tool's output, or another run holds
                the lock (nothing is changed in the first two cases).
        """
        check_ownership(path, tool, flag, adopt)  # before creating anything
        folder = Path(path).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(folder, tool, flag)
        try:
            marker = check_ownership(folder, tool, flag, adopt)  # again, now that no other run can write
            if marker is None or marker.get("adopted"):
                marker = {"tool": tool, "version": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "artefacts": sorted((marker or {}).get("artefacts", []))}
            owned = cls(folder, tool, flag, marker, lock_fd)
            owned._remove_leftovers()
            owned._write_marker()
        except BaseException:
            _unlock(lock_fd)
            raise
        return owned

    def __enter__(self) -> OwnedDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Release the lock (the marker stays: the folder remains the tool's)."""
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None

    @property
    def artefacts(self) -> set[str]:
        return set(self.marker.get("artefacts", []))

    def owns(self, name: str) -> bool:
        """Whether ``name`` (an entry of the folder) was written by this tool."""
        return name in self.artefacts

    def record(self, *names: str) -> None:
        """Record entries as written by this tool (before publishing them, so a crash never orphans them)."""
        new = set(names) - self.artefacts
        if new:
            self.marker["artefacts"] = sorted(self.artefacts | new)
            self._write_marker()

    def check_free(self, names: Iterable[str]) -> None:
        """Raise if any of ``names`` exists in the folder and was not written by this tool."""
        clashes = [n for n in names if os.path.lexists(self.path / n) and not self.owns(n)]
        if clashes:
            raise OwnershipError(
                f"{_describe(self.flag, self.path)}: {', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''} "
                f"{'was' if len(clashes) == 1 else 'were'} not written by {self.tool} and would be replaced; "
                "nothing was changed. Move them away or choose another folder"
            )

    def remove(self, name: str) -> None:
        """Delete the entry ``name`` if this tool wrote it (anything else is left alone)."""
        target = self.path / name
        if not self.owns(name) or not os.path.lexists(target):
            return
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh hidden folder inside the owned folder (same file system: its entries publish by rename);
        removed afterwards, whatever happens."""
        stage = Path(tempfile.mkdtemp(dir=self.path, prefix=f"{TMP_PREFIX}staging-"))
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish_from(self, stage: str | os.PathLike, last: Sequence[str] = ()) -> list[str]:
        """Move every entry of ``stage`` into the folder (see :func:`publish_entry`), refusing before moving
        anything if an entry would replace something this tool did not write.

        Entries named in ``last`` (e.g. an index file) are removed first and published last, so their
        presence means every other entry of this run is in place.
        """
        stage = Path(stage)
        names = sorted(p.name for p in stage.iterdir())
        self.check_free(names)
        fsync_tree(stage)
        self.record(*names)
        for name in last:
            if name in names:
                self.remove(name)
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            publish_entry(stage / name, self.path / name)
        fsync_path(self.path)
        return names

    def _remove_leftovers(self) -> None:
        """Staging folders and set-aside entries of a run that was killed: only ever made under this lock,
        so with the lock held nobody else can be using them."""
        for entry in self.path.iterdir():
            if entry.name.startswith(_LEFTOVERS):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _write_marker(self) -> None:
        atomic_write_json(self.path / MARKER, self.marker)


def _version() -> str:
    try:
        from .version import __version__
    except ImportError:  # loaded on its own (a test's helper process)
        return "unknown"
    return __version__


def _lock(folder: Path, tool: str, flag: str) -> int:
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
        os.close(fd)
        raise OwnershipError(f"{_describe(flag, folder)}: {holder} is writing into this folder; wait for it to "
                             "finish or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{tool} (pid {os.getpid()})".encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


__all__ = [
    "LOCK",
    "MARKER",
    "OutputPathError",
    "OwnedDir",
    "OwnershipError",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "check_ownership",
    "fallback_path",
    "fsync_path",
    "fsync_tree",
    "publish_entry",
    "read_marker",
    "save_results",
    "user_entries",
    "validate_output_dir",
    "validate_output_file",
]
