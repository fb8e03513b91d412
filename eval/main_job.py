"""``saicl-run`` / ``python -m saicl run``: the whole loop on built-in defaults, one command.

1. meta-train one tiny T5 per structure (``saicl``, ``full``, ``fid``) from the same initialisation with the
   main job's training recipe (fresh synthetic ``noisy`` tasks every episode);
2. evaluate each on held-out tasks (written to ``{out}/data`` in the MetaICL layout) under its own structure
   at k = 4..1024: MetaICL's 5 evaluation seeds, order sensitivity, encoder time per episode; ``full`` only
   where it fits the memory and time rule (the report says where it stopped and why);
3. run a small speed/memory benchmark (saicl-bench, quick settings);
4. write ``{out}/report.md`` (scaling plot with error bars beside encoder time, training curves, a claims
   table computed from the run) and ``{out}/results.json``.

The default job trains one seed per structure (about 10 minutes on an idle 2-core CPU, more on a busy machine);
``--study`` trains ``--study-seeds`` seeds per structure and reports mean ± std over training seeds and over
evaluation seeds separately (several times longer).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saicl.config_cli import ConfigError, check_at_least, check_choices, config_from_args, make_parser
from saicl.outputs import OwnedDir, check_ownership, validate_output_file

from .cli import progress_bar, run_cli, save_json

TOOL = "saicl-run"
LEGACY_MARKER = ".saicl-report"  # the marker of report folders written before saicl.outputs existed
# Everything the job writes into --out: only these entries, and only if this job wrote them, are replaced.
ARTEFACTS = ("runs", "data", "results.json", "report.md", "bench.csv", "bench_attention.png", "bench_encoder.png",
             "bench_model.png", "eval_scaling.png", "eval_structures.png", "train_loss.png",
             "train_heldout_accuracy.png")
STUDY_ARTEFACTS = ARTEFACTS

# The main job's training recipe (docs/meta_training.md): the TrainConfig fields it changes from saicl-train's
# defaults. In `noisy-keys` several demonstrations must out-vote flipped labels, so accuracy can rise with k;
# a curriculum from k = 2 to 8; one torch thread (on a busy 2-core machine two threads wait on each other).
RECIPE: dict = {"data": "synthetic:noisy-keys", "k": "2-8", "k_start": 2, "k_warmup_steps": 400, "batch_size": 64,
                "lr": 3e-3, "warmup_steps": 200, "max_steps": 2000, "eval_k": 8, "eval_steps": 250, "threads": 1}
HELD_OUT_POOL = 2048  # demonstration candidates per held-out task (lookup tasks have their fixed keys instead)


def _structures() -> list[str]:
    from saicl.structures import STRUCTURES

    return sorted(STRUCTURES)


def _families() -> list[str]:
    from saicl.meta_train.synthetic import FAMILIES

    return sorted(FAMILIES)


def _backends() -> list[str]:
    from saicl.attention.registry import backend_names

    return backend_names()


@dataclass
class MainJobConfig:
    """The main job's settings; ``saicl-run``'s flags are generated from these fields (``eval_k`` -> ``--eval-k``).

    Validated on construction (:class:`ConfigError` naming the field; the CLI names the flag and exits 2),
    including what would otherwise fail after training: k against the held-out pools, bench backends against
    this machine.
    """

    out: str = field(default="saicl-report", metadata={
        "help": "report folder; reused only if a previous saicl-run wrote it"})
    train: bool = field(default=True, metadata={
        "help": "meta-train the models (--no-train: evaluate untrained weights)"})
    structures: tuple[str, ...] = field(default=("saicl", "full", "fid"), metadata={
        "help": "structures to train and evaluate", "choices": _structures})
    max_steps: int | None = field(default=None, metadata={
        "help": "meta-training steps per structure (none: the recipe's)"})
    seed: int = field(default=0, metadata={"help": "training seed (initialisation and data) of the first model"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads for training and evaluation (none: the recipe's, else torch's choice)"})
    study: bool = field(default=False, metadata={
        "help": "train --study-seeds seeds per structure and report mean ± std over training seeds"})
    study_seeds: int = field(default=3, metadata={"help": "training seeds per structure with --study"})
    eval_k: tuple[int, ...] = field(default=(4, 16, 64, 256, 1024), metadata={
        "help": "demonstration counts to evaluate (full: only where it fits, see --full-max-s)"})
    eval_seeds: tuple[int, ...] = field(default=(100, 13, 21, 42, 87), metadata={
        "help": "demonstration seeds (MetaICL's five by default)"})
    eval_orders: int = field(default=2, metadata={
        "help": "demonstration orders per seed for the order-sensitivity check (1: off)"})
    eval_tasks: int = field(default=2, metadata={"help": "held-out tasks per family"})
    eval_queries: int = field(default=10, metadata={"help": "queries per held-out task"})
    eval_families: tuple[str, ...] = field(default=("noisy-keys",), metadata={
        "help": "synthetic families of the held-out tasks", "choices": _families})
    eval_batch_size: int = field(default=16, metadata={"help": "episodes per evaluation batch"})
    full_max_s: float = field(default=60.0, metadata={
        "help": "evaluate full at a k only if its predicted time for that k is within this many seconds"})
    bench: bool = field(default=True, metadata={"help": "run the speed/memory benchmark (--no-bench: skip)"})
    bench_what: tuple[str, ...] = field(default=("attention", "encoder"), metadata={
        "help": "benchmark levels", "choices": ("attention", "encoder", "model")})
    bench_demos: tuple[int, ...] = field(default=(4, 16, 64, 128), metadata={
        "help": "demonstration counts of the benchmark"})
    bench_backends: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "benchmark attention backends, as saicl-bench --backends (checked against this machine)"})
    bench_max_call_s: float = field(default=5.0, metadata={
        "help": "skip benchmark sizes predicted to take longer than this per call"})
    bench_d_model: int = field(default=256, metadata={
        "help": "benchmark model width (heads = d_model / 64, d_ff = 4 d_model)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars (--no-progress: hide them)"})

    def __post_init__(self):
        check_choices(self)
        check_at_least(self, 1, ("max_steps", "threads", "eval_k", "eval_orders", "eval_tasks", "eval_queries",
                                 "eval_batch_size", "bench_demos", "bench_d_model"))
        check_at_least(self, 2, ("study_seeds",))
        check_at_least(self, 0, ("seed",))
        for name in ("full_max_s", "bench_max_call_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, getattr(self, name), "expected a positive number of seconds")
        if len(set(self.eval_seeds)) != len(self.eval_seeds):
            raise ConfigError("eval_seeds", self.eval_seeds, "expected distinct seeds")
        if self.bench:
            self.bench_config()  # the benchmark's own checks, now rather than after training
            self._check_backends_here()
        largest = held_out_pool_size(self)
        too_big = [k for k in self.eval_k if k > largest]
        if too_big:
            raise ConfigError("eval_k", self.eval_k, f"the held-out {'/'.join(self.eval_families)} tasks have "
                              f"{largest} demonstration candidates; use values <= {largest}")

    def bench_config(self):
        """The benchmark's ``BenchConfig`` (a ConfigError names this job's field, e.g. ``bench_backends``)."""
        from .bench import BenchConfig

        d = self.bench_d_model
        try:
            return BenchConfig(levels=self.bench_what, backends=self.bench_backends, demos=self.bench_demos,
                               d_model=d, d_ff=4 * d, heads=max(1, d // 64), head_dim=64, repeats=3, budget_s=1.0,
                               max_call_s=self.bench_max_call_s,
                               device="cuda" if torch.cuda.is_available() else "cpu")
        except ConfigError as err:
            name = {"levels": "bench_what", "backends": "bench_backends", "demos": "bench_demos",
                    "max_call_s": "bench_max_call_s"}.get(err.field, f"bench_{err.field}")
            raise ConfigError(name, getattr(self, name, err.value), err.expected) from None

    def _check_backends_here(self) -> None:
        from saicl.attention.registry import available_backends

        device = "cuda" if torch.cuda.is_available() else "cpu"
        reasons = available_backends(device)
        missing = {b: reasons.get(b) for b in self.bench_config().backends if reasons.get(b)}
        if missing:
            raise ConfigError("bench_backends", self.bench_backends, "unavailable on this machine: "
                              + "; ".join(f"{b} ({why})" for b, why in missing.items()))

    @property
    def training_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.study_seeds if self.study else 1))

    def replace(self, **changes) -> MainJobConfig:
        return dataclasses.replace(self, **changes)


def held_out_collection(config: MainJobConfig, out_dir: str | Path, n_queries: int | None = None) -> Path:
    """Write the held-out task collection (deterministic; ``HELD_OUT_POOL`` demonstration candidates per task for
    the families that draw examples, so k = 1024 leaves room for the evaluation seeds to draw different sets)."""
    from saicl.meta_train.synthetic import write_synthetic_collection

    return write_synthetic_collection(out_dir, seed=0, families=config.eval_families, n_train_tasks=0,
                                      n_test_tasks=config.eval_tasks,
                                      n_queries=config.eval_queries if n_queries is None else n_queries,
                                      n_examples=HELD_OUT_POOL)


def held_out_pool_size(config: MainJobConfig) -> int:
    """The smallest demonstration pool of the held-out tasks (built in a temporary folder: well under a second)."""
    from saicl.meta_train.data import load_tasks

    with tempfile.TemporaryDirectory(prefix="saicl-run-check-") as tmp:
        data = held_out_collection(config, tmp, n_queries=1)
        return min(len(task.train) for task in load_tasks(data, split="test", k=0).values())


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


def train_config(config: MainJobConfig, out: Path):
    """The TrainConfig of the job's models: saicl-train's defaults, the RECIPE, then the job's flags."""
    from saicl.meta_train.config import TrainConfig

    base = TrainConfig(output_dir=str(out / "runs"), progress=config.progress, **RECIPE)
    changes = {}
    if config.threads is not None:
        changes["threads"] = config.threads
    if config.max_steps is not None and config.max_steps != base.max_steps:
        # Keep the schedule meaningful for short runs: warm-up, evaluation and saving within the run.
        steps = config.max_steps
        changes.update(
            max_steps=steps, warmup_steps=min(base.warmup_steps, max(0, steps // 5)),
            k_warmup_steps=min(base.k_warmup_steps, max(0, steps // 2)),
            eval_steps=min(base.eval_steps, max(1, steps // 4)) if base.eval_steps else 0,
            save_steps=min(base.save_steps, steps), logging_steps=min(base.logging_steps, max(1, steps // 10)),
        )
    return base.replace(**changes)


def run_dir(out: Path, config: MainJobConfig, structure: str, seed: int) -> Path:
    """``runs/{structure}`` for the default job, ``runs/seed{seed}/{structure}`` for a study."""
    return out / "runs" / structure if not config.study else out / "runs" / f"seed{seed}" / structure


class JobProgress:
    """The job's overall bar: its total is the estimated seconds of every phase, so tqdm's elapsed/remaining
    is an estimate of the whole job (training steps at ``S_PER_STEP``, evaluation episodes by k)."""

    S_PER_STEP = 0.08  # CPU time per step of the recipe (1 thread), measured by docs/meta_training.md's runs
    BENCH_S = 40.0

    def __init__(self, config: MainJobConfig, steps: int):
        self.config = config
        self.train_s = steps * self.S_PER_STEP if config.train else 0.0
        episodes = config.eval_tasks * config.eval_queries * len(config.eval_seeds) * config.eval_orders
        self.eval_s = {k: episodes * (0.02 + 2.5e-4 * k) for k in config.eval_k}
        n_models = len(config.training_seeds)
        total = n_models * len(config.structures) * (self.train_s + sum(self.eval_s.values()))
        total += self.BENCH_S if config.bench else 0.0
        # The estimate is in the description: tqdm's own "remaining" is unknown until the first phase ends.
        minutes, seconds = divmod(round(total), 60)
        self.bar = progress_bar(round(total), f"saicl-run (estimated {minutes:02d}:{seconds:02d})",
                                enabled=config.progress)
        self.bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| elapsed {elapsed}, remaining ~{remaining} {postfix}"
        self.done = 0.0

    def advance(self, seconds: float, what: str) -> None:
        self.done += seconds
        self.bar.set_postfix_str(what)
        self.bar.n = min(round(self.done), self.bar.total)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def train_models(config: MainJobConfig, out: Path, progress: JobProgress, seeds: tuple[int, ...] | None = None
                 ) -> tuple[dict, dict, dict, list[str]]:
    """Meta-train one model per structure and training seed (``seeds``; default: every training seed).

    Returns:
        ``(paths, results, train config, notes)``: ``paths[seed][structure]`` is the checkpoint to evaluate,
        ``results[seed][structure]`` the ``TrainResult.to_dict()``.
    """
    from saicl.meta_train.train import train

    base = train_config(config, out)
    paths, results, notes = {}, {}, []
    for seed in config.training_seeds if seeds is None else seeds:
        paths[seed], results[seed] = {}, {}
        for structure in config.structures:
            result = train(base.replace(structure=structure, seed=seed,
                                        output_dir=str(run_dir(out, config, structure, seed))))
            progress.advance(progress.train_s, f"trained {structure} seed {seed}")
            results[seed][structure] = result.to_dict()
            path = result.model_dir or result.last_checkpoint
            if result.model_dir is None:
                notes.append(f"training `{structure}` (seed {seed}) stopped early ({result.message}); evaluated "
                             "its last checkpoint")
            if path is None:
                notes.append(f"training `{structure}` (seed {seed}) produced no checkpoint; it is not evaluated")
                continue
            paths[seed][structure] = path
    return paths, results, base.to_dict(), notes


def _load(source, structure: str):
    from transformers import AutoTokenizer, ByT5Tokenizer

    from saicl.checkpoints import load_model

    if not isinstance(source, str):
        return source
    model = load_model(source, f"the trained {structure} model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = ByT5Tokenizer()
    return model, tokenizer


def evaluate_models(config: MainJobConfig, sources: dict, data: Path, progress: JobProgress) -> dict:
    """Scaling evaluation of every model (``sources[seed][structure]``: a checkpoint path or ``(model, tok)``).

    Returns:
        ``{seed: evaluate_scaling(...) result}``.
    """
    from .scaling import ScalingSettings, evaluate_scaling

    settings = ScalingSettings(ks=config.eval_k, seeds=config.eval_seeds, orders=config.eval_orders,
                               queries=config.eval_queries, batch_size=config.eval_batch_size,
                               full_max_s=config.full_max_s)
    results = {}
    for seed, models in sources.items():
        loaded = {structure: _load(source, structure) for structure, source in models.items()}
        label = f"seed {seed} " if config.study else ""
        results[seed] = evaluate_scaling(
            loaded, str(data), settings, show_progress=config.progress, label=label,
            on_done=lambda s, k, seed=seed: progress.advance(progress.eval_s[k], f"evaluated {s} k={k} seed {seed}"))
    return results


def bench_command(config: MainJobConfig) -> str:
    """The saicl-bench command line that reproduces the job's benchmark."""
    b = config.bench_config()
    return (f"saicl-bench --what {','.join(b.levels)} --backends {','.join(b.backends)} "
            f"--demos {','.join(map(str, b.demos))} --d-model {b.d_model} --d-ff {b.d_ff} --heads {b.heads} "
            f"--head-dim {b.head_dim} --repeats {b.repeats} --budget-s {b.budget_s:g} --max-call-s {b.max_call_s:g}")


def run_benchmark(config: MainJobConfig, out: Path, notes: list[str]) -> dict:
    from .bench import plot_rows, run_bench, write_csv

    result = run_bench(config.bench_config(), show_progress=config.progress)
    _write_or_note(notes, "bench.csv", lambda: write_csv(result["rows"], out / "bench.csv"))
    for what in config.bench_what:
        name = f"bench_{what}.png"
        _write_or_note(notes, name, lambda name=name, what=what: plot_rows(result["rows"], out / name, what=what))
    return result


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

    The config validated itself on construction; ``--out`` is checked, then claimed and locked for the run.
    """
    start = time.perf_counter()
    check_ownership(config.out, TOOL, "--out", adopt=lambda folder: (folder / LEGACY_MARKER).is_file())
    out = Path(config.out)
    with claim_out_dir(out):
        return _run_job(config, command, out, start)


def _run_job(config: MainJobConfig, command: str, out: Path, start: float) -> dict:
    from saicl import __version__

    from .bench import machine_info
    from .machine import loadavg
    from .report import write_plots, write_report
    from .study import analyse

    notes: list[str] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = train_config(config, out)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    machine = machine_info(device)  # at the start: its load average is the load the job started under
    progress = JobProgress(config, recipe.max_steps)
    phases, training, scaling, train_dict, bench = {"meta-training": 0.0, "evaluation": 0.0}, {}, {}, None, None
    try:
        data = held_out_collection(config, out / "data")
        if not config.train:
            notes.append("training was switched off (--no-train): the models below are UNTRAINED (random "
                         "initialisation); their accuracy is chance by construction")
        # one training seed at a time, trained then evaluated: an interrupted study keeps its finished seeds
        for seed in config.training_seeds:
            try:
                t = time.perf_counter()
                if config.train:
                    sources, results, train_dict, train_notes = train_models(config, out, progress, seeds=(seed,))
                else:
                    from saicl.meta_train.models import build_model

                    sources, results, train_notes = {seed: {s: build_model("tiny", s, seed=seed)
                                                            for s in config.structures}}, {}, []
                phases["meta-training"] += time.perf_counter() - t
                t = time.perf_counter()
                evaluated = evaluate_models(config, sources, data, progress)
                phases["evaluation"] += time.perf_counter() - t
            except KeyboardInterrupt:
                if not scaling:
                    raise
                notes.append(f"interrupted during training seed {seed}: the report covers the finished training "
                             f"seeds {', '.join(map(str, scaling))} only")
                break
            notes += train_notes
            training.update(results)
            scaling.update(evaluated)
        else:
            if config.bench:
                t = time.perf_counter()
                bench = run_benchmark(config, out, notes)
                phases["benchmark"] = time.perf_counter() - t
                progress.advance(progress.BENCH_S, "benchmark done")
    finally:
        progress.close()
    machine["loadavg_end"] = loadavg()
    summary = {
        "command": command, "version": __version__, "machine": machine, "config": asdict(config),
        "training_seeds": list(scaling), "notes": notes, "phases": phases, "train_config": train_dict,
        "training": {str(seed): r for seed, r in training.items()},
        "eval_description": (
            f"Held-out tasks: {config.eval_tasks} fresh synthetic `{'`, `'.join(config.eval_families)}` task(s) "
            f"per family (`{data}`; never seen in training), {config.eval_queries} queries each, evaluation seeds "
            f"{', '.join(map(str, config.eval_seeds))}, k in {list(config.eval_k)}; each model under its own "
            f"structure. Metric: macro-F1 over the gold classes (mean / worst over evaluation seeds); order "
            f"sensitivity over {config.eval_orders} demonstration orders per seed."
        ),
        "scaling": {str(seed): r for seed, r in scaling.items()},
        "bench": bench, "bench_command": bench_command(config) if bench else "",
    }
    summary["analysis"] = analyse(summary)
    _write_or_note(notes, "the plots", lambda: write_plots(out, summary))
    summary["wall_s"] = time.perf_counter() - start
    # results.json first (beside the run if --out cannot be written now), then the report that renders it
    saved = save_json(out / "results.json", summary, "--out", TOOL)
    saved &= _write_or_note(notes, "report.md", lambda: write_report(out, summary))
    summary["report_written"] = saved
    return summary


def _extra_flags(parser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the summary JSON to PATH")


def build_parser():
    return make_parser(TOOL, MainJobConfig, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]), extra=_extra_flags)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:
        validate_output_file(args.json, "--json")
    config = config_from_args(MainJobConfig, args)  # every flag checked here, before anything runs
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
