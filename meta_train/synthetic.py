"""Synthetic in-context-learning task families, generated deterministically from a seed.

Every family makes *tasks* whose answers can only be inferred from the demonstrations: the mapping
from inputs to outputs is drawn afresh per task, so nothing memorised across tasks answers a query.

- ``lookup`` (associative recall): a task maps a few keys (two-symbol strings) to label tokens; the
  query is one of the keys, and its label is the label of the demonstration with the same key.
- ``mapping`` (random label mapping): the class of an input is a fixed feature (which of a few
  symbol groups its symbols come from), but the label word of each class is drawn per task.
- ``position`` (hidden rule over symbols): the output is the symbol at a task-specific position of the
  input; the options are the input's symbols.
- ``noisy`` (noisy label mapping): as ``mapping`` (a fixed class feature, label words drawn per task), but
  each demonstration's label is replaced by a different label of the task with probability ``flip``, while
  the query's gold is the true label. One demonstration is unreliable; the plurality of many is not, so
  accuracy rises with the number of demonstrations of the query's class, and the evidence of several
  demonstrations must be combined (docs/meta_training.md). ``noisy-keys``: the same with one input (key) per
  class per task, so finding the query's demonstrations is exact matching; ``noisy-keys-open``: its queries
  are drawn independently of the demonstrations (a ``k = 1`` warm-up that teaches comparing them).

Two consumers: :func:`sample_episode` draws fresh tasks for every training episode (an endless
stream), and :func:`write_synthetic_collection` writes a fixed collection in the MetaICL folder layout
(docs/design.md §6) with ``splits.json`` listing train tasks and held-out test tasks, for :func:`load_tasks`.
"""

from __future__ import annotations

import functools
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
    # queries, where they differ from demonstrations (``noisy``: the true label, never a flipped one)
    draw_query: Callable[[random.Random], Example] | None = None
    # a demonstration that makes ``answerable(demos + [it], query)`` true (``noisy``: a correctly
    # labelled demonstration of the query's class), for families that guarantee answerability by construction
    witness: Callable[[random.Random, Example], Example] | None = None
    # queries drawn independently of the demonstrations, answerable or not (``noisy-keys-open``)
    open_queries: bool = False

    def query(self, rng: random.Random) -> Example:
        return (self.draw_query or self.draw)(rng)


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
    groups = class_groups(n_classes)  # a fixed, learnable feature
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


def class_groups(n_classes: int) -> list[str]:
    """The fixed class feature of ``mapping`` and ``noisy``: class ``c`` draws its symbols from ``SYMBOLS[c::n]``."""
    return [SYMBOLS[i::n_classes] for i in range(n_classes)]


def noisy_class(text: str, n_classes: int) -> int:
    """The class of a ``noisy`` input (every symbol of it lies in the same group)."""
    return SYMBOLS.index(text[0]) % n_classes


NOISY_FLIP = 0.3  # default flip rate of ``noisy`` demonstration labels
NOISY_POOL = 2048  # demonstration pool of a written ``noisy`` task: k up to 1024 leaves room for seeds to differ


def noisy_task(rng: random.Random, name: str = "noisy", n_classes: int = 4, flip: float = NOISY_FLIP,
               length: int = 2, keyed: bool = False, open_queries: bool = False) -> SyntheticTask:
    """Noisy label mapping: ``mapping`` whose demonstration labels are each flipped with probability ``flip``.

    A task draws ``n_classes`` distinct label tokens (class ``c`` -> ``labels[c]``); an input is ``length``
    symbols of one fixed class group (:func:`class_groups`, the same for every task). A demonstration keeps
    its class's label with probability ``1 - flip`` and otherwise carries one of the other ``n_classes - 1``
    labels, uniformly; a query (``draw_query``) always carries the true label. ``flip < (n - 1) / n`` keeps the
    true label the most frequent one of each class, so a plurality vote over the demonstrations of the query's
    class converges to the gold label as their number grows. ``answerable``: some demonstration of the query's
    class carries the true label (:func:`sample_episode` guarantees it with ``witness``).

    ``keyed`` (family ``noisy-keys``): each class has one input per task (a key drawn from its group), repeated by
    every example of the class, so finding the query's demonstrations is exact matching, as in ``lookup``.

    ``open_queries`` (family ``noisy-keys-open``): :func:`sample_episode` draws the query independently of the
    demonstrations, so it may be unanswerable. Meant for a ``k = 1`` warm-up phase, where the three structures
    compute the same function: the model must compare the demonstration's input with the query's (same class:
    copy the label; another class: the label is one of the other three) instead of always copying.
    """
    if not 2 <= n_classes <= len(LABELS):
        raise ValueError(f"n_classes={n_classes}: expected 2..{len(LABELS)} (one label token per class)")
    if not 0 <= flip < (n_classes - 1) / n_classes:
        raise ValueError(f"flip={flip}: expected 0 <= flip < {(n_classes - 1) / n_classes:.3f} (the true label must "
                         f"stay the most frequent label of each class among {n_classes} labels)")
    if length < 1:
        raise ValueError(f"length={length}: expected >= 1")
    groups = class_groups(n_classes)
    labels = rng.sample(LABELS, n_classes)
    options = tuple(sorted(labels))
    keys = ["".join(rng.choice(group) for _ in range(length)) for group in groups] if keyed else None

    def example(r: random.Random, c: int, label: str) -> Example:
        text = keys[c] if keys else "".join(r.choice(groups[c]) for _ in range(length))
        return Example(text, label, options, name)

    def draw(r: random.Random) -> Example:
        c = r.randrange(n_classes)
        label = labels[c]
        if r.random() < flip:
            label = r.choice([x for x in labels if x != labels[c]])
        return example(r, c, label)

    def draw_query(r: random.Random) -> Example:
        c = r.randrange(n_classes)
        return example(r, c, labels[c])

    def answerable(demos: Sequence[Example], query: Example) -> bool:
        c = noisy_class(query.input, n_classes)
        return any(d.output == query.output and noisy_class(d.input, n_classes) == c for d in demos)

    return SyntheticTask(
        name=name, family="noisy", draw=draw, answerable=answerable, draw_query=draw_query,
        witness=lambda r, query: example(r, noisy_class(query.input, n_classes), query.output),
        open_queries=open_queries,
    )


