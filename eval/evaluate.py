"""``saicl-eval``: MetaICL-style evaluation of one checkpoint under several encoder structures.

For every structure (same weights, switched with ``model.set_structure``), every ``k`` and every seed
(100, 13, 21, 42, 87 by default), ``k`` demonstrations are drawn per task (one draw per seed, shared by
all the task's queries, as in MetaICL) and every test query is answered:

* tasks with options: every option is scored by its mean per-token NLL (``score_options``: the
  encoder runs once per episode) and the lowest wins (ties: :func:`saicl.eval.metrics.choose_option`);
  classification tasks (every output among the options) report macro-F1, the others accuracy;
* generation tasks (no options): greedy ``generate``, exact match.

Per task and overall, the mean and the worst over seeds are reported. **Order sensitivity**: each seed is
re-evaluated under ``orders - 1`` further random orders of the same demonstrations; the spread of the
metric and the largest change of any option NLL are reported (0 up to float error for ``saicl``/``fid``).

Example: ``saicl-eval --checkpoint runs/saicl --data data/synthetic --k 4,16 --json eval.json``
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saicl import ICLProcessor, SAICLForConditionalGeneration, TruncationReport
from saicl.outputs import validate_output_dir, validate_output_file
from saicl.structures import STRUCTURES

from . import metrics
from .cli import CLIError, check_device, comma_ints, comma_names, progress_bar, run_cli, save_json
from .scoring import generate_episodes, score_episodes

DEFAULT_SEEDS = (100, 13, 21, 42, 87)
# fp32 scores of saicl/fid under a permutation differ only by summation order; 1e-4 nats is far above
# that noise and far below any real order effect (full's changes are typically 1e-2 or more).
ORDER_TOLERANCE = 1e-4


class IdenticalSeedsWarning(UserWarning):
    """Every seed drew the same demonstrations for a task (its pool holds exactly k): the spread over
    seeds (worst, std) is 0 by construction, not a measurement."""


@dataclass
class EvalConfig:
    """What to evaluate and how (the CLI flags map one to one onto these fields).

    Attributes:
        data: task collection (format: docs/design.md): a ``.jsonl`` file or a MetaICL folder.
        split: ``"test"`` (held-out tasks) or ``"train"`` of the split config.
        split_config: split config path or shipped name (default: ``splits.json`` in the folder, if any).
        structures: encoder structures to evaluate the same weights under.
        seeds: demonstration seeds.
        ks: demonstrations per episode (several values give the scaling curve).
        orders: demonstration orders per seed (1 = no order-sensitivity check).
        tasks: only these tasks (``None``: all of the split).
        max_queries: at most this many test queries per task (``None``: all), the first ones in file order.
    """

    data: str
    split: str = "test"
    split_config: str | None = None
    structures: tuple[str, ...] = ("saicl", "full", "fid")
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    ks: tuple[int, ...] = (16,)
    orders: int = 3
    tasks: tuple[str, ...] | None = None
    max_queries: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    max_demo_tokens: int = 256
    max_query_tokens: int = 256
    template: str = "{input} {output}"
    query_template: str = "{input}"

    def __post_init__(self):
        for name in self.structures:
            if name not in STRUCTURES:
                raise CLIError(f"unknown structure {name!r}; expected some of {sorted(STRUCTURES)}")
        if not self.structures or not self.seeds or not self.ks:
            raise CLIError("structures, seeds and k each need at least one value")
        if min(self.ks) < 0:
            raise CLIError(f"k must be >= 0, got {list(self.ks)}")
        if self.orders < 1:
            raise CLIError(f"orders must be >= 1, got {self.orders}")
        if self.batch_size < 1:
            raise CLIError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_queries is not None and self.max_queries < 1:
            raise CLIError(f"max queries must be >= 1, got {self.max_queries}")


@dataclass
class TaskRun:
    """Raw results of one (structure, k, task, seed): per order, the predictions (and option scores)."""

    predictions: list[list[str]] = field(default_factory=list)  # [order][query]
    scores: list[list[list[float]]] = field(default_factory=list)  # [order][query][option]; empty for generation
    truncation: TruncationReport = field(default_factory=TruncationReport)  # order 0's episodes, every batch


# ---------------------------------------------------------------------------------------------------
# Data


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
            raise CLIError(f"--tasks names tasks not in the {config.split!r} split: {unknown} (have {sorted(tasks)})")
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


METRIC_NAME = {"classification": "macro_f1", "multiple-choice": "accuracy", "generation": "exact_match"}


# ---------------------------------------------------------------------------------------------------
# Evaluation


def run_task(
    model: SAICLForConditionalGeneration, processor: ICLProcessor, task, demonstrations: list, kind: str,
    config: EvalConfig, seed: int, progress: Callable[[int], None] | None = None,
) -> TaskRun:
    """Answer every query of ``task`` with the given demonstrations, under ``config.orders`` orders."""
    from saicl.meta_train.data import make_episode

    queries = task.test[: config.max_queries] if config.max_queries else task.test
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


def _order_stats(run: TaskRun, golds: list[str], kind: str) -> dict[str, float]:
    values = [metrics.task_metric(p, golds, kind == "classification") for p in run.predictions]
    agree = [sum(a == b for a, b in zip(run.predictions[0], p)) / len(golds) for p in run.predictions[1:]]
    nll_diff = 0.0
    for scores in run.scores[1:]:
        for a, b in zip(run.scores[0], scores):
            nll_diff = max(nll_diff, max(abs(x - y) for x, y in zip(a, b)))
    return {
        "spread": max(values) - min(values),
        "agreement": min(agree) if agree else 1.0,
        "max_nll_diff": nll_diff if run.scores else math.nan,
    }


def evaluate_model(
    model: SAICLForConditionalGeneration, tokenizer, config: EvalConfig, show_progress: bool = True,
    label: str = "",
) -> dict:
    """Evaluate ``model`` under every structure of ``config``; returns the JSON-ready results.

    The model is put in eval mode; its structure is restored afterwards.

    Returns:
        ``{"config", "tie_rule", "rows", "overall", "order", "skipped", "identical_seeds", "truncation",
        "truncation_counted"}`` (see docs/evaluation.md). ``truncation`` counts what the token caps cut,
        each distinct episode once; ``identical_seeds`` lists the ``(k, task)`` whose seeds all drew the
        same demonstrations (each row says so in ``seeds_differ``).
    """
    from saicl.meta_train.data import sample_demonstrations

    model.eval()
    processor = ICLProcessor(
        tokenizer, template=config.template, query_template=config.query_template,
        max_demo_tokens=config.max_demo_tokens, max_query_tokens=config.max_query_tokens,
    )
    plan, skipped = [], []
    for k in config.ks:
        for seed in config.seeds:
            tasks, skipped_here = load_eval_tasks(config, k, seed)
            skipped += skipped_here
            plan.append((k, seed, tasks))
    total = sum(
        len(t.test[: config.max_queries] if config.max_queries else t.test) * config.orders
        for _, _, tasks in plan for t in tasks.values()
    ) * len(config.structures)
    if total == 0:
        raise CLIError(f"{config.data}: nothing to evaluate (every task was skipped: {skipped[:3]} ...)")
    identical = identical_seed_draws(plan, config.seeds)

    original_structure = model.config.structure
    truncated = TruncationReport()
    raw: dict[tuple[str, int, str], dict[int, tuple[TaskRun, list[str], str]]] = {}
    bar = progress_bar(total, f"eval {label}".strip(), enabled=show_progress)
    try:
        for structure in config.structures:
            model.set_structure(structure)
            for k, seed, tasks in plan:
                for name, task in tasks.items():
                    demos = sample_demonstrations(task, k, seed)
                    kind = task_kind(task)
                    bar.set_postfix_str(f"{structure} k={k} seed={seed} {name}"[:60])
                    run = run_task(model, processor, task, demos, kind, config, seed, bar.update)
                    if structure == config.structures[0]:  # the processor's output does not depend on it
                        truncated.add(run.truncation)
                    queries = task.test[: config.max_queries] if config.max_queries else task.test
                    raw.setdefault((structure, k, name), {})[seed] = (run, [q.output for q in queries], kind)
    finally:
        bar.close()
        model.set_structure(original_structure)
    rows, overall, order = _summarize(raw, config)
    for row in rows:
        row["seeds_differ"] = (row["k"], row["task"]) not in {(i["k"], i["task"]) for i in identical}
    return {
        "config": asdict(config),
        "tie_rule": f"lowest mean NLL after rounding to {metrics.TIE_DECIMALS} decimals; ties -> first listed option",
        "order_tolerance": ORDER_TOLERANCE,
        "rows": rows,
        "overall": overall,
        "order": order,
        "skipped": skipped,
        "identical_seeds": identical,
        "truncation": truncated.counts(),  # numbers only: callers sum these over runs
        "truncation_counted": TRUNCATION_COUNTED,
    }


TRUNCATION_COUNTED = "every distinct episode once (first demonstration order), summed over k, seeds and tasks"


def identical_seed_draws(plan: list[tuple[int, int, dict]], seeds: Sequence[int]) -> list[dict]:
    """``(k, task)`` pairs for which every seed draws the same demonstrations in the same order.

    Then the spread over seeds is 0 by construction: each is reported in the JSON (``identical_seeds``)
    and, for ``k > 0``, with an :class:`IdenticalSeedsWarning` (the usual cause: a pool of exactly ``k``).
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
        if k > 0:
            warnings.warn(
                f"task {name!r}, k={k}: all {len(per_seed)} seeds get the same demonstrations in the same order "
                f"({reason}); its worst/std over seeds are 0 by construction",
                IdenticalSeedsWarning, stacklevel=3,
            )
    return identical


