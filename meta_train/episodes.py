"""Training episodes: where they come from, how many demonstrations, and how they become a batch.

Episode ``i`` of a run is a pure function of ``(seed, i)``: a map-style dataset whose items are drawn
from ``random.Random(f"{seed}:{i}")``. So the data order needs no sampler state, resuming skips
batches without generating them, and each distributed rank reads its own indices.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saicl.processing import TruncationReport

from .data import Example, TaskData, make_episode
from .synthetic import get_family, sample_episode


@dataclass(frozen=True)
class KSchedule:
    """Demonstrations per episode: ``k`` drawn uniformly from ``[k_min, k_max]``; during the first
    ``warmup_steps`` optimizer steps (a curriculum: few demonstrations first) from ``[k_min, k_start]``."""

    k_min: int = 2
    k_max: int = 2
    k_start: int | None = None
    warmup_steps: int = 0

    def __post_init__(self):
        if self.k_min < 0 or self.k_max < self.k_min:
            raise ValueError(f"k range [{self.k_min}, {self.k_max}] is empty or negative")
        if self.k_start is not None and not self.k_min <= self.k_start <= self.k_max:
            raise ValueError(f"k_start={self.k_start} must lie in [{self.k_min}, {self.k_max}]")

    @classmethod
    def parse(cls, text: str | int, warmup_steps: int = 0, k_start: int | None = None) -> KSchedule:
        """``"4"`` (fixed) or ``"2-16"`` (uniform range)."""
        text = str(text).strip()
        try:
            low, _, high = text.partition("-")
            k_min, k_max = int(low), int(high or low)
        except ValueError as err:
            raise ValueError(f"k={text!r}: expected an integer like 4 or a range like 2-16") from err
        return cls(k_min, k_max, k_start, warmup_steps)

    def draw(self, rng: random.Random, step: int) -> int:
        high = self.k_max if self.k_start is None or step >= self.warmup_steps else self.k_start
        return rng.randint(self.k_min, high)


class EpisodeSource:
    """Makes one episode (demonstrations, query) from an RNG and ``k``."""

    def episode(self, rng: random.Random, k: int) -> tuple[list[Example], Example]:
        raise NotImplementedError


class SyntheticSource(EpisodeSource):
    """Fresh synthetic tasks for every episode (an endless supply of tasks): ``families`` drawn uniformly."""

    def __init__(self, families: Sequence[str] = ("lookup",), **family_kwargs):
        for family in families:
            get_family(family)
        self.families = list(families)
        self.family_kwargs = family_kwargs

    def episode(self, rng: random.Random, k: int) -> tuple[list[Example], Example]:
        family = rng.choice(self.families)
        kwargs = self.family_kwargs.get(family, {})
        return sample_episode(rng, family, k, **kwargs)


class TaskSource(EpisodeSource):
    """Episodes from loaded tasks (MetaICL meta-training): a task drawn uniformly, ``k`` demonstrations
    and a different query from all its examples (train and test pools together)."""

    def __init__(self, tasks: dict[str, TaskData], k_max: int):
        small = {name: len(t) for name, t in tasks.items() if len(t) < k_max + 1}
        if small:
            raise ValueError(f"tasks with fewer than k+1 = {k_max + 1} examples: {small}")
        if not tasks:
            raise ValueError("no training tasks")
        self.names = sorted(tasks)
        self.examples = {name: tasks[name].train + tasks[name].test for name in self.names}

    def episode(self, rng: random.Random, k: int) -> tuple[list[Example], Example]:
        examples = self.examples[rng.choice(self.names)]
        drawn = rng.sample(examples, k + 1)
        return drawn[:k], drawn[k]


class EpisodeDataset(torch.utils.data.Dataset):
    """``length`` episodes; item ``i`` depends only on ``(seed, i)`` and its optimizer step ``i // per_step``."""

    def __init__(self, source: EpisodeSource, schedule: KSchedule, length: int, seed: int, per_step: int = 1):
        self.source, self.schedule, self.length, self.seed, self.per_step = source, schedule, length, seed, per_step

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}:{index}")
        k = self.schedule.draw(rng, index // self.per_step)
        demos, query = self.source.episode(rng, k)
        return make_episode(demos, query)


TRUNCATION_KEY = "truncation"  # batch field: the collated batch's TruncationReport counts, as a tensor


class EpisodeCollator:
    """Episodes -> ``input_ids``, ``attention_mask``, ``segment_ids``, ``labels`` (the gold outputs) and
    ``truncation``: a ``(5,)`` long tensor of the batch's :class:`~saicl.TruncationReport` counts.

    The collator runs inside ``DataLoader`` workers when ``num_workers >= 1``, where a counter would stay in
    the worker; the counts travel with the batch instead and the training loop sums them
    (:class:`TruncationCounter`), separately for training and evaluation batches.
    """

    def __init__(self, processor, max_target_tokens: int = 32):
        self.processor = processor
        self.max_target_tokens = max_target_tokens

    def __call__(self, episodes: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(episodes)
        labels = self.processor.encode_targets([e["output"] for e in episodes], max_tokens=self.max_target_tokens)
        counts = torch.tensor([getattr(batch.truncation, name) for name in TruncationReport.COUNTS], dtype=torch.long)
        return {**dict(batch), "labels": labels, TRUNCATION_KEY: counts}


class TruncationCounter:
    """Sums the ``truncation`` field of collated batches, per kind of batch (``"train"``, ``"eval"``)."""

    def __init__(self):
        self.reports: dict[str, TruncationReport] = {}

    def pop(self, inputs: dict, kind: str) -> dict:
        """Remove the ``truncation`` field from ``inputs`` (the model does not take it) and count it."""
        counts = inputs.pop(TRUNCATION_KEY, None)
        if counts is not None:
            report = self.reports.setdefault(kind, TruncationReport())
            report.add(TruncationReport(**dict(zip(TruncationReport.COUNTS, counts.tolist()))))
        return inputs

    def report(self, kind: str) -> TruncationReport:
        return self.reports.get(kind, TruncationReport())

    def truncated(self, kind: str) -> int:
        """Demonstrations + queries cut by the caps in the ``kind`` batches counted so far."""
        report = self.report(kind)
        return report.demonstrations + report.queries


def fixed_episodes(source: EpisodeSource, k: int, n: int, seed: int) -> list[dict]:
    """``n`` episodes with exactly ``k`` demonstrations, for held-out loss and accuracy."""
    rng = random.Random(f"heldout:{seed}")
    return [make_episode(*source.episode(rng, k)) for _ in range(n)]


__all__ = [
    "EpisodeCollator",
    "EpisodeDataset",
    "EpisodeSource",
    "KSchedule",
    "TRUNCATION_KEY",
    "TruncationCounter",
    "SyntheticSource",
    "TaskSource",
    "fixed_episodes",
]
