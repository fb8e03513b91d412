"""Synthetic in-context-learning task families, generated deterministically from a seed.

Every family makes *tasks* whose answers can only be inferred from the demonstrations: the mapping
from inputs to outputs is drawn afresh per task, so nothing memorised across tasks answers a query.

- ``lookup`` (associative recall): a task maps a few keys (two-symbol strings) to label tokens; the
  query is one of the keys, and its label is the label of the demonstration with the same key.
- ``mapping`` (random label mapping): the class of an input is a fixed feature (which of a few
  symbol groups its symbols come from), but the label word of each class is drawn per task.
- ``position`` (hidden rule over symbols): the output is the symbol at a task-specific position of the
  input; the options are the input's symbols.

Two consumers: :func:`sample_episode` draws fresh tasks for every training episode (an endless
stream), and :func:`write_synthetic_collection` writes a fixed collection in the MetaICL folder layout
(docs/design.md §6) with ``splits.json`` listing train tasks and held-out test tasks, for :func:`load_tasks`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import Example, write_jsonl, write_split_config

# Input symbols and label tokens are single characters, so a byte-level tokenizer (ByT5) sees one
# token per symbol, and label tokens never occur in inputs.
SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123"  # 30 input symbols
LABELS = "ABCDEFGH"  # 8 label tokens


@dataclass(frozen=True)
class SyntheticTask:
    """One task instance: ``draw(rng)`` returns an example; ``answerable(demos, query)`` says whether
    the demonstrations determine the query's answer."""

    name: str
    family: str
    draw: Callable[[random.Random], Example]
    answerable: Callable[[Sequence[Example], Example], bool]
    pool: tuple[Example, ...] = ()  # for families with a finite set of distinct examples


def _keys(rng: random.Random, n: int, length: int = 2) -> list[str]:
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(SYMBOLS) for _ in range(length)))
    return sorted(keys)


def lookup_task(rng: random.Random, name: str = "lookup", n_keys: int = 4, n_labels: int = 4,
                distinct_labels: bool = True) -> SyntheticTask:
    """Associative recall: ``n_keys`` keys, each mapped to one of ``n_labels`` labels drawn for the task.

    With ``distinct_labels`` (needs ``n_keys <= n_labels``) keys get different labels, so guessing among
    the labels seen in the demonstrations is exactly chance when all keys are shown.
    """
    labels = rng.sample(LABELS, n_labels)
    keys = _keys(rng, n_keys)
    if distinct_labels and n_keys <= n_labels:
        assigned = rng.sample(labels, n_keys)
    else:
        assigned = [rng.choice(labels) for _ in keys]
    options = tuple(sorted(labels))
    pool = tuple(Example(key, label, options, name) for key, label in zip(keys, assigned))
    return SyntheticTask(
        name=name, family="lookup", pool=pool,
        draw=lambda r: r.choice(pool),
        answerable=lambda demos, query: any(d.input == query.input for d in demos),
    )


def mapping_task(rng: random.Random, name: str = "mapping", n_classes: int = 2, length: int = 3) -> SyntheticTask:
    """Random label mapping: class = which symbol group (fixed for all tasks) the input is drawn from."""
    groups = [SYMBOLS[i::n_classes] for i in range(n_classes)]  # a fixed, learnable feature
    labels = rng.sample(LABELS, n_classes)  # ... but the label words are drawn per task
    options = tuple(sorted(labels))

    def draw(r: random.Random) -> Example:
        c = r.randrange(n_classes)
        return Example("".join(r.choice(groups[c]) for _ in range(length)), labels[c], options, name)

    return SyntheticTask(
        name=name, family="mapping", draw=draw,
        answerable=lambda demos, query: any(d.output == query.output for d in demos),
    )


def position_task(rng: random.Random, name: str = "position", length: int = 3) -> SyntheticTask:
    """Hidden rule: output the symbol at a task-specific position; the options are the input's symbols."""
    where = rng.randrange(length)

    def draw(r: random.Random) -> Example:
        symbols = r.sample(SYMBOLS, length)  # distinct, so the position is identifiable
        return Example(" ".join(symbols), symbols[where], tuple(sorted(symbols)), name)

    return SyntheticTask(name=name, family="position", draw=draw, answerable=lambda demos, query: len(demos) > 0)