def _summarize(raw: dict, config: EvalConfig) -> tuple[list[dict], list[dict], list[dict]]:
    rows = []
    for (structure, k, name), per_seed in raw.items():
        seed_values, spreads, agreements, nll_diffs = {}, [], [], []
        for seed, (run, golds, kind) in per_seed.items():
            seed_values[seed] = metrics.task_metric(run.predictions[0], golds, kind == "classification")
            stats = _order_stats(run, golds, kind)
            spreads.append(stats["spread"])
            agreements.append(stats["agreement"])
            nll_diffs.append(stats["max_nll_diff"])
        kind = next(iter(per_seed.values()))[2]
        summary = metrics.summarize_seeds(list(seed_values.values()))
        rows.append({
            "structure": structure, "k": k, "task": name, "kind": kind, "metric": METRIC_NAME[kind],
            "per_seed": {str(s): v for s, v in seed_values.items()}, **summary,
            "n_queries": len(next(iter(per_seed.values()))[1]),
            "order_spread": max(spreads), "order_agreement": min(agreements),
            "order_max_nll_diff": _nanmax(nll_diffs),
        })
    overall, order = [], []
    for structure in config.structures:
        for k in config.ks:
            mine = [r for r in rows if r["structure"] == structure and r["k"] == k]
            if not mine:
                continue
            per_seed = {}
            for seed in config.seeds:
                values = [r["per_seed"][str(seed)] for r in mine if str(seed) in r["per_seed"]]
                if values:
                    per_seed[str(seed)] = sum(values) / len(values)
            overall.append({"structure": structure, "k": k, "n_tasks": len(mine), "per_seed": per_seed,
                            **metrics.summarize_seeds(list(per_seed.values()))})
            max_diff = _nanmax([r["order_max_nll_diff"] for r in mine])
            order.append({
                "structure": structure, "k": k, "orders": config.orders,
                "metric_spread": max(r["order_spread"] for r in mine),
                "agreement": min(r["order_agreement"] for r in mine),
                "max_nll_diff": max_diff,
                "invariant": None if config.orders < 2 or math.isnan(max_diff) else bool(max_diff <= ORDER_TOLERANCE),
            })
    return rows, overall, order


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


