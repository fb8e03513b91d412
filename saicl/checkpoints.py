"""One checkpoint loader for every entry point: validate a ``save_pretrained`` folder, then load it.

Library errors about a damaged checkpoint (a truncated ``model.safetensors``, a missing ``config.json``)
name neither the file nor the problem. Everything here checks the folder first and raises
:class:`CheckpointError` (a ``ValueError``) whose message names the file and what is wrong with it;
``saicl-eval --checkpoint``, ``saicl-train --model`` and ``saicl-train --resume`` all go through it.

The checks are cheap (file headers and sizes, no tensor data is read): a ``.safetensors`` file must hold
a valid header whose tensors cover the file exactly, so a truncated, zero-filled or empty file is caught.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A safetensors header is JSON of at most 100 MB (the format's own limit).
_MAX_HEADER = 100_000_000
# Fields that decide the shapes of the weights: a checkpoint resumed into a model that differs in any of
# them cannot load.
ARCHITECTURE_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "feed_forward_proj", "tie_word_embeddings",
)


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, damaged or does not fit: the message names it."""


def _where(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file if it is unreadable or not an object."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text (damaged file?)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}, line {err.lineno}: the {what} is not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def check_safetensors(path: Path) -> None:
    """Check a ``.safetensors`` file's header and that its tensors cover the file exactly (no data read).

    Raises:
        CheckpointError naming the file: empty, truncated, zero-filled or otherwise not safetensors.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if size == 0:
                raise CheckpointError(f"{path}: the weights file is empty (0 bytes); the save was interrupted?")
            if len(head) < 8:
                raise CheckpointError(f"{path}: the weights file is truncated ({size} bytes, no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len == 0 or header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {header_len} in a {size}-byte file): "
                    "the file is truncated or overwritten"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the weights file ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: the file is damaged") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object: the file is damaged")
    ends = [entry.get("data_offsets", [0, 0])[1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)]
    expected = size - 8 - header_len
    if max(ends, default=0) != expected:
        raise CheckpointError(
            f"{path}: the tensors need {max(ends, default=0)} bytes of data but the file holds {expected}: "
            "the file is truncated or damaged"
        )


def check_torch_file(path: Path) -> None:
    """Check a ``torch.save`` file (a zip archive since torch 1.6) is complete (its directory is readable)."""
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty (0 bytes); the save was interrupted?")
        ok = zipfile.is_zipfile(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if not ok:
        raise CheckpointError(f"{path}: not a complete torch.save archive: the file is truncated or damaged")


def _shards(index_file: Path) -> list[Path]:
    index = read_json_file(index_file, "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: the weights index has no 'weight_map'")
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def weight_files(folder: Path) -> list[Path]:
    """The weight files a ``save_pretrained`` folder holds (single file or the shards of an index)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            return _shards(folder / index)
    return []


def check_checkpoint(path: str | os.PathLike, flag: str | None = None, require_weights: bool = True) -> Path:
    """Validate a ``save_pretrained`` folder before loading it; returns it as a ``Path``.

    Checks: the folder exists, holds a ``config.json`` that parses as a JSON object, and weights
    (``model.safetensors``, a sharded index with every shard, or ``pytorch_model.bin``) that are complete.

    Args:
        path: the folder.
        flag: the command-line flag that named it (``"--checkpoint"``), used in messages.
        require_weights: a folder without weights is an error (weights that are present are always checked).
    Raises:
        CheckpointError naming the flag, the file and what is wrong.
    """
    folder = Path(path)
    where = _where(folder, flag)
    if not folder.exists():
        raise CheckpointError(f"{where}: no such folder (expected a save_pretrained checkpoint)")
    if not folder.is_dir():
        raise CheckpointError(f"{where}: is a file; expected a save_pretrained checkpoint folder")
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{where}: no config.json inside (expected a save_pretrained checkpoint folder)")
    read_json_file(folder / CONFIG, "model config")
    files = weight_files(folder)
    if not files and require_weights:
        raise CheckpointError(
            f"{where}: no weights inside (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})"
        )
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in the index is missing")
        if file.suffix == ".safetensors":
            check_safetensors(file)
        else:
            check_torch_file(file)
    return folder


def check_trainer_checkpoint(path: str | os.PathLike, flag: str | None = None) -> Path:
    """:func:`check_checkpoint` plus the ``Trainer`` state a resume needs (trainer state, optimizer, RNG)."""
    # FSDP (sharded state dict) and DeepSpeed keep the weights in their own sub-folders, which the
    # engine checks when it loads them; there, a top-level weights file is optional.
    engine = any(Path(path).glob("pytorch_model_fsdp*")) or any(Path(path).glob("global_step*"))
    folder = check_checkpoint(path, flag, require_weights=not engine)
    if not (folder / TRAINER_STATE).is_file():
        raise CheckpointError(f"{_where(folder, flag)}: no {TRAINER_STATE} inside (not a training checkpoint)")
    read_json_file(folder / TRAINER_STATE, "trainer state")
    for file in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.bin")):
        if file.name != TORCH_BIN:
            check_torch_file(file)
    return folder


def checkpoint_number(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match[1]) if match else None


def trainer_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, newest (largest ``N``) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_number(p) is not None]
    return sorted(found, key=checkpoint_number, reverse=True)


