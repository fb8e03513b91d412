"""``saicl-bench``: speed and peak memory against the number of demonstrations.

For every level (one attention layer, the encoder, the whole model scoring options), pass, structure
(``saicl``, ``full``, ``fid``), backend (and, at the attention level, the dense SDPA baselines and the bare
Triton kernels: :mod:`saicl.eval.bench_providers`) and number of demonstrations, one :class:`BenchCase` is
timed by the one runner (:mod:`saicl.eval.bench_runner`: contenders interleaved, p10/p50/p90) and its peak
memory measured (:mod:`saicl.eval.memory`). Every row carries its structured FLOPs (:mod:`saicl.eval.flops`,
one convention), the versions and the device; rows of ``saicl`` and ``fid`` also carry the measured speed-up
over ``full`` (same level, pass, backend and size), the structured-FLOP ratio (the bound) and the fraction of
the bound reached.

The default sweep is small (a few minutes at most on a 2-core CPU; it prints its size and an estimate
first); ``--full`` is the whole sweep. Flags are generated from :class:`BenchConfig`.

Example: ``saicl-bench --what encoder --demos 4,16,64,128 --json bench.json --csv bench.csv --plot bench.png``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
import time
from dataclasses import dataclass, field

import torch

from saicl.attention.registry import backend_names, resolve_backend_name
from saicl.config_cli import ConfigError, check_at_least, check_choices, config_overrides, field_flag, make_parser
from saicl.outputs import save_results, validate_output_file
from saicl.structures import STRUCTURES

from . import bench_providers
from .bench_cases import DTYPES, LEVELS, PASSES, BenchCase
from .bench_estimate import probe_rate
from .bench_report import CSV_FIELDS, markdown_table, plot_rows, targets, write_csv
from .bench_runner import add_speedups, run_sweep
from .cli import progress_bar, run_cli, write_json
from .machine import loadavg, machine_info
from .memory import memory_limit_bytes

PROG = "saicl-bench"
GiB = 1024**3


def _registered() -> list[str]:
    return [b for b in backend_names() if b != "auto"]


def _backend_choices() -> list[str]:
    return [*_registered(), *bench_providers.PROVIDERS, *bench_providers.ALIASES, "auto", "all"]


def _check_device(value: str) -> None:
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise ConfigError("device", value, f"not a device torch knows ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", value, "only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", value, "CUDA is not available here")


@dataclass
class BenchConfig:
    """A sweep. Its defaults are the default sweep on a CPU; flags are generated from these fields."""

    levels: tuple[str, ...] = field(default=LEVELS, metadata={
        "flag": "--what", "metavar": "LEVELS", "choices": LEVELS,
        "help": "levels: attention (one layer), encoder (model.encoder), model (score_options)"})
    structures: tuple[str, ...] = field(default=("saicl", "full", "fid"), metadata={
        "choices": lambda: sorted(STRUCTURES), "help": "encoder structures"})
    backends: tuple[str, ...] = field(default=("auto",), metadata={
        "choices": _backend_choices,
        "help": "attention backends (auto: the device's default; all: every registered one, unavailable ones "
                "reported as skipped with the reason) and, at the attention level only, the providers sdpa-bias "
                "(dense SDPA with the T5 bias, what Hugging Face T5 does), sdpa (dense, no bias: full only) and "
                "triton-kernel (the bare kernels on packed tokens)"})
    passes: tuple[str, ...] = field(default=("fwd",), metadata={"choices": PASSES, "help": "passes"})
    demos: tuple[int, ...] = field(default=(4, 16, 64), metadata={"help": "demonstration counts"})
    demo_len: int = field(default=64, metadata={"help": "tokens per demonstration"})
    query_len: int = field(default=64, metadata={"help": "tokens of the query"})
    batch: int = field(default=1, metadata={"help": "episodes per call"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=64, metadata={"help": "head dimension"})
    dtype: str = field(default="float32", metadata={"choices": lambda: sorted(DTYPES), "help": "dtype"})
    device: str = field(default="cpu", metadata={"help": "device (the command line's default: cuda if present)"})
    d_model: int = field(default=256, metadata={"help": "model width"})
    d_ff: int = field(default=1024, metadata={"help": "feed-forward width"})
    num_layers: int = field(default=2, metadata={"flag": "--layers", "metavar": "N", "help": "encoder layers"})
    num_decoder_layers: int = field(default=2, metadata={"flag": "--decoder-layers", "metavar": "N",
                                                         "help": "decoder layers"})
    vocab_size: int = field(default=32128, metadata={"help": "vocabulary size (T5's)"})
    n_options: int = field(default=2, metadata={"flag": "--options", "metavar": "N",
                                                "help": "options scored per episode at the model level"})
    option_len: int = field(default=4, metadata={"help": "tokens per option at the model level"})
    repeats: int = field(default=5, metadata={"help": "timed calls per configuration, after one warm-up"})
    budget_s: float = field(default=2.0, metadata={
        "help": "seconds per configuration for the repeats (at least one timed call)"})
    max_call_s: float = field(default=20.0, metadata={
        "help": "skip a size whose time per call, predicted from the previous size scaled by FLOPs, exceeds this"})
    mem_limit_gb: float | None = field(default=None, metadata={
        "help": "memory budget in GiB for the fit check (none: 85%% of the available memory)"})
    measure_memory: bool = field(default=True, metadata={"flag": "--memory", "help": "measure peak memory"})

    def __post_init__(self) -> None:
        for name in ("levels", "structures", "backends", "passes", "demos"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        check_choices(self)
        check_at_least(self, 0, ("demos",))
        check_at_least(self, 1, ("demo_len", "query_len", "batch", "heads", "head_dim", "d_model", "d_ff",
                                 "num_layers", "num_decoder_layers", "vocab_size", "n_options", "option_len",
                                 "repeats"))
        for name in ("budget_s", "max_call_s", "mem_limit_gb"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "expected a positive number")
        _check_device(self.device)
        # aliases resolved once (idempotent: dataclasses.replace runs this again on the result)
        names: list[str] = []
        for name in self.backends:
            if name == "all":
                names += _registered()
            elif name == "auto":
                names.append(resolve_backend_name("auto", self.device, self.head_dim))
            else:
                names.append(bench_providers.canonical(name))
        self.backends = tuple(dict.fromkeys(names))

    @property
    def mem_limit_bytes(self) -> int:
        """The memory budget: ``mem_limit_gb``, else 85% of the available memory (CPU) or the GPU's memory."""
        if self.mem_limit_gb is not None:
            return int(self.mem_limit_gb * GiB)
        return memory_limit_bytes(self.device)

    def cases(self) -> list[BenchCase]:
        """Every configuration of the sweep, series by series, demonstrations ascending.

        Providers (``sdpa-bias``, ``sdpa``, ``triton-kernel``) exist at the attention level only, and ``sdpa``
        computes ``full`` only: other combinations are not configurations.
        """
        return [
            BenchCase(what=what, structure=structure, backend=backend, pass_=pass_, n_demos=n,
                      demo_len=self.demo_len, query_len=self.query_len, batch=self.batch, heads=self.heads,
                      head_dim=self.head_dim, dtype=self.dtype, device=self.device, d_model=self.d_model,
                      d_ff=self.d_ff, num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers,
                      vocab_size=self.vocab_size, n_options=self.n_options, option_len=self.option_len)
            for what in self.levels for pass_ in self.passes for structure in self.structures
            for backend in self.backends for n in sorted(set(self.demos))
            if backend not in bench_providers.PROVIDERS
            or (what == "attention" and bench_providers.runs_structure(backend, structure))
        ]

    def unavailable(self, case: BenchCase) -> str | None:
        """Why ``case``'s backend or provider cannot run on its device (``None``: it can)."""
        if case.backend in bench_providers.PROVIDERS:
            return bench_providers.unavailable_reason(case.backend, case.device)
        from saicl.attention.registry import unavailable_reason

        return unavailable_reason(case.backend, case.device)

    def estimate_s(self, rate_flops: float) -> float:
        """Rough seconds of the sweep where large matmuls run at ``rate_flops`` (:mod:`saicl.eval.bench_estimate`)."""
        from .bench_estimate import estimate_seconds

        return estimate_seconds(self, rate_flops)


