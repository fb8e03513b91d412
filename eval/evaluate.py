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

Example: ``saicl-eval --checkpoint runs/saicl --data data/synthetic --k 4,16 --json eval.json``; on N
processes (GPUs or CPU ranks): ``torchrun --nproc_per_node N -m saicl.eval.evaluate ...``.

This module is the command line; the work lives in ``eval_config`` (settings), ``eval_tasks`` (tasks and work
units), ``eval_runner`` (running them), ``distributed`` (ranks), ``eval_summary``, ``eval_tables``, ``result_plots``
and ``eval_checkpoint``. Their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from saicl.config_cli import add_config_flags, config_from_args
from saicl.outputs import validate_output_dir, validate_output_file

from .cli import CLIError, check_device, run_cli, save_json
from .distributed import RankFailedError, World, split_units
from .eval_checkpoint import load_checkpoint
from .eval_config import DEFAULT_SEEDS, EvalConfig, EvalRunOptions
from .eval_runner import evaluate_model, run_task, run_units
from .eval_summary import ORDER_TOLERANCE, TRUNCATION_COUNTED, TaskRun
from .eval_tables import markdown_tables
from .eval_tasks import (
    METRIC_NAME,
    IdenticalSeedsWarning,
    WorkUnit,
    identical_seed_draws,
    load_eval_tasks,
    order_permutation,
    task_kind,
    work_units,
)
from .result_plots import plot_results


def build_parser() -> argparse.ArgumentParser:
    """``saicl-eval``'s flags, generated from :class:`EvalConfig` and :class:`EvalRunOptions`."""
    parser = argparse.ArgumentParser(
        prog="saicl-eval", description=__doc__.split("\n\n")[0],
        epilog="Metrics, tie rule, JSON schema and distributed runs: docs/evaluation.md.",
    )
    add_config_flags(parser.add_argument_group("what to evaluate"), EvalConfig)
    add_config_flags(parser.add_argument_group("how to run"), EvalRunOptions)
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    options = config_from_args(EvalRunOptions, args)
    config = config_from_args(EvalConfig, args)
    check_device(options.device)
    world, device = World.from_env(options.device)
    try:
        return _evaluate_and_write(options, config, world, device)
    finally:
        world.close()


def _evaluate_and_write(options: EvalRunOptions, config: EvalConfig, world: World, device: str) -> int:
    plot_dir = options.plot_dir or (str(Path(options.json).parent) if options.json else None)

    def prepare():
        if world.rank == 0:  # only rank 0 writes; every output path is checked before any work (saicl.outputs)
            if options.json:
                validate_output_file(options.json, "--json")
            if plot_dir:
                validate_output_dir(plot_dir, "--plot-dir" if options.plot_dir else "--json")
        if not Path(config.data).exists():
            raise CLIError(f"--data {config.data}: no such file or folder")
        return load_checkpoint(options.checkpoint, options.tokenizer, options.attn_backend, device, options.dtype,
                               structure=config.structures[0])

    model, tokenizer = world.guard(prepare)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        results = evaluate_model(model, tokenizer, config, show_progress=options.progress, world=world)
    if world.rank != 0:
        return 0
    results["checkpoint"] = options.checkpoint
    print(markdown_tables(results))
    saved = True
    if options.json:  # atomic; if it fails now, the results are saved beside the run (one line on stderr)
        saved = save_json(options.json, results, "--json", "saicl-eval")
        if saved:
            print(f"results: {options.json}")
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


__all__ = ["DEFAULT_SEEDS", "METRIC_NAME", "ORDER_TOLERANCE", "TRUNCATION_COUNTED", "EvalConfig", "EvalRunOptions",
           "IdenticalSeedsWarning", "RankFailedError", "TaskRun", "WorkUnit", "World", "build_parser",
           "evaluate_model", "identical_seed_draws", "load_checkpoint", "load_eval_tasks", "main", "markdown_tables",
           "order_permutation", "plot_results", "run_task", "run_units", "split_units", "task_kind", "work_units"]


if __name__ == "__main__":
    sys.exit(main())