def vote_oracle(demos: Sequence[Example], query: Example, n_classes: int = 4) -> str | None:
    """A non-learned reference for ``noisy``: the most frequent label among the demonstrations of the query's
    class (ties: the first of the tied labels in ``query.options``); ``None`` when no such demonstration exists."""
    c = noisy_class(query.input, n_classes)
    votes = [d.output for d in demos if noisy_class(d.input, n_classes) == c]
    if not votes:
        return None
    return max(query.options, key=lambda label: (votes.count(label), -query.options.index(label)))


FAMILIES: dict[str, Callable[..., SyntheticTask]] = {
    "lookup": lookup_task,
    "mapping": mapping_task,
    "position": position_task,
    "noisy": noisy_task,
    "noisy-keys": functools.partial(noisy_task, keyed=True),
    "noisy-keys-open": functools.partial(noisy_task, keyed=True, open_queries=True),
}


def get_family(name: str) -> Callable[..., SyntheticTask]:
    if name not in FAMILIES:
        raise ValueError(f"unknown synthetic task family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def sample_episode(rng: random.Random, family: str, k: int, answerable: bool = True,
                   **family_kwargs) -> tuple[list[Example], Example]:
    """A fresh task of ``family``, ``k`` demonstrations and a query (answerable from them if asked).

    For ``lookup`` the task has ``k`` keys by default (every key is shown once), so the query's key is
    always among the demonstrations. For ``noisy`` (a family with a ``witness``) the query is drawn first
    and, when ``answerable`` and no demonstration of its class carries its true label, one demonstration (at
    a random position) is replaced by such a witness: answerable by construction for ``k >= 1``
    (``noisy-keys-open`` skips the witness: its queries may be unanswerable, by design).
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
    if task.witness is not None:
        query = task.query(rng)
        if answerable and demos and not task.open_queries and not task.answerable(demos, query):
            demos[rng.randrange(k)] = task.witness(rng, query)
        return demos, query
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
    noisy_pool: int = NOISY_POOL,
    noisy_flip: float = NOISY_FLIP,
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
    chance (``1 / lookup_keys``). ``noisy`` tasks have a pool of ``max(n_examples, noisy_pool)``
    demonstrations, labels flipped at ``noisy_flip``, with at least one correctly labelled demonstration of
    every class a query asks about (a witness is appended if the draw had none), and queries with their true labels.
    Deterministic in ``seed``; takes well under a second.
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
                if family.startswith("noisy"):
                    kwargs = {"flip": noisy_flip}
                task = maker(rng, name=name, **kwargs)
                if task.pool:
                    train = list(task.pool)
                    test = [task.draw(rng) for _ in range(n_queries)]
                elif task.witness is not None:
                    train = [task.draw(rng) for _ in range(max(n_examples, noisy_pool))]
                    test = [task.query(rng) for _ in range(n_queries)]
                    for query in test:  # every class the queries ask about has a correct demonstration
                        if not task.answerable(train, query):  # (practically never: p**(n/classes))
                            train.append(task.witness(rng, query))
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
    "NOISY_FLIP",
    "NOISY_POOL",
    "SYMBOLS",
    "SyntheticTask",
    "class_groups",
    "get_family",
    "lookup_task",
    "mapping_task",
    "noisy_class",
    "noisy_task",
    "position_task",
    "sample_episode",
    "vote_oracle",
    "write_synthetic_collection",
]
