"""Task data in the MetaICL-compatible format of docs/design.md: loading, validation, demonstrations, episodes.

Two layouts load into the same ``{task name: TaskData}`` mapping:

- a single ``.jsonl`` file, one ``{"task", "input", "output", "options"}`` object per line; each task's
  examples are split deterministically (independent of the demonstration seed) into a demonstration
  pool (``train``) and queries (``test``);
- a MetaICL folder ``{task}/{task}_{k}_{seed}_{train|dev|test}.jsonl`` with a split config, a JSON
  file ``{"train": [task, ...], "test": [task, ...]}`` (a path, the name of a config shipped in
  ``saicl/meta_train/configs/``, or ``splits.json`` inside the folder when no config is given).

Local files are read by a strict line reader so that every bad line is reported by file and line (the
JSON loader of ``datasets`` reports neither); the parsed rows become a ``datasets.Dataset`` per task
file, and a name that is neither a file nor a folder is loaded from the Hugging Face Hub with
``datasets.load_dataset`` (needs the network).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
SPLIT_FILE = "splits.json"  # split config looked up inside a MetaICL folder when `config` is None
SPLITS = ("train", "test")
_FILE_RE = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<part>train|dev|test)\.jsonl$")


class DataError(ValueError):
    """Bad task data: the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Example:
    """One labelled example; ``options`` is empty for generation tasks."""

    input: str
    output: str
    options: tuple[str, ...] = ()
    task: str = ""


@dataclass
class TaskData:
    """One task: a pool of demonstrations (``train``) and queries (``test``, may be empty)."""

    name: str
    train: list[Example]
    test: list[Example] = field(default_factory=list)

    @property
    def is_classification(self) -> bool:
        """Every example has options and every output is among them."""
        examples = self.train + self.test
        return bool(examples) and all(ex.options and ex.output in ex.options for ex in examples)

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


# ---------------------------------------------------------------------------------------------------
# Reading and validating rows


def parse_row(row: object, where: str, task: str | None = None) -> Example:
    """Validate one decoded row (``where`` names it in errors); ``task`` fills a missing task field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name = row.get("task", task)
    if task is not None and name != task:
        raise DataError(f"{where}: field 'task' is {name!r} but the file belongs to task {task!r}")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: missing or empty field 'task' (a non-empty string)")
    for key in ("input", "output"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    if not row["input"].strip():
        raise DataError(f"{where}: field 'input' is empty")
    # Only a missing field or null means "no options" (a generation task): "" or any other non-list is
    # a mistake, not a silent switch to generation.
    options = row.get("options")
    if options is None:
        options = []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(
            f"{where}: field 'options' must be a list of strings (or [] / absent for a generation task), "
            f"got {options!r}"
        )
    if options and row["output"] not in options:
        raise DataError(f"{where}: output {row['output']!r} is not among the options {options!r}")
    if not options and not row["output"].strip():
        raise DataError(f"{where}: field 'output' is empty")
    return Example(input=row["input"], output=row["output"], options=tuple(options), task=name)


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = "\ufeff"


def _encoding_hint(path: Path, first_bytes: bytes) -> str:
    """Why a file may not decode as UTF-8, for the error message ('' when there is no clue)."""
    if first_bytes.startswith(_UTF16_BOMS):
        return f"; {path.name} starts with a UTF-16 byte-order mark: save it as UTF-8"
    if b"\x00" in first_bytes:
        return "; is the file UTF-16? save it as UTF-8"
    return "; save the file as UTF-8"


def decode_line(raw: bytes, path: Path, number: int, first_bytes: bytes) -> str:
    """One line of a text file as UTF-8 (a UTF-8 byte-order mark on line 1 is accepted and dropped).

    Raises:
        DataError naming the file, the line and the offending byte, with a hint (UTF-16, NUL bytes).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            + _encoding_hint(path, first_bytes)
        ) from None
    if number == 1 and text.startswith(_UTF8_BOM):
        text = text[1:]
    if "\x00" in text:
        raise DataError(f"{path}, line {number}: holds NUL bytes" + _encoding_hint(path, first_bytes))
    return text


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (BOM accepted); decoding errors name the file and line (see :func:`decode_line`)."""
    data = path.read_bytes()
    return "\n".join(decode_line(raw, path, n, data[:64]) for n, raw in enumerate(data.split(b"\n"), start=1))


def iter_jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a ``.jsonl`` file; errors name file and line.

    The file must be UTF-8 (a leading byte-order mark is accepted); any other encoding is reported by line.
    """
    with path.open("rb") as handle:
        first_bytes = handle.read(64)
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            line = decode_line(raw, path, number, first_bytes)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object")
            yield number, row


