"""What the three command-line tools share: flag parsing helpers, error handling, JSON, progress bars."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from saicl.config_cli import cli_message
from saicl.outputs import atomic_write_json, save_results


class CLIError(ValueError):
    """Bad user input (flags, files): printed as one clear line, exit code 2."""


def comma_ints(text: str, flag: str, minimum: int | None = None) -> list[int]:
    """``"4,16,64"`` -> ``[4, 16, 64]``; a CLIError naming ``flag`` otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{flag} needs at least one value")
    if minimum is not None and min(values) < minimum:
        raise CLIError(f"{flag} values must be >= {minimum}, got {text!r}")
    return values


def comma_names(text: str, flag: str, choices: list[str] | None = None) -> list[str]:
    """``"saicl,full"`` -> ``["saicl", "full"]``, checked against ``choices`` if given."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise CLIError(f"{flag} needs at least one value")
    if choices is not None:
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise CLIError(f"{flag}: unknown {unknown}; expected some of {choices}")
    return values


def jsonable(value):
    """Replace NaN/inf by ``None`` (strict JSON) and tuples/paths by lists/strings, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as strict, indented JSON (parents created), atomically: a reader or a crash sees the old
    file or the complete new one, never a partial one."""
    return atomic_write_json(path, jsonable(data))


def save_json(path: str | os.PathLike, data, flag: str, prog: str, beside: Sequence[str | os.PathLike] = ()) -> bool:
    """:func:`write_json` for a tool's results: if ``path`` cannot be written at the end of a run, the results
    go beside the run (``beside``, the current folder or the temporary folder) with one line on stderr.

    Returns:
        whether the results are at ``path`` (the caller then exits with 1 if not).
    """
    text = json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n"
    return save_results(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), flag, prog, beside)[1]


def progress_bar(total: int, description: str, enabled: bool = True):
    """A tqdm bar on stderr (a no-op bar when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def run_cli(run: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """Run a tool's body: bad input -> one ``prog: error: ...`` line and exit code 2; crash -> exit 1."""
    from saicl.attention.base import BackendUnavailableError

    from .distributed import RankFailedError

    try:
        return run(argv)
    except SystemExit as exit_:  # argparse: --help (0) and bad flags (2) have printed their message
        return exit_.code if isinstance(exit_.code, int) else 2
    except RankFailedError as err:  # distributed run: another rank failed (it printed its own error)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except (CLIError, FileNotFoundError, BackendUnavailableError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # data errors (saicl.meta_train.data.DataError) and bad settings (ConfigError)
        print(f"{prog}: error: {cli_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the user: a disk that filled up, a folder that went away
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


__all__ = ["CLIError", "check_device", "comma_ints", "comma_names", "jsonable", "progress_bar", "run_cli", "save_json",
           "write_json"]


def check_device(flag_value: str) -> str:
    """Validate a ``--device`` flag: a device torch knows and can use here (CLIError naming the flag)."""
    import torch

    try:
        device = torch.device(flag_value)
    except RuntimeError as err:
        raise CLIError(f"--device {flag_value!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {flag_value}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {flag_value}: only cpu and cuda devices are supported")
    return flag_value