# ---------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_tables(results: dict) -> str:
    """Per-task and overall tables (mean / worst over seeds), and the order-sensitivity table."""
    structures = results["config"]["structures"]
    lines = []
    for k in results["config"]["ks"]:
        lines += [f"#### k = {k} (mean / worst over {len(results['config']['seeds'])} seeds)", "",
                  "| task | metric | " + " | ".join(structures) + " |",
                  "|---|---|" + "---|" * len(structures)]
        tasks = sorted({r["task"] for r in results["rows"] if r["k"] == k})
        for task in tasks:
            cells, metric = [], ""
            for s in structures:
                row = next((r for r in results["rows"] if r["k"] == k and r["task"] == task
                            and r["structure"] == s), None)
                cells.append("–" if row is None else f"{_fmt(row['mean'])} / {_fmt(row['worst'])}")
                metric = metric or (row["metric"] if row else "")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        cells = []
        for s in structures:
            row = next((r for r in results["overall"] if r["k"] == k and r["structure"] == s), None)
            cells.append("–" if row is None else f"**{_fmt(row['mean'])} / {_fmt(row['worst'])}**")
        lines += ["| **overall** | | " + " | ".join(cells) + " |", ""]
    if results["config"]["orders"] > 1:
        lines += [f"#### Order sensitivity ({results['config']['orders']} demonstration orders per seed)", "",
                  "| structure | k | metric spread (max) | prediction agreement (min) | max abs NLL change "
                  "| invariant |",
                  "|---|---|---|---|---|---|"]
        for row in results["order"]:
            invariant = {True: "yes", False: "no", None: "n/a"}[row["invariant"]]
            diff = "n/a" if math.isnan(row["max_nll_diff"]) else f"{row['max_nll_diff']:.1e}"
            lines.append(f"| {row['structure']} | {row['k']} | {_fmt(row['metric_spread'])} | "
                         f"{_fmt(row['agreement'])} | {diff} | {invariant} |")
        lines.append("")
    same = [f"{i['task']} (k={i['k']})" for i in results.get("identical_seeds", []) if i["k"] > 0]
    if same:
        lines += ["Seeds identical (one demonstration set, no spread over seeds): " + "; ".join(same[:10])
                  + (" ..." if len(same) > 10 else ""), ""]
    if results["skipped"]:
        reasons = sorted({f"{s['task']} (k={s['k']}): {s['reason']}" for s in results["skipped"]})
        lines += ["Skipped: " + "; ".join(reasons[:10]) + (" ..." if len(reasons) > 10 else ""), ""]
    return "\n".join(lines)


