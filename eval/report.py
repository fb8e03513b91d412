"""The main job's report folder: ``report.md`` with the tables and the plots beside it."""

from __future__ import annotations

import math
from pathlib import Path

from saicl.outputs import atomic_write_text

from .bench import markdown_table as bench_table
from .evaluate import markdown_tables as eval_tables
from .plots import line_plot


def training_plots(training: dict[str, dict], out_dir: Path) -> list[Path]:
    """Training loss and held-out accuracy against the step, one line per structure."""
    written = []
    losses = {s: [(step, loss) for step, loss in r.get("losses", [])] for s, r in training.items()}
    if any(losses.values()):
        written.append(line_plot(losses, None, out_dir / "train_loss.png", xlabel="optimizer step",
                                 ylabel="training loss", title="Meta-training loss", logy=True))
    accuracy = {s: [(e["step"], e["accuracy"]) for e in r.get("evals", []) if "accuracy" in e]
                for s, r in training.items()}
    chance = {s: [(e["step"], e["chance"]) for e in r.get("evals", []) if "chance" in e] for s, r in training.items()}
    if any(accuracy.values()):
        written.append(line_plot(accuracy, chance, out_dir / "train_heldout_accuracy.png", xlabel="optimizer step",
                                 ylabel="held-out accuracy (dashed: chance)",
                                 title="Held-out accuracy during training"))
    return written


def _training_table(training: dict[str, dict]) -> list[str]:
    lines = ["| structure | steps | wall time (s) | last logged loss | held-out accuracy (chance) | stopped |",
             "|---|---|---|---|---|---|"]
    for structure, r in training.items():
        loss = r["losses"][-1][1] if r.get("losses") else math.nan
        evals = [e for e in r.get("evals", []) if "accuracy" in e]
        acc = f"{evals[-1]['accuracy']:.3f} ({evals[-1].get('chance', math.nan):.3f})" if evals else "–"
        lines.append(f"| {structure} | {r['steps']} | {r['wall_time_s']:.0f} | {loss:.4f} | {acc} | {r['stopped']} |")
    return lines


def write_report(out_dir: str | Path, summary: dict) -> Path:
    """Write ``{out_dir}/report.md`` from the main job's summary (plots must already be in ``out_dir``)."""
    out_dir = Path(out_dir)
    lines = ["# saicl main job report", ""]
    m = summary["machine"]
    lines += [f"Ran `{summary['command']}` in {summary['wall_s']:.0f} s on {m['cpu']} ({m['cpu_count']} cores, "
              f"{m['torch_threads']} torch threads{', ' + m['gpu'] if 'gpu' in m else ''}), torch {m['torch']}, "
              f"saicl {summary['version']}.", ""]
    for note in summary["notes"]:
        lines += [f"> **Note:** {note}", ""]
    lines += ["## Phases", "", "| phase | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in summary["phases"].items()] + [""]

    training = summary.get("training") or {}
    if training:
        cfg = summary["train_config"]
        lines += ["## Meta-training", "",
                  f"One tiny T5 per structure from the same initialisation (seed {cfg['seed']}), model "
                  f"`{cfg['model']}`, data `{cfg['data']}`, k = {cfg['k']}, {cfg['max_steps']} steps of "
                  f"{cfg['batch_size']} episodes, lr {cfg['lr']} (the meta-training pipeline's default run"
                  + (", shortened to fit the job's time budget" if cfg["max_steps"] != 4000 else "") + ").", ""]
        lines += _training_table(training) + [""]
        for plot in ("train_loss.png", "train_heldout_accuracy.png"):
            if (out_dir / plot).exists():
                lines += [f"![{plot}]({plot})", ""]

    lines += ["## Held-out evaluation", "", summary["eval_description"], "",
              "Each column is a different model: the one " + ("trained" if training else "initialised")
              + " under that structure, evaluated under the same structure.", "",
              eval_tables(summary["evaluation"]), ""]
    for plot in ("eval_scaling.png", "eval_structures.png"):
        if (out_dir / plot).exists():
            lines += [f"![{plot}]({plot})", ""]

    bench = summary.get("bench")
    if bench:
        lines += ["## Speed and memory", "",
                  f"`saicl-bench` on this machine ({bench['machine']['wall_s']:.0f} s; load "
                  f"{bench['machine']['loadavg_start']} -> {bench['machine']['loadavg_end']}; peak memory is the "
                  "extra resident memory of one call, see docs/evaluation.md). Reproduce with "
                  f"`{summary['bench_command']}`.", "", bench_table(bench["rows"]), ""]
        for check in bench["targets"]:
            lines.append(f"- {check['target']}: **{'met' if check['met'] else 'not met'}** ({check['value']})")
        lines.append("")
        for plot in sorted(out_dir.glob("bench_*.png")):
            lines += [f"![{plot.name}]({plot.name})", ""]
    lines += ["## Files", "", "- `results.json`: everything above, machine-readable",
              "- `runs/`: trained checkpoints (`runs/{structure}/final`, `save_pretrained` format)" if training else "",
              "- `data/`: the held-out task collection (docs/design.md §6 MetaICL folder layout)",
              "- `bench.csv`: benchmark rows" if bench else "", ""]
    # atomic: a crash never leaves a truncated report behind (the old one or the complete new one)
    return atomic_write_text(out_dir / "report.md", "\n".join(line for line in lines if line is not None) + "\n")


__all__ = ["training_plots", "write_report"]