# ---------------------------------------------------------------------------------------------------
# Presets: the GPU's sizes, and the full sweep


GPU_PRESET = dict(demos=(4, 16, 64, 256, 1024), dtype="bfloat16", d_model=768, heads=12, head_dim=64, d_ff=3072,
                  num_layers=12, num_decoder_layers=12, max_call_s=30.0)
FULL_PRESET = dict(backends=("all",), demos=(4, 16, 64, 128, 256, 1024, 4096), budget_s=5.0)
FULL_GPU_PRESET = dict(backends=("all",), demos=(4, 16, 64, 256, 1024, 4096, 16384), budget_s=5.0)


def preset(device: str, full: bool) -> dict:
    """The field values the command line uses unless given: GPU sizes on CUDA, and ``--full``'s sweep."""
    cuda = device.startswith("cuda")
    values = dict(GPU_PRESET) if cuda else {}
    if full:
        values.update(FULL_GPU_PRESET if cuda else FULL_PRESET)
    return values


# ---------------------------------------------------------------------------------------------------
# Running


def run_bench(config: BenchConfig, show_progress: bool = True) -> dict:
    """Run a sweep; returns ``{"machine", "config", "rows", "targets"}`` (JSON-ready)."""
    machine = machine_info(config.device)
    start = time.perf_counter()
    cases = config.cases()
    bar = progress_bar(len(cases), "bench", enabled=show_progress)
    memory_bar = None

    def progress(n: int, label: str, total: int | None = None) -> None:
        nonlocal memory_bar
        if label != "memory":
            bar.set_postfix_str(label)
            bar.update(n)
            return
        if memory_bar is None:  # the memory phase: its own bar over the configurations that ran
            bar.close()
            memory_bar = progress_bar(total or 0, "bench memory", enabled=show_progress)
        memory_bar.update(n)

    try:
        rows = run_sweep(cases, repeats=config.repeats, budget_s=config.budget_s, max_call_s=config.max_call_s,
                         limit=config.mem_limit_bytes, measure_memory=config.measure_memory,
                         unavailable=config.unavailable, progress=progress)
    finally:
        bar.close()
        if memory_bar is not None:
            memory_bar.close()
    machine["loadavg_end"] = loadavg()
    machine["wall_s"] = round(time.perf_counter() - start, 1)
    settings = {**dataclasses.asdict(config), "mem_limit_gb": round(config.mem_limit_bytes / GiB, 2)}
    return {"machine": machine, "config": settings, "rows": rows, "targets": targets(rows)}


