"""``saicl-run`` / ``python -m saicl run``: the whole loop on built-in defaults, one command.

1. meta-train one tiny T5 per structure (``saicl``, ``full``, ``fid``) from the same initialisation with the
   meta-training pipeline's default run (synthetic associative-recall tasks, fresh tasks every episode);
2. evaluate each on held-out synthetic tasks (written to ``{out}/data`` in the MetaICL layout) under its own
   structure: 5 seeds, several k, order sensitivity;
3. run a small speed/memory benchmark (one attention layer and the encoder, against the number of
   demonstrations);
4. write ``{out}/report.md`` with the tables and plots, and ``{out}/results.json``.

About 6-8 minutes on an idle 2-core CPU with the defaults (more on a busy machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saicl.outputs import OwnedDir, check_ownership, validate_output_file

from .cli import CLIError, comma_ints, comma_names, run_cli, save_json

TOOL = "saicl-run"
LEGACY_MARKER = ".saicl-report"  # the marker of report folders written before saicl.outputs existed
# Everything the job writes into --out: only these entries, and only if this job wrote them, are replaced.
ARTEFACTS = ("runs", "data", "results.json", "report.md", "bench.csv", "bench_attention.png", "bench_encoder.png",
             "bench_model.png", "eval_scaling.png", "eval_structures.png", "train_loss.png",
             "train_heldout_accuracy.png")


@dataclass
class MainJobConfig:
    """The main job's settings (flags map onto these)."""

    out: str = "saicl-report"
    train: bool = True
    structures: tuple[str, ...] = ("saicl", "full", "fid")
    # Fewer than saicl-train's default (TrainConfig.max_steps) so the whole job stays at ~6-8 minutes on
    # 2 idle CPU cores (more on a busy machine). None: saicl-train's default.
    max_steps: int | None = 1200
    eval_k: tuple[int, ...] = (2, 4)
    eval_seeds: tuple[int, ...] = (100, 13, 21, 42, 87)
    eval_orders: int = 2
    eval_tasks: int = 4
    eval_queries: int = 32
    eval_families: tuple[str, ...] = ("lookup",)
    bench: bool = True
    bench_what: tuple[str, ...] = ("attention", "encoder")
    bench_demos: tuple[int, ...] = (4, 16, 64, 128, 256)
    bench_backends: tuple[str, ...] = ("torch",)
    bench_max_call_s: float = 10.0
    bench_d_model: int = 256
    progress: bool = True


def claim_out_dir(out: Path) -> OwnedDir:
    """Claim ``out`` for this run (created if needed, locked until released): an existing folder is reused only
    if saicl-run wrote it, and only the job's own files in it are replaced (its old runs and data are cleared).

    Raises:
        OwnershipError naming --out: the folder holds the user's files, or another run is writing into it.
    """
    owned = OwnedDir.claim(out, TOOL, "--out", adopt=lambda folder: (folder / LEGACY_MARKER).is_file())
    try:
        owned.check_free(ARTEFACTS)
        owned.record(*ARTEFACTS)
        for child in ("runs", "data"):
            owned.remove(child)
    except BaseException:
        owned.release()
        raise
    return owned


def validate_config(config: MainJobConfig) -> None:
    """Every setting checked before the expensive phases (CLIError / OutputPathError naming the flag)."""
    from saicl.attention.registry import backend_names
    from saicl.meta_train.data import load_tasks
    from saicl.meta_train.synthetic import write_synthetic_collection

    check_ownership(config.out, TOOL, "--out", adopt=lambda folder: (folder / LEGACY_MARKER).is_file())
    if config.bench:
        comma_names(",".join(config.bench_backends), "--bench-backends", backend_names())
    # The held-out collection is tiny and deterministic: build it once here to learn its pool sizes.
    with tempfile.TemporaryDirectory(prefix="saicl-run-check-") as tmp:
        data = write_synthetic_collection(tmp, seed=0, families=config.eval_families, n_train_tasks=1,
                                          n_test_tasks=config.eval_tasks, n_queries=1)
        largest = max(len(task.train) for task in load_tasks(data, split="test", k=0).values())
    too_big = [k for k in config.eval_k if k > largest]
    if too_big:
        raise CLIError(f"--eval-k {','.join(map(str, too_big))}: the held-out {'/'.join(config.eval_families)} "
                       f"tasks have {largest} demonstration candidates; use values <= {largest}")


