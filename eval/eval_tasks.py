"""What ``saicl-eval`` evaluates: the tasks per ``(k, seed)``, the work units, demonstration orders, task kinds.

A *work unit* is one ``(structure, k, seed, task)``: every query of the task under every demonstration
order. Units are the grain of distributed evaluation (:mod:`saicl.eval.distributed`); their list, in the
order built here, is the same on every rank and fixes the order of the results.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from saicl.config_cli import ConfigError

from .eval_config import EvalConfig

METRIC_NAME = {"classification": "macro_f1", "multiple-choice": "accuracy", "generation": "exact_match"}


class IdenticalSeedsWarning(UserWarning):
    """Every seed drew the same demonstrations for a task (its pool holds exactly k): the spread over
    seeds (worst, std) is 0 by construction, not a measurement."""


@dataclass(frozen=True)
class WorkUnit:
    """One ``(structure, k, seed, task)``; ``index`` is its place in the canonical order, ``cost`` an estimate
    of its encoder work (queries x orders x (k + 1) segments), used only to balance ranks."""

    index: int
    structure: str
    k: int
    seed: int
    task: str
    cost: int


Plan = list[tuple[int, int, dict]]  # [(k, seed, {task name: Task})], in config order


def load_eval_tasks(config: EvalConfig, k: int, seed: int) -> tuple[dict, list[dict]]:
    """Tasks of the split for ``(k, seed)``, and the tasks skipped (with the reason).

    A task whose demonstration pool is smaller than ``k`` is skipped, not fatal: a scaling sweep over
    ``k`` keeps the tasks that can serve each ``k``.
    """
    from saicl.meta_train.data import DataError, load_tasks

    try:
        tasks = load_tasks(config.data, split=config.split, config=config.split_config, k=k, seed=seed)
    except DataError as err:
        if "fewer than k" not in str(err) and "needs at least" not in str(err):
            raise
        tasks = load_tasks(config.data, split=config.split, config=config.split_config, k=0, seed=seed)
    if config.tasks is not None:
        unknown = sorted(set(config.tasks) - set(tasks))
        if unknown:
            raise ConfigError("tasks", config.tasks,
                              f"names tasks not in the {config.split!r} split: {unknown} (have {sorted(tasks)})")
        tasks = {name: tasks[name] for name in config.tasks}
    skipped = []
    for name in list(tasks):
        task = tasks[name]
        if len(task.train) < k:
            skipped.append({"k": k, "seed": seed, "task": name,
                            "reason": f"{len(task.train)} demonstration candidates < k={k}"})
            del tasks[name]
        elif not task.test:
            skipped.append({"k": k, "seed": seed, "task": name, "reason": "no test queries"})
            del tasks[name]
    return tasks, skipped


def build_plan(config: EvalConfig) -> tuple[Plan, list[dict]]:
    """The tasks of every ``(k, seed)`` in config order, and every skipped ``(k, seed, task)`` with its reason."""
    plan, skipped = [], []
    for k in config.ks:
        for seed in config.seeds:
            tasks, skipped_here = load_eval_tasks(config, k, seed)
            skipped += skipped_here
            plan.append((k, seed, tasks))
    return plan, skipped


def queries_of(task, config: EvalConfig) -> list:
    """The test queries evaluated for ``task`` (the first ``max_queries`` in file order)."""
    return task.test[: config.max_queries] if config.max_queries else task.test


def work_units(plan: Plan, config: EvalConfig) -> list[WorkUnit]:
    """Every ``(structure, k, seed, task)`` in canonical order: structure, then ``(k, seed)``, then task."""
    units = []
    for structure in config.structures:
        for k, seed, tasks in plan:
            for name, task in tasks.items():
                cost = len(queries_of(task, config)) * config.orders * (k + 1)
                units.append(WorkUnit(len(units), structure, k, seed, name, cost))
    return units


def order_permutation(k: int, seed: int, order: int) -> list[int]:
    """Order ``0`` is the sampled order; order ``j > 0`` a fixed random permutation of it."""
    perm = list(range(k))
    if order > 0:
        random.Random(f"order:{seed}:{order}").shuffle(perm)
    return perm


def task_kind(task) -> str:
    """``classification`` (macro-F1), ``multiple-choice`` (accuracy) or ``generation`` (exact match)."""
    if not all(ex.options for ex in task.test):
        return "generation"
    return "classification" if task.is_classification else "multiple-choice"


def identical_seed_draws(plan: Plan, seeds: Sequence[int], warn: bool = True) -> list[dict]:
    """``(k, task)`` pairs for which every seed draws the same demonstrations in the same order.

    Then the spread over seeds is 0 by construction: each is reported in the JSON (``identical_seeds``)
    and, for ``k > 0`` and ``warn``, with an :class:`IdenticalSeedsWarning` (the usual cause: a pool of
    exactly ``k``).
    """
    from saicl.meta_train.data import sample_demonstrations

    if len(seeds) < 2:
        return []
    draws: dict[tuple[int, str], list[tuple[int, list, int]]] = {}
    for k, seed, tasks in plan:
        for name, task in tasks.items():
            draws.setdefault((k, name), []).append((seed, sample_demonstrations(task, k, seed), len(task.train)))
    identical = []
    for (k, name), per_seed in draws.items():
        if len(per_seed) < 2 or any(demos != per_seed[0][1] for _, demos, _ in per_seed):
            continue
        pools = sorted({pool for _, _, pool in per_seed})
        reason = "k=0: no demonstrations" if k == 0 else f"demonstration pool of {pools[0]} = k" if pools == [k] \
            else "every seed drew the same demonstrations"
        identical.append({"k": k, "task": name, "seeds": [s for s, _, _ in per_seed], "reason": reason})
        if k > 0 and warn:
            warnings.warn(
                f"task {name!r}, k={k}: all {len(per_seed)} seeds get the same demonstrations in the same order "
                f"({reason}); its worst/std over seeds are 0 by construction",
                IdenticalSeedsWarning, stacklevel=3,
            )
    return identical


__all__ = ["METRIC_NAME", "IdenticalSeedsWarning", "Plan", "WorkUnit", "build_plan", "identical_seed_draws",
           "load_eval_tasks", "order_permutation", "queries_of", "task_kind", "work_units"]