def plot_results(results: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """PNG plots: the overall metric against k (if several k), and per structure (bar chart)."""
    from .plots import bar_chart, line_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    structures = results["config"]["structures"]
    series = {s: [(r["k"], r["mean"], r["worst"]) for r in results["overall"] if r["structure"] == s]
              for s in structures}
    if len(results["config"]["ks"]) > 1:
        written.append(line_plot(
            {s: [(k, m) for k, m, _ in v] for s, v in series.items()},
            {s: [(k, w) for k, _, w in v] for s, v in series.items()},
            out_dir / "eval_scaling.png", xlabel="demonstrations k", ylabel="metric (solid: mean, dashed: worst)",
            title=title or "Held-out metric against the number of demonstrations", logx=True,
        ))
    k = results["config"]["ks"][-1]
    bars = {s: next((r["mean"] for r in results["overall"] if r["structure"] == s and r["k"] == k), math.nan)
            for s in structures}
    worst = {s: next((r["worst"] for r in results["overall"] if r["structure"] == s and r["k"] == k), math.nan)
             for s in structures}
    written.append(bar_chart(bars, worst, out_dir / "eval_structures.png",
                             ylabel="metric (bar: mean, dot: worst seed)",
                             title=title or f"Held-out metric per structure (k={k})"))
    return written


# ---------------------------------------------------------------------------------------------------
# Command line


def load_checkpoint(path: str, tokenizer_name: str | None, attn_backend: str, device: str, dtype: str,
                    structure: str | None = None):
    """``(model, tokenizer)`` from a ``save_pretrained`` folder (any T5 or SAICL checkpoint).

    The folder is validated first (:func:`saicl.checkpoints.load_model`): a missing, truncated or empty
    file is named. ``structure`` overrides the one in ``config.json`` (also an unknown one).
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    from saicl.checkpoints import load_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    overrides = {"structure": structure} if structure is not None else {}
    model = load_model(path, "--checkpoint", attn_backend=attn_backend, dtype=torch_dtype, **overrides)
    model.to(device)
    if tokenizer_name == "byt5":
        return model, ByT5Tokenizer()
    try:
        return model, AutoTokenizer.from_pretrained(tokenizer_name or path)
    except (OSError, ValueError, TypeError) as err:
        if tokenizer_name is None and model.config.vocab_size == 384:
            print(f"note: no tokenizer in {path}; vocabulary size 384 is ByT5's, using ByT5Tokenizer", file=sys.stderr)
            return model, ByT5Tokenizer()
        raise CLIError(f"could not load a tokenizer from {tokenizer_name or path} ({err}); pass --tokenizer") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saicl-eval", description=__doc__.split("\n\n")[0],
        epilog="Metrics, tie rule and JSON schema: docs/evaluation.md.",
    )
    parser.add_argument("--checkpoint", required=True, help="save_pretrained folder of a T5 or SAICL model")
    parser.add_argument("--data", required=True,
                        help="task collection (docs/design.md): a .jsonl file or a MetaICL folder with splits.json")
    parser.add_argument("--split", default="test", choices=["test", "train"],
                        help="which tasks of the split config to evaluate (default: the held-out test tasks)")
    parser.add_argument("--split-config", default=None,
                        help="split config JSON (path or shipped name); default: splits.json in the data folder")
    parser.add_argument("--structures", default="saicl,full,fid",
                        help="comma-separated encoder structures, same weights under each (default: saicl,full,fid)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated demonstration seeds (default: 100,13,21,42,87)")
    parser.add_argument("--k", default="16", help="comma-separated demonstration counts; several give a scaling "
                        "curve and plot, e.g. 4,16,64,256 (default: 16)")
    parser.add_argument("--orders", type=int, default=3,
                        help="demonstration orders per seed for the order-sensitivity check; 1 disables it "
                        "(default: 3)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names to evaluate (default: all)")
    parser.add_argument("--max-queries", type=int, default=None,
                        help="at most this many queries per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="episodes per encoder pass (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length for tasks without options")
    parser.add_argument("--max-demo-tokens", type=int, default=256, help="token cap per demonstration (default: 256)")
    parser.add_argument("--max-query-tokens", type=int, default=256, help="token cap of the query (default: 256)")
    parser.add_argument("--template", default="{input} {output}", help="demonstration template")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or Hub id, or 'byt5' (default: the checkpoint's own)")
    parser.add_argument("--attn-backend", default="auto", help="encoder attention backend (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model weights dtype (default: float32)")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON to PATH")
    parser.add_argument("--plot-dir", metavar="DIR",
                        help="write PNG plots to DIR (default: next to --json; no plots without either)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # every output path checked before any work: a bad path must not cost the evaluation (saicl.outputs)
    plot_dir = args.plot_dir or (str(Path(args.json).parent) if args.json else None)
    if args.json:
        validate_output_file(args.json, "--json")
    if plot_dir:
        validate_output_dir(plot_dir, "--plot-dir" if args.plot_dir else "--json")
    if not Path(args.data).exists():
        raise CLIError(f"--data {args.data}: no such file or folder")
    check_device(args.device)
    from saicl.attention.registry import check_backend_name

    try:
        check_backend_name(args.attn_backend)
    except ValueError as err:
        raise CLIError(str(err)) from err
    config = EvalConfig(
        data=args.data, split=args.split, split_config=args.split_config,
        structures=tuple(comma_names(args.structures, "--structures")),
        seeds=tuple(comma_ints(args.seeds, "--seeds")), ks=tuple(comma_ints(args.k, "--k", minimum=0)),
        orders=args.orders, tasks=tuple(comma_names(args.tasks, "--tasks")) if args.tasks else None,
        max_queries=args.max_queries, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_demo_tokens=args.max_demo_tokens, max_query_tokens=args.max_query_tokens, template=args.template,
    )
    model, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer, args.attn_backend, args.device, args.dtype,
                                       structure=config.structures[0])
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        results = evaluate_model(model, tokenizer, config, show_progress=not args.no_progress)
    results["checkpoint"] = args.checkpoint
    print(markdown_tables(results))
    saved = True
    if args.json:  # atomic; if it fails now, the results are saved beside the run (one line on stderr)
        saved = save_json(args.json, results, "--json", "saicl-eval")
        if saved:
            print(f"results: {args.json}")
    if plot_dir:
        try:
            for path in plot_results(results, plot_dir):
                print(f"plot: {path}")
        except OSError as err:
            print(f"saicl-eval: error: could not write the plots into {plot_dir} ({err.strerror or err})",
                  file=sys.stderr)
            saved = False
    return 0 if saved else 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"saicl-eval: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``saicl-eval`` (exit code 0 only on success)."""
    return run_cli(_run, argv, "saicl-eval")


if __name__ == "__main__":
    sys.exit(main())