def train_models(config: MainJobConfig, out: Path) -> tuple[dict, dict, dict, list[str]]:
    """Meta-train one model per structure; returns ``(models, training results, train config, notes)``."""
    from saicl.meta_train.train import TrainConfig, train

    train_config = TrainConfig(output_dir=str(out / "runs"), progress=config.progress)
    if config.max_steps is not None:
        # Keep the schedule meaningful for short runs: warm-up, evaluation and saving within the run.
        steps = config.max_steps
        train_config = train_config.replace(
            max_steps=steps, warmup_steps=min(train_config.warmup_steps, max(0, steps // 5)),
            eval_steps=min(train_config.eval_steps, max(1, steps // 4)) if train_config.eval_steps else 0,
            save_steps=min(train_config.save_steps, steps),
            logging_steps=min(train_config.logging_steps, max(1, steps // 10)),
        )
    models, results, notes = {}, {}, []
    for structure in config.structures:
        result = train(train_config.replace(structure=structure, output_dir=str(out / "runs" / structure)))
        results[structure] = result.to_dict()
        path = result.model_dir or result.last_checkpoint
        if result.model_dir is None:
            notes.append(f"training `{structure}` stopped early ({result.message}); evaluated its last checkpoint")
        if path is None:
            notes.append(f"training `{structure}` produced no checkpoint; it is not evaluated")
            continue
        models[structure] = path
    return models, results, train_config.to_dict(), notes


def evaluate_models(config: MainJobConfig, models: dict, data: Path, out: Path, notes: list[str] | None = None) -> dict:
    """Evaluate each model under its own structure; returns one merged result (a column per model).

    Writes ``eval_scaling.png`` (metric against k) and ``eval_structures.png`` into ``out``.
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    from saicl.checkpoints import load_model

    from .evaluate import EvalConfig, evaluate_model, plot_results

    merged: dict = {}
    notes = [] if notes is None else notes
    for structure, source in models.items():
        if isinstance(source, str):
            model = load_model(source, f"the trained {structure} model")
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError, TypeError):
                tokenizer = ByT5Tokenizer()
        else:
            model, tokenizer = source
        eval_config = EvalConfig(data=str(data), structures=(structure,), seeds=config.eval_seeds,
                                 ks=config.eval_k, orders=config.eval_orders, batch_size=64,
                                 max_demo_tokens=64, max_query_tokens=64)
        result = evaluate_model(model, tokenizer, eval_config, show_progress=config.progress, label=structure)
        if not merged:
            merged = result
            merged["config"]["structures"] = list(models)
        else:
            for key in ("rows", "overall", "order", "skipped", "identical_seeds"):
                merged[key] = merged.get(key, []) + result.get(key, [])
            # every structure draws the same demonstrations: list each (task, k) once
            merged["identical_seeds"] = list({(i["task"], i["k"]): i for i in merged["identical_seeds"]}.values())
            for key, value in result["truncation"].items():
                merged["truncation"][key] += value
    _write_or_note(notes, "the evaluation plots",
                   lambda: plot_results(merged, out, title="Held-out metric (each model under its own structure)"))
    return merged


def run_benchmark(config: MainJobConfig, out: Path, notes: list[str]) -> tuple[dict, str]:
    from .bench import BenchConfig, plot_rows, run_bench, write_csv

    bench_config = BenchConfig(
        levels=config.bench_what, backends=config.bench_backends, demos=config.bench_demos,
        d_model=config.bench_d_model, d_ff=4 * config.bench_d_model, heads=max(1, config.bench_d_model // 64),
        head_dim=64, repeats=3, budget_s=2.0, max_call_s=config.bench_max_call_s,
    )
    command = (f"saicl-bench --what {','.join(config.bench_what)} --backends {','.join(config.bench_backends)} "
               f"--demos {','.join(map(str, config.bench_demos))} --d-model {bench_config.d_model} "
               f"--d-ff {bench_config.d_ff} --heads {bench_config.heads} --head-dim 64 --repeats 3 --budget-s 2 "
               f"--max-call-s {config.bench_max_call_s:g}")
    result = run_bench(bench_config, show_progress=config.progress)
    _write_or_note(notes, "bench.csv", lambda: write_csv(result["rows"], out / "bench.csv"))
    for what in config.bench_what:
        name = f"bench_{what}.png"
        _write_or_note(notes, name, lambda name=name, what=what: plot_rows(result["rows"], out / name, what=what))
    return result, command


def _write_or_note(notes: list[str], name: str, write) -> bool:
    """Write one report file; if the machine refuses (disk full, ...), say so in one line and carry on: the
    results are still written to results.json (or beside the run)."""
    try:
        write()
        return True
    except OSError as err:
        note = f"could not write {name} ({err.strerror or err})"
        print(f"{TOOL}: error: {note}", file=sys.stderr)
        notes.append(note)
        return False


def run_main_job(config: MainJobConfig, command: str = "saicl-run") -> dict:
    """Run the whole loop; returns the summary (also written to ``{out}/results.json``).

    Every setting is checked first (:func:`validate_config`); ``--out`` is then claimed and locked for the run.
    """
    start = time.perf_counter()
    validate_config(config)
    out = Path(config.out)
    with claim_out_dir(out):
        return _run_job(config, command, out, start)


def _run_job(config: MainJobConfig, command: str, out: Path, start: float) -> dict:
    from saicl import __version__
    from saicl.meta_train.synthetic import write_synthetic_collection

    from .bench import machine_info
    from .report import training_plots, write_report

    phases, notes = {}, []
    device = "cuda" if torch.cuda.is_available() else "cpu"

    t = time.perf_counter()
    data = write_synthetic_collection(out / "data", seed=0, families=config.eval_families,
                                      n_train_tasks=1, n_test_tasks=config.eval_tasks, n_queries=config.eval_queries)
    training, train_config = {}, None
    if config.train:
        try:
            models, training, train_config, train_notes = train_models(config, out)
            notes += train_notes
        except ImportError as err:
            notes.append(f"the meta-training pipeline is not available ({err}): the models below are UNTRAINED "
                         "(random initialisation); their accuracy is chance by construction")
            config.train = False
    if not config.train:
        from saicl.meta_train.models import build_model

        if not notes:
            notes.append("training was switched off (--no-train): the models below are UNTRAINED (random "
                         "initialisation); their accuracy is chance by construction")
        models = {s: build_model("tiny", s, seed=0) for s in config.structures}
    phases["meta-training"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate_models(config, models, data, out, notes)
    phases["evaluation"] = time.perf_counter() - t
    bench, bench_command = None, ""
    if config.bench:
        t = time.perf_counter()
        bench, bench_command = run_benchmark(config, out, notes)
        phases["benchmark"] = time.perf_counter() - t
    if training:
        _write_or_note(notes, "the training plots", lambda: training_plots(training, out))
    summary = {
        "command": command, "version": __version__, "machine": machine_info(device), "config": asdict(config),
        "notes": notes, "phases": phases, "train_config": train_config, "training": training,
        "eval_description": (
            f"Held-out tasks: {config.eval_tasks} fresh synthetic `{'`, `'.join(config.eval_families)}` tasks "
            f"(`{data}`; never seen in training, each with its own key-to-label mapping), {config.eval_queries} "
            f"queries each, seeds {', '.join(map(str, config.eval_seeds))}, k in {list(config.eval_k)}; each model "
            f"under its own structure. Metric: macro-F1 over the gold classes (mean / worst over seeds); order "
            f"sensitivity over {config.eval_orders} demonstration orders per seed."
        ),
        "evaluation": evaluation, "bench": bench, "bench_command": bench_command,
    }
    summary["wall_s"] = time.perf_counter() - start
    # results.json first (beside the run if --out cannot be written now), then the report that renders it
    saved = save_json(out / "results.json", summary, "--out", TOOL)
    saved &= _write_or_note(notes, "report.md", lambda: write_report(out, summary))
    summary["report_written"] = saved
    return summary


def build_parser() -> argparse.ArgumentParser:
    from saicl.meta_train.config import TrainConfig

    d = MainJobConfig()
    parser = argparse.ArgumentParser(prog="saicl-run", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=d.out, help=f"report folder (default: ./{d.out}); reused only if a "
                        "previous saicl-run wrote it")
    parser.add_argument("--max-steps", type=int, default=d.max_steps,
                        help=f"meta-training steps per structure (default: {d.max_steps}; saicl-train's own default is "
                        f"{TrainConfig().max_steps})")
    parser.add_argument("--no-train", action="store_true", help="skip meta-training: evaluate untrained weights")
    parser.add_argument("--structures", default=",".join(d.structures), help="structures to train and evaluate")
    parser.add_argument("--eval-k", default=",".join(map(str, d.eval_k)), help="demonstration counts to evaluate")
    parser.add_argument("--eval-seeds", default=",".join(map(str, d.eval_seeds)), help="demonstration seeds")
    parser.add_argument("--eval-orders", type=int, default=d.eval_orders,
                        help="demonstration orders per seed for the order-sensitivity check (1: off)")
    parser.add_argument("--eval-tasks", type=int, default=d.eval_tasks, help="held-out tasks per family")
    parser.add_argument("--eval-queries", type=int, default=d.eval_queries, help="queries per held-out task")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed/memory benchmark")
    parser.add_argument("--bench-demos", default=",".join(map(str, d.bench_demos)),
                        help="demonstration counts of the benchmark")
    parser.add_argument("--bench-what", default=",".join(d.bench_what),
                        help="benchmark levels (attention,encoder,model)")
    parser.add_argument("--bench-backends", default=",".join(d.bench_backends), help="benchmark attention backends")
    parser.add_argument("--bench-max-call-s", type=float, default=d.bench_max_call_s,
                        help="skip benchmark sizes predicted to take longer than this per call")
    parser.add_argument("--bench-d-model", type=int, default=d.bench_d_model,
                        help="benchmark model width (heads = d_model / 64, d_ff = 4 d_model)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _run(argv: list[str] | None) -> int:
    from saicl.structures import STRUCTURES

    args = build_parser().parse_args(argv)
    if args.json is not None:
        validate_output_file(args.json, "--json")
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be >= 1, got {args.max_steps}")
    for flag, value in (("--eval-orders", args.eval_orders), ("--eval-tasks", args.eval_tasks),
                        ("--eval-queries", args.eval_queries), ("--bench-d-model", args.bench_d_model)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    config = MainJobConfig(
        out=args.out, train=not args.no_train,
        structures=tuple(comma_names(args.structures, "--structures", sorted(STRUCTURES))),
        max_steps=args.max_steps, eval_k=tuple(comma_ints(args.eval_k, "--eval-k", minimum=0)),
        eval_seeds=tuple(comma_ints(args.eval_seeds, "--eval-seeds")), eval_orders=args.eval_orders,
        eval_tasks=args.eval_tasks, eval_queries=args.eval_queries, bench=not args.no_bench,
        bench_what=tuple(comma_names(args.bench_what, "--bench-what", ["attention", "encoder", "model"])),
        bench_demos=tuple(comma_ints(args.bench_demos, "--bench-demos", minimum=0)),
        bench_backends=tuple(comma_names(args.bench_backends, "--bench-backends")),
        bench_max_call_s=args.bench_max_call_s, bench_d_model=args.bench_d_model, progress=not args.no_progress,
    )
    flags = argv if argv is not None else sys.argv[1:]
    summary = run_main_job(config, command=" ".join(["saicl-run", *flags]))
    saved = summary["report_written"]
    if args.json:
        saved &= save_json(args.json, summary, "--json", TOOL, beside=[config.out])
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"saicl-run: done in {summary['wall_s']:.0f} s. Report: {Path(config.out).resolve() / 'report.md'}")
    return 0 if saved else 1


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``saicl-run`` (exit code 0 only on success)."""
    return run_cli(_run, argv, TOOL)


if __name__ == "__main__":
    sys.exit(main())