def read_jsonl(path: str | os.PathLike, task: str | None = None) -> list[Example]:
    """All examples of a ``.jsonl`` file, validated; errors name the file and line (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = [parse_row(row, f"{path}, line {number}", task) for number, row in iter_jsonl_rows(path)]
    if not examples:
        raise DataError(f"{path}: the file holds no examples")
    return examples


def to_dataset(examples: Sequence[Example]):
    """The examples as a ``datasets.Dataset`` with the columns of docs/design.md (for ``datasets`` pipelines)."""
    import datasets

    return datasets.Dataset.from_list(
        [{"task": e.task, "input": e.input, "output": e.output, "options": list(e.options)} for e in examples]
    )


def _from_dataset(rows: Iterable[dict], where: str) -> list[Example]:
    return [parse_row(dict(row), f"{where}, row {i}") for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------
# Split configs


def resolve_config(config: str | os.PathLike | None, folder: Path | None = None) -> Path | None:
    """The split config's path: a file, a shipped config's name, or ``splits.json`` in ``folder``."""
    if config is None:
        if folder is not None and (folder / SPLIT_FILE).is_file():
            return folder / SPLIT_FILE
        return None
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{config}.json", CONFIG_DIR / str(config)):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
    raise DataError(f"split config {str(config)!r} is neither a file nor a shipped config (shipped: {shipped})")


def read_split_config(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}`` from a JSON split config, validated (test tasks held out)."""
    path = Path(path)
    try:
        config = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: split config is not valid JSON ({err.msg})") from err
    if not isinstance(config, dict) or not any(s in config for s in SPLITS):
        raise DataError(f"{path}: a split config is a JSON object with 'train' and/or 'test' task lists")
    result = {}
    for split in SPLITS:
        names = config.get(split, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"{path}: {split!r} must be a list of task names")
        if len(set(names)) != len(names):
            raise DataError(f"{path}: {split!r} lists a task twice")
        result[split] = names
    overlap = sorted(set(result["train"]) & set(result["test"]))
    if overlap:
        raise DataError(f"{path}: tasks {overlap} are in both 'train' and 'test'; test tasks must be held out")
    return result


# ---------------------------------------------------------------------------------------------------
# The two layouts