FAMILIES: dict[str, Callable[..., SyntheticTask]] = {
    "lookup": lookup_task,
    "mapping": mapping_task,
    "position": position_task,
}


def get_family(name: str) -> Callable[..., SyntheticTask]:
    if name not in FAMILIES:
        raise ValueError(f"unknown synthetic task family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def sample_episode(rng: random.Random, family: str, k: int, answerable: bool = True,
                   **family_kwargs) -> tuple[list[Example], Example]:
    """A fresh task of ``family``, ``k`` demonstrations and a query (answerable from them if asked).

    For ``lookup`` the task has ``k`` keys by default (every key is shown once), so the query's key is
    always among the demonstrations.
    """
    if family == "lookup":
        family_kwargs.setdefault("n_keys", max(k, 1))
        family_kwargs.setdefault("distinct_labels", False)
    task = get_family(family)(rng, **family_kwargs)
    if family == "lookup" and len(task.pool) == k:
        demos = list(task.pool)
        rng.shuffle(demos)
    else:
        demos = [task.draw(rng) for _ in range(k)]
    for _ in range(100):
        query = task.draw(rng)
        if not answerable or task.answerable(demos, query):
            return demos, query
    return demos, rng.choice(demos) if demos else query  # a shown example is always answerable


def write_synthetic_collection(
    out_dir: str | Path,
    seed: int = 0,
    families: Sequence[str] = ("lookup", "mapping", "position"),
    n_train_tasks: int = 8,
    n_test_tasks: int = 4,
    n_examples: int = 64,
    n_queries: int = 32,
    lookup_keys: int = 4,
) -> Path:
    """Write a synthetic task collection in the MetaICL folder layout and return its folder.

    Layout: ``{out_dir}/{task}/{task}_{n}_100_train.jsonl`` (the demonstration pool) and
    ``..._test.jsonl`` (queries) per task, and ``{out_dir}/splits.json`` listing ``n_train_tasks`` train
    and ``n_test_tasks`` held-out test tasks per family. Pass the returned folder to
    ``load_tasks(folder, split="test", k=...)``: no ``config`` argument is needed (``splits.json`` is
    found in the folder); any ``seed`` works (the pool is shared and :func:`sample_demonstrations`
    draws per seed).

    ``lookup`` tasks have ``lookup_keys`` keys with distinct labels and a pool of exactly those keys, so
    with ``k = lookup_keys`` every query's key is shown once and guessing among the shown labels is
    chance (``1 / lookup_keys``). Deterministic in ``seed``; takes well under a second.
    """
    out_dir = Path(out_dir)
    rng = random.Random(f"synthetic-collection:{seed}")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for family in families:
        maker = get_family(family)
        for split, count in (("train", n_train_tasks), ("test", n_test_tasks)):
            for i in range(count):
                name = f"{family}_{split}_{i:02d}"
                kwargs = {"n_keys": lookup_keys} if family == "lookup" else {}
                task = maker(rng, name=name, **kwargs)
                if task.pool:
                    train = list(task.pool)
                    test = [task.draw(rng) for _ in range(n_queries)]
                else:
                    train = [task.draw(rng) for _ in range(n_examples)]
                    test = [task.draw(rng) for _ in range(n_queries)]
                folder = out_dir / name
                write_jsonl(folder / f"{name}_{len(train)}_100_train.jsonl", train)
                write_jsonl(folder / f"{name}_{len(train)}_100_test.jsonl", test)
                splits[split].append(name)
    write_split_config(out_dir / "splits.json", splits["train"], splits["test"])
    return out_dir


__all__ = [
    "FAMILIES",
    "LABELS",
    "SYMBOLS",
    "SyntheticTask",
    "get_family",
    "lookup_task",
    "mapping_task",
    "position_task",
    "sample_episode",
    "write_synthetic_collection",
]
