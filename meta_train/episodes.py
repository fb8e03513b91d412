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


class EpisodeCollator:
    """Episodes -> ``input_ids``, ``attention_mask``, ``segment_ids`` and ``labels`` (the gold outputs)."""

    def __init__(self, processor, max_target_tokens: int = 32):
        self.processor = processor
        self.max_target_tokens = max_target_tokens
        self.truncated = 0  # demonstrations + queries cut by the caps so far (reported, never silent)

    def __call__(self, episodes: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(episodes)
        self.truncated += batch.truncation.demonstrations + batch.truncation.queries
        labels = self.processor.encode_targets([e["output"] for e in episodes], max_tokens=self.max_target_tokens)
        return {**dict(batch), "labels": labels}


def fixed_episodes(source: EpisodeSource, k: int, n: int, seed: int) -> list[dict]:
    """``n`` episodes with exactly ``k`` demonstrations, for held-out loss and accuracy."""
    rng = random.Random(f"heldout:{seed}")
    return [make_episode(*source.episode(rng, k)) for _ in range(n)]


__all__ = [
    "EpisodeCollator",
    "EpisodeDataset",
    "EpisodeSource",
    "KSchedule",
    "SyntheticSource",
    "TaskSource",
    "fixed_episodes",
]