def split_examples(name: str, examples: Sequence[Example], k: int = 0) -> TaskData:
    """Deterministic split of one task of a single file: a fixed half are queries, the rest the pool.

    The split depends on the task's name and examples only, never on ``k`` or the demonstration seed,
    so every ``k`` and every seed is evaluated on the same queries (as in MetaICL) and a scaling curve
    compares the same questions. A ``k`` larger than the pool is reported by the caller (evaluation skips
    the task for that ``k``; meta-training draws from the pool and queries together).
    """
    if len(examples) < k + 1:
        raise DataError(f"task {name!r} has {len(examples)} examples; k={k} needs at least k+1 = {k + 1}")
    order = list(examples)
    random.Random(f"split:{name}").shuffle(order)
    n_test = max(1, len(order) // 2)
    return TaskData(name=name, train=order[: len(order) - n_test], test=order[len(order) - n_test:])


def _load_single_file(path: Path, names: list[str] | None, k: int) -> dict[str, TaskData]:
    grouped: dict[str, list[Example]] = {}
    for example in read_jsonl(path):
        grouped.setdefault(example.task, []).append(example)
    if names is not None:
        missing = [n for n in names if n not in grouped]
        if missing:
            raise DataError(f"{path}: the split config lists tasks with no examples in the file: {missing}")
        grouped = {n: grouped[n] for n in names}
    return {name: split_examples(name, grouped[name], k) for name in sorted(grouped)}


def _task_files(folder: Path, task: str, part: str) -> dict[tuple[int, int], Path]:
    files = {}
    for file in folder.glob(f"{task}_*_{part}.jsonl"):
        match = _FILE_RE.match(file.name)
        if match and match["task"] == task:
            files[(int(match["k"]), int(match["seed"]))] = file
    return files


def _pick_file(files: dict[tuple[int, int], Path], k: int, seed: int) -> Path | None:
    """The exact ``(k, seed)`` file, else the largest pool of that seed, else the largest pool of any seed."""
    if (k, seed) in files:
        return files[(k, seed)]
    same_seed = [key for key in files if key[1] == seed]
    if same_seed:
        return files[max(same_seed)]
    return files[max(files)] if files else None


def _load_folder_task(root: Path, task: str, k: int, seed: int, need_test: bool) -> TaskData:
    folder = root / task
    if not folder.is_dir():
        raise DataError(f"{root}: task {task!r} is listed but the folder {folder} does not exist")
    train_file = _pick_file(_task_files(folder, task, "train"), k, seed)
    if train_file is None:
        raise DataError(f"{folder}: no {task}_{{k}}_{{seed}}_train.jsonl file for task {task!r}")
    train = read_jsonl(train_file, task)
    if len(train) < k:
        raise DataError(f"{train_file}: task {task!r} has {len(train)} training examples, fewer than k={k}")
    test_file = _pick_file(_task_files(folder, task, "test"), k, seed) or _pick_file(
        _task_files(folder, task, "dev"), k, seed
    )
    if test_file is None:
        if need_test:
            raise DataError(f"{folder}: no {task}_{{k}}_{{seed}}_test.jsonl (or _dev) file for test task {task!r}")
        test = []
    else:
        test = read_jsonl(test_file, task)
    if not need_test and len(train) + len(test) < k + 1:
        raise DataError(f"{folder}: task {task!r} has {len(train) + len(test)} examples; k={k} needs k+1")
    return TaskData(name=task, train=train, test=test)


def _load_folder(root: Path, names: list[str] | None, split: str, k: int, seed: int) -> dict[str, TaskData]:
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no task folders ({{task}}/{{task}}_{{k}}_{{seed}}_train.jsonl) found")
    return {name: _load_folder_task(root, name, k, seed, need_test=split == "test") for name in names}


def _load_hub(name: str, names: list[str] | None, k: int) -> dict[str, TaskData]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # the Hub raises many types (connection, not found, ...)
        raise DataError(f"{name!r} is not a local file or folder, and loading it from the Hub failed: {err}") from err
    grouped: dict[str, list[Example]] = {}
    for example in _from_dataset(dataset, f"hub dataset {name}"):
        grouped.setdefault(example.task, []).append(example)
    if names is not None:
        grouped = {n: grouped[n] for n in names if n in grouped}
    return {task: split_examples(task, grouped[task], k) for task in sorted(grouped)}


def load_tasks(
    path: str | os.PathLike,
    split: str = "test",
    config: str | os.PathLike | None = None,
    k: int = 16,
    seed: int = 100,
) -> dict[str, TaskData]:
    """Load tasks (format: docs/design.md), keyed by task name in sorted order.

    Args:
        path: a single ``.jsonl`` file (tasks grouped by ``"task"``; each task split deterministically
            into a demonstration pool and queries), a MetaICL folder
            (``{task}/{task}_{k}_{seed}_{train|dev|test}.jsonl``), or a Hub dataset name.
        split: ``"train"`` (meta-training tasks) or ``"test"`` (held-out tasks) of the split config.
        config: split config (JSON ``{"train": [...], "test": [...]}``): a path or the name of a shipped
            config; defaults to ``splits.json`` inside the folder. Without any config every task is loaded.
        k: demonstrations per episode: picks ``{task}_{k}_{seed}_*.jsonl`` in a folder (else the largest
            pool available, from which :func:`sample_demonstrations` draws) and checks every task has enough.
        seed: MetaICL seed of the files to pick in a folder.
    Raises:
        DataError (a ValueError) naming the file and line of bad input.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {list(SPLITS)}")
    if not isinstance(k, int) or k < 0:
        raise DataError(f"k={k!r}: expected an integer >= 0")
    path = Path(path)
    folder = path if path.is_dir() else None
    config_path = resolve_config(config, folder)
    names = read_split_config(config_path)[split] if config_path is not None else None
    if names is not None and not names:
        raise DataError(f"{config_path}: the {split!r} split lists no tasks")
    if path.is_dir():
        tasks = _load_folder(path, names, split, k, seed)
    elif path.is_file():
        tasks = _load_single_file(path, names, k)
    elif path.suffix == ".jsonl" or path.is_absolute() or str(path).startswith("."):
        raise DataError(f"{path}: no such file or folder")
    else:
        tasks = _load_hub(str(path), names, k)
    if not tasks:
        raise DataError(f"{path}: no tasks found for split {split!r}")
    return tasks


# ---------------------------------------------------------------------------------------------------
# Demonstrations and episodes


def sample_demonstrations(task: TaskData, k: int, seed: int) -> list[Example]:
    """``k`` demonstrations drawn from ``task.train`` with ``random.Random(seed)`` (one draw per seed).

    A pool of exactly ``k`` examples (a MetaICL ``{task}_{k}_{seed}_train.jsonl`` file) is already the
    seed's draw and is returned in file order; then every seed of a single pool gets the same
    demonstrations (:func:`saicl.eval.evaluate.evaluate_model` reports that).
    """
    if k < 0:
        raise ValueError(f"k={k}: expected k >= 0")
    if k > len(task.train):
        raise ValueError(
            f"task {task.name!r} has {len(task.train)} demonstration candidates (its queries are held apart), "
            f"fewer than k={k}"
        )
    if k == len(task.train):
        return list(task.train)
    return random.Random(seed).sample(task.train, k)


def make_episode(demonstrations: Sequence[Example], query: Example) -> dict:
    """The processor's episode dict (docs/design.md) plus the query's ``options`` and gold ``output``."""
    return {
        "demonstrations": [(d.input, d.output) for d in demonstrations],
        "query": query.input,
        "options": list(query.options),
        "output": query.output,
    }


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """Write examples as JSON lines of the design's format (parents created); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for e in examples:
            row = {"task": e.task, "input": e.input, "output": e.output, "options": list(e.options)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_split_config(path: str | os.PathLike, train: Sequence[str], test: Sequence[str]) -> Path:
    """Write a split config ``{"train": [...], "test": [...]}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": list(train), "test": list(test)}, indent=1) + "\n", encoding="utf-8")
    return path


__all__ = [
    "DataError",
    "Example",
    "TaskData",
    "load_tasks",
    "make_episode",
    "read_jsonl",
    "read_split_config",
    "sample_demonstrations",
    "to_dataset",
    "write_jsonl",
    "write_split_config",
]
