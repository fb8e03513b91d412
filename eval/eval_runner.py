"""Running ``saicl-eval``'s work units on a model, and :func:`evaluate_model`, which runs them all (split across
the ranks of a distributed job when given a :class:`~saicl.eval.distributed.World`) and summarises them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from saicl import ICLProcessor, SAICLForConditionalGeneration, TruncationReport

from . import metrics
from .cli import CLIError, progress_bar
from .distributed import World, split_units
from .eval_config import EvalConfig
from .eval_summary import ORDER_TOLERANCE, TIE_RULE, TRUNCATION_COUNTED, RawResults, TaskRun, summarize
from .eval_tasks import (
    Plan,
    WorkUnit,
    build_plan,
    identical_seed_draws,
    order_permutation,
    queries_of,
    task_kind,
    work_units,
)
from .scoring import generate_episodes, score_episodes


def run_task(
    model: SAICLForConditionalGeneration, processor: ICLProcessor, task, demonstrations: list, kind: str,
    config: EvalConfig, seed: int, progress: Callable[[int], None] | None = None,
) -> TaskRun:
    """Answer every query of ``task`` with the given demonstrations, under ``config.orders`` orders."""
    from saicl.meta_train.data import make_episode

    queries = queries_of(task, config)
    run = TaskRun()
    processor.reset_truncation()
    for order in range(config.orders):
        demos = [demonstrations[i] for i in order_permutation(len(demonstrations), seed, order)]
        episodes = [make_episode(demos, q) for q in queries]
        if kind == "generation":
            run.predictions.append(
                generate_episodes(model, processor, episodes, config.batch_size, config.max_new_tokens, progress)
            )
        else:
            scores = score_episodes(model, processor, episodes, config.batch_size, progress)
            run.scores.append(scores)
            run.predictions.append(
                [e["options"][metrics.choose_option(s)] for e, s in zip(episodes, scores)]
            )
        if order == 0:  # other orders re-encode the same texts: count each episode once
            run.truncation = processor.reset_truncation()
    return run


def run_units(
    model: SAICLForConditionalGeneration, processor: ICLProcessor, units: Sequence[WorkUnit], plan: Plan,
    config: EvalConfig, show_progress: bool = True, label: str = "",
) -> dict[int, TaskRun]:
    """Run ``units`` (in the order given); returns ``{unit index: TaskRun}``. The model's structure is restored."""
    from saicl.meta_train.data import sample_demonstrations

    tasks = {(k, seed): named for k, seed, named in plan}
    total = sum(len(queries_of(tasks[(u.k, u.seed)][u.task], config)) * config.orders for u in units)
    original_structure = model.config.structure
    runs: dict[int, TaskRun] = {}
    current = None  # set_structure on the first unit too: the model's config need not say what it runs
    bar = progress_bar(total, f"eval {label}".strip(), enabled=show_progress)
    try:
        for unit in units:
            if unit.structure != current:
                model.set_structure(unit.structure)
                current = unit.structure
            task = tasks[(unit.k, unit.seed)][unit.task]
            bar.set_postfix_str(f"{unit.structure} k={unit.k} seed={unit.seed} {unit.task}"[:60])
            demos = sample_demonstrations(task, unit.k, unit.seed)
            runs[unit.index] = run_task(model, processor, task, demos, task_kind(task), config, unit.seed, bar.update)
    finally:
        bar.close()
        model.set_structure(original_structure)
    return runs


def collect(runs: dict[int, TaskRun], units: Sequence[WorkUnit], plan: Plan,
            config: EvalConfig) -> tuple[RawResults, TruncationReport]:
    """Every unit's run, in canonical order, keyed for :func:`summarize`; truncation summed over the first
    structure's units (the processor's output does not depend on the structure)."""
    missing = [u for u in units if u.index not in runs]
    if missing:
        raise RuntimeError(f"no result for {len(missing)} of {len(units)} work units (first: {missing[0]})")
    tasks = {(k, seed): named for k, seed, named in plan}
    raw: RawResults = {}
    truncated = TruncationReport()
    for unit in units:
        run, task = runs[unit.index], tasks[(unit.k, unit.seed)][unit.task]
        if unit.structure == config.structures[0]:
            truncated.add(run.truncation)
        golds = [q.output for q in queries_of(task, config)]
        raw.setdefault((unit.structure, unit.k, unit.task), {})[unit.seed] = (run, golds, task_kind(task))
    return raw, truncated


def evaluate_model(
    model: SAICLForConditionalGeneration, tokenizer, config: EvalConfig, show_progress: bool = True,
    label: str = "", world: World | None = None,
) -> dict:
    """Evaluate ``model`` under every structure of ``config``; returns the JSON-ready results.

    The model is put in eval mode; its structure is restored afterwards. With a ``world`` of several ranks
    (every rank calls this with the same arguments), each rank runs its share of the work units and every
    rank returns the same, complete results: equal to one process's, except ``distributed``.

    Returns:
        ``{"config", "tie_rule", "order_tolerance", "rows", "overall", "order", "skipped", "identical_seeds",
        "truncation", "truncation_counted", "distributed"}`` (see docs/evaluation.md). ``truncation`` counts
        what the token caps cut, each distinct episode once; ``identical_seeds`` lists the ``(k, task)`` whose
        seeds all drew the same demonstrations (each row says so in ``seeds_differ``); ``distributed`` is
        ``{"world_size", "units_per_rank", "seconds_per_rank"}``.
    """
    world = world or World()
    model.eval()
    processor = ICLProcessor(
        tokenizer, template=config.template, query_template=config.query_template,
        max_demo_tokens=config.max_demo_tokens, max_query_tokens=config.max_query_tokens,
    )
    shared: dict = {}

    def local_phase() -> tuple[dict[int, TaskRun], float]:
        start = time.perf_counter()
        plan, skipped = build_plan(config)
        units = work_units(plan, config)
        if not units:
            raise CLIError(f"{config.data}: nothing to evaluate (every task was skipped: {skipped[:3]} ...)")
        shared.update(plan=plan, skipped=skipped, units=units,
                      identical=identical_seed_draws(plan, config.seeds, warn=world.rank == 0))
        mine = split_units(units, world.size)[world.rank]
        runs = run_units(model, processor, mine, plan, config, show_progress and world.rank == 0, label)
        return runs, time.perf_counter() - start

    per_rank = world.run_everywhere(local_phase)
    runs: dict[int, TaskRun] = {}
    for rank_runs, _ in per_rank:
        runs.update(rank_runs)
    raw, truncated = collect(runs, shared["units"], shared["plan"], config)
    rows, overall, order = summarize(raw, config)
    identical = shared["identical"]
    for row in rows:
        row["seeds_differ"] = (row["k"], row["task"]) not in {(i["k"], i["task"]) for i in identical}
    return {
        "config": asdict(config),
        "tie_rule": TIE_RULE,
        "order_tolerance": ORDER_TOLERANCE,
        "rows": rows,
        "overall": overall,
        "order": order,
        "skipped": shared["skipped"],
        "identical_seeds": identical,
        "truncation": truncated.counts(),  # numbers only: callers sum these over runs
        "truncation_counted": TRUNCATION_COUNTED,
        # how the work was shared (not part of the results: the only field that depends on the launch)
        "distributed": {"world_size": world.size, "units_per_rank": [len(r) for r, _ in per_rank],
                        "seconds_per_rank": [round(s, 3) for _, s in per_rank]},
    }


__all__ = ["collect", "evaluate_model", "run_task", "run_units"]