# ---------------------------------------------------------------------------------------------------
# Command line


OUTPUT_FLAGS = ("--json", "--csv", "--plot")


def _extra_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help=f"the full sweep: every registered backend, demos "
                             f"{','.join(map(str, FULL_PRESET['demos']))} (on CUDA up to "
                             f"{FULL_GPU_PRESET['demos'][-1]}), budget 5 s per configuration; flags given "
                             "explicitly still win")
    parser.add_argument("--json", metavar="PATH", help="write machine info, config, rows and targets as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG (log-log time and memory against demos)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    gpu = ", ".join(f"{field_flag(BenchConfig, k)} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in GPU_PRESET.items())
    epilog = (f"Defaults shown are the CPU's. With CUDA (detected here: {'yes' if cuda else 'no'}) the device "
              f"defaults to cuda and the sizes to one GPU's: {gpu}. Method and row fields: docs/evaluation.md.")
    return make_parser(PROG, BenchConfig, f"{PROG}: speed and peak memory against the number of demonstrations.",
                       epilog=textwrap.fill(epilog, 100, break_on_hyphens=False), extra=_extra_flags)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The sweep the flags ask for (ConfigError naming the flag on bad input); output paths checked first."""
    for flag in OUTPUT_FLAGS:
        path = getattr(args, flag[2:])
        if path is not None:  # before the sweep: a bad path must not cost the run
            validate_output_file(path, flag)
    try:
        given = config_overrides(args, BenchConfig)
        device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        values = {**preset(device, args.full), "device": device, **given}
        return BenchConfig(**values)
    except ConfigError as err:
        err.flag = field_flag(BenchConfig, err.field)
        raise


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    n_cases = len(config.cases())
    rate = probe_rate(config.device)
    estimate = config.estimate_s(rate)
    print(f"{PROG}: {n_cases} configurations, estimated ~{_duration(estimate)} on this machine "
          f"(load {loadavg()}){'' if args.full else '; --full runs the whole sweep'}", flush=True)
    result = run_bench(config, show_progress=not args.no_progress)
    m = result["machine"]
    m["probe_gflops"], m["estimate_s"] = round(rate / 1e9, 1), round(estimate, 1)
    sha = m["git_sha"]
    commit = f" ({sha[:12]}{'-dirty' if sha.endswith('-dirty') else ''})" if sha else ""
    print(f"saicl-bench on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads"
          f"{', ' + m['gpu'] if 'gpu' in m else ''}), torch {m['torch']}, triton {m['triton']}, saicl {m['saicl']}"
          f"{commit}, load {m['loadavg_start']} -> {m['loadavg_end']}, {m['wall_s']} s (estimated "
          f"{_duration(estimate)})\n")
    print(markdown_table(result["rows"]))
    for check in result["targets"]:
        print(f"target: {check['target']}: {'MET' if check['met'] else 'NOT MET'} ({check['value']})")
    saved = True
    writers = (("--json", args.json, lambda tmp: write_json(tmp, result)),
               ("--csv", args.csv, lambda tmp: write_csv(result["rows"], tmp)),
               ("--plot", args.plot, lambda tmp: plot_rows(result["rows"], tmp)))
    for flag, path, write in writers:
        if path is not None:  # a write that fails now keeps the results beside the run (one line on stderr)
            where, ok = save_results(path, write, flag, PROG)
            saved &= ok
            if ok:
                print(f"{flag[2:]}: {where}")
    failed = [r for r in result["rows"] if r["status"] == "error"]
    if failed:
        print(f"{PROG}: {len(failed)} configuration(s) failed; see their 'reason'", file=sys.stderr)
    return 0 if saved and not failed else 1


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``saicl-bench`` (exit code 0 only if no configuration failed)."""
    return run_cli(_run, argv, PROG)


__all__ = ["CSV_FIELDS", "BenchConfig", "add_speedups", "build_parser", "config_from_args", "machine_info", "main",
           "markdown_table", "plot_rows", "preset", "probe_rate", "run_bench", "targets", "write_csv"]


if __name__ == "__main__":
    sys.exit(main())