def newest_intact_checkpoint(candidates: Iterable[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first candidate that passes :func:`check_trainer_checkpoint`, and the ones skipped (with why)."""
    skipped = []
    for candidate in candidates:
        try:
            return check_trainer_checkpoint(candidate), skipped
        except CheckpointError as err:
            skipped.append((candidate, str(err)))
    return None, skipped


def resume_checkpoint(output_dir: str | os.PathLike, resume: str) -> Path:
    """The checkpoint ``--resume`` means, checked: ``"latest"`` or a ``checkpoint-N`` folder.

    With ``"latest"``, a damaged newest checkpoint (an interrupted copy, a truncated file) is skipped with a
    warning naming it, and the newest intact one is used. A damaged folder named explicitly is refused,
    naming the newest intact one to pass instead.

    Raises:
        CheckpointError naming the folder or file and what to do.
    """
    if resume == "latest":
        candidates = trainer_checkpoints(output_dir)
        if not candidates:
            raise CheckpointError(f"--resume latest: no checkpoint-N folder in {output_dir}")
        found, skipped = newest_intact_checkpoint(candidates)
        if found is None:
            raise CheckpointError(
                f"--resume latest: every checkpoint in {output_dir} is damaged (newest: {skipped[0][1]}); "
                "start a new --output-dir"
            )
        for path, reason in skipped:
            if int(os.environ.get("RANK", "0")) == 0:
                logger.warning("--resume latest: skipping %s, it is damaged (%s); resuming from %s",
                               path.name, reason, found.name)
        return found
    try:
        return check_trainer_checkpoint(resume, "--resume")
    except CheckpointError as err:
        path = Path(resume)
        others = [p for p in trainer_checkpoints(path.parent) if p.resolve() != path.resolve()]
        intact, _ = newest_intact_checkpoint(others)
        hint = f"; the newest intact checkpoint beside it is {intact} (pass --resume {intact})" if intact else ""
        raise CheckpointError(f"{err}{hint}") from None


def checkpoint_config(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint folder."""
    return read_json_file(Path(path) / CONFIG, "model config")


def architecture(config: dict) -> dict:
    """The shape-deciding fields of a model config dict (missing ones omitted)."""
    return {key: config[key] for key in ARCHITECTURE_FIELDS if key in config}


def check_resume_compatible(
    checkpoint: str | os.PathLike, structure: str, model: str, model_config: dict | None
) -> None:
    """Refuse to resume ``checkpoint`` into another structure or another architecture.

    Args:
        checkpoint: the ``checkpoint-N`` folder.
        structure: the run's ``--structure``.
        model: the run's ``--model`` (for the message).
        model_config: the config dict ``--model`` builds (``None``: unknown, the architecture is not checked).
    Raises:
        CheckpointError naming both values.
    """
    saved = checkpoint_config(checkpoint)
    trained = saved.get("structure")
    if trained is not None and trained != structure:
        raise CheckpointError(
            f"--resume {checkpoint}: the checkpoint was trained with --structure {trained}, not --structure "
            f"{structure}; resume with --structure {trained} or start a new --output-dir"
        )
    if model_config is None:
        return
    have, want = architecture(saved), architecture(model_config)
    differ = {key: (have[key], want[key]) for key in have.keys() & want.keys() if have[key] != want[key]}
    if differ:
        details = ", ".join(f"{key} {a} vs {b}" for key, (a, b) in sorted(differ.items()))
        raise CheckpointError(
            f"--resume {checkpoint}: the checkpoint's model differs from --model {model} ({details}); "
            "resume with the --model it was trained with or start a new --output-dir"
        )


def load_model(path: str | os.PathLike, flag: str | None = None, **kwargs):
    """Validate a checkpoint folder, then ``SAICLForConditionalGeneration.from_pretrained(path, **kwargs)``.

    ``kwargs`` may override ``structure`` / ``attn_backend`` (also when ``config.json`` names an unknown one).

    Raises:
        CheckpointError naming the flag, the folder or file, and the problem (never a bare library error).
    """
    from safetensors import SafetensorError

    from .modeling_saicl import SAICLForConditionalGeneration

    folder = check_checkpoint(path, flag)
    where = _where(folder, flag)
    try:
        return SAICLForConditionalGeneration.from_pretrained(folder, **kwargs)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where}: cannot load this checkpoint ({first})") from err


__all__ = [
    "ARCHITECTURE_FIELDS",
    "CheckpointError",
    "check_checkpoint",
    "check_resume_compatible",
    "check_safetensors",
    "check_trainer_checkpoint",
    "checkpoint_config",
    "load_model",
    "newest_intact_checkpoint",
    "resume_checkpoint",
    "trainer_checkpoints",
]
