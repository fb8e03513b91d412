"""The main job's report folder: ``report.md`` with the tables and the plots beside it."""

from __future__ import annotations

import math
from pathlib import Path

from saicl.outputs import atomic_write_text

from .bench import markdown_table as bench_table
from .claims import markdown as claims_markdown
from .evaluate import markdown_tables as eval_tables
from .plots import line_plot, scaling_panels

PLATEAU_LABEL = "did not leave the plateau"


def _label(structure: str, seed: str, n_seeds: int) -> str:
    return structure if n_seeds == 1 else f"{structure} seed {seed}"


def training_plots(training: dict[str, dict[str, dict]], out_dir: Path) -> list[Path]:
    """Training loss and held-out accuracy against the step, one line per structure (and training seed).

    Args:
        training: ``seed -> structure -> TrainResult.to_dict()``.
    """
    written = []
    losses, accuracy, chance = {}, {}, {}
    for seed, per_structure in training.items():
        for structure, r in per_structure.items():
            name = _label(structure, seed, len(training))
            losses[name] = [(step, loss) for step, loss in r.get("losses", [])]
            accuracy[name] = [(e["step"], e["accuracy"]) for e in r.get("evals", []) if e.get("accuracy") is not None]
            chance[name] = [(e["step"], e["chance"]) for e in r.get("evals", []) if e.get("chance") is not None]
    if any(losses.values()):
        written.append(line_plot(losses, None, out_dir / "train_loss.png", xlabel="optimizer step",
                                 ylabel="training loss", title="Meta-training loss", logy=True))
    if any(accuracy.values()):
        written.append(line_plot(accuracy, chance, out_dir / "train_heldout_accuracy.png", xlabel="optimizer step",
                                 ylabel="held-out accuracy (dashed: chance)",
                                 title="Held-out accuracy during training"))
    return written


def scaling_plot(summary: dict, out_dir: Path) -> Path | None:
    """``eval_scaling.png``: metric against k with error bars, beside encoder time per episode against k."""
    analysis = summary["analysis"]
    over_training = len(summary["scaling"]) >= 2
    stuck = {s for s, p in analysis["plateau"].items() if p["reason"]}
    name = {s: f"{s} ({PLATEAU_LABEL})" if s in stuck else s for s in analysis["plateau"]}
    metric: dict[str, list] = {}
    for row in analysis["stats"]:
        err = row["std_train"] if over_training else row["std_eval"]
        metric.setdefault(name[row["structure"]], []).append((row["k"], row["mean"], err))
    times: dict[str, list] = {}
    for row in analysis["encoder_s_per_episode"]:
        times.setdefault(name[row["structure"]], []).append((row["k"], row["seconds"] * 1e3))
    if not metric:
        return None
    spread = "std over training seeds" if over_training else "std over evaluation seeds"
    return scaling_panels(metric, times, out_dir / "eval_scaling.png",
                          metric_label=f"held-out macro-F1 (bars: {spread})",
                          time_label="encoder ms per episode (same run)",
                          title="Held-out metric and encoder time against the number of demonstrations",
                          dashed={name[s] for s in stuck})


def write_plots(out_dir: str | Path, summary: dict) -> list[Path]:
    """Every PNG of the report (the benchmark's are written by the benchmark phase)."""
    out_dir = Path(out_dir)
    written = []
    if summary.get("training"):
        written += training_plots(summary["training"], out_dir)
    plot = scaling_plot(summary, out_dir)
    return written + ([plot] if plot else [])


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _training_table(training: dict[str, dict[str, dict]], plateau: dict) -> list[str]:
    lines = ["| structure | training seed | steps | wall time (s) | last logged loss | held-out accuracy (chance) "
             "| left the plateau (>= 2x chance) |", "|---|---|---|---|---|---|---|"]
    for seed, per_structure in training.items():
        for structure, r in per_structure.items():
            loss = r["losses"][-1][1] if r.get("losses") else math.nan
            evals = [e for e in r.get("evals", []) if e.get("accuracy") is not None]
            acc = f"{evals[-1]['accuracy']:.3f} ({_fmt(evals[-1].get('chance'))})" if evals else "–"
            why = plateau[structure]["per_seed"].get(seed)
            left = "yes" if why is None else f"**no**: {why}"
            lines.append(f"| {structure} | {seed} | {r['steps']} | {r['wall_time_s']:.0f} | {_fmt(loss, 4)} | {acc} "
                         f"| {left} |")
    return lines


def _scaling_table(summary: dict) -> list[str]:
    analysis = summary["analysis"]
    over_training = len(summary["scaling"]) >= 2
    ks = sorted({row["k"] for row in analysis["stats"]} | {row["k"] for row in analysis["skipped"]})
    stats = {(r["structure"], r["k"]): r for r in analysis["stats"]}
    times = {(r["structure"], r["k"]): r["seconds"] for r in analysis["encoder_s_per_episode"]}
    skipped = {(r["structure"], r["k"]): r["reason"] for r in analysis["skipped"]}
    cell = "mean ± std (training seeds) ± std (evaluation seeds)" if over_training else \
        "mean ± std over evaluation seeds"
    lines = [f"Metric per cell: {cell}; below it, encoder milliseconds per episode.", "",
             "| structure | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for structure, p in analysis["plateau"].items():
        cells = []
        for k in ks:
            row = stats.get((structure, k))
            if row is None:
                cells.append("not run" + (" (see below)" if (structure, k) in skipped else ""))
                continue
            text = f"{_fmt(row['mean'])} ± " + (f"{_fmt(row['std_train'])} ± " if over_training else "") \
                + _fmt(row["std_eval"])
            if (structure, k) in times:
                text += f"<br>{times[(structure, k)] * 1e3:.1f} ms"
            cells.append(text)
        name = f"{structure} ({PLATEAU_LABEL})" if p["reason"] else structure
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if over_training:
        used = {(r["structure"]): r["train_seeds"] for r in analysis["stats"]}
        lines += ["", "Training seeds used per structure: " + "; ".join(
            f"{s}: {', '.join(map(str, seeds))}" for s, seeds in used.items())
            + " (a structure that left the plateau with some seeds is summarised over those seeds only)."]
    return lines


def _full_stop(summary: dict) -> list[str]:
    lines = []
    for seed, scaling in summary["scaling"].items():
        decisions = scaling.get("full_decisions", [])
        if not decisions:
            continue
        refused = [d for d in decisions if not d["run"]]
        ran = [d["k"] for d in decisions if d["run"]]
        where = f"`full` ran at k = {', '.join(map(str, ran)) or 'none'}"
        if refused:
            where += f" and stopped at k = {refused[0]['k']}: {refused[0]['reason']}"
        else:
            where += " (every requested k fitted)"
        prefix = f"Training seed {seed}: " if len(summary["scaling"]) > 1 else ""
        lines.append(f"- {prefix}{where}.")
    rule = next((s.get("full_rule") for s in summary["scaling"].values()), "")
    return ([f"Where `full` stops. Rule: {rule}.", ""] + lines + [""]) if lines else []


def normalise(summary: dict) -> dict:
    """A summary of an older saicl-run (one model per structure: ``training`` keyed by structure, one
    ``evaluation``) in today's form (one training seed, ``scaling`` and ``analysis``), so it still renders."""
    if "scaling" in summary:
        return summary
    from .study import analyse

    evaluation = summary.get("evaluation") or {}
    cfg = evaluation.get("config", {})
    result = dict(summary)
    result["scaling"] = {"0": {"evaluation": evaluation, "timing": [], "skipped": [], "full_decisions": []}}
    result["training"] = {"0": summary["training"]} if summary.get("training") else {}
    result["training_seeds"] = [0]
    result["config"] = {"structures": cfg.get("structures", []), "eval_seeds": cfg.get("seeds", []),
                        "eval_orders": cfg.get("orders", 1), "eval_batch_size": cfg.get("batch_size", 0),
                        **(summary.get("config") or {})}
    result["analysis"] = analyse(result)
    return result


def write_report(out_dir: str | Path, summary: dict) -> Path:
    """Write ``{out_dir}/report.md`` from the main job's summary (plots must already be in ``out_dir``)."""
    out_dir = Path(out_dir)
    summary = normalise(summary)
    analysis = summary["analysis"]
    seeds = summary["training_seeds"]
    lines = ["# saicl main job report", ""]
    m = summary["machine"]
    lines += [f"Ran `{summary['command']}` in {summary['wall_s']:.0f} s on {m['cpu']} ({m['cpu_count']} cores, "
              f"{m['torch_threads']} torch threads{', ' + m['gpu'] if 'gpu' in m else ''}), torch {m['torch']}, "
              f"saicl {summary['version']}; load average (1/5/15 min) {m.get('loadavg_start')} at the start, "
              f"{m.get('loadavg_end')} at the end (timings on a loaded machine are slower and noisier).", ""]
    if len(seeds) == 1:
        lines += [f"**One training seed** ({seeds[0]}) per structure: the spreads below are over MetaICL's "
                  f"{len(summary['config']['eval_seeds'])} evaluation seeds only (which demonstrations are drawn), "
                  "not over training runs. `saicl-run --study` trains several seeds and reports both.", ""]
    else:
        lines += [f"**Study: {len(seeds)} training seeds** ({', '.join(map(str, seeds))}) per structure; spreads "
                  "over training seeds and over evaluation seeds are reported separately.", ""]
    for note in summary["notes"]:
        lines += [f"> **Note:** {note}", ""]
    lines += ["## Phases", "", "| phase | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in summary["phases"].items()] + [""]

    stuck = {s: p["reason"] for s, p in analysis["plateau"].items() if p["reason"]}
    training = summary.get("training") or {}
    if training:
        cfg = summary["train_config"]
        lines += ["## Meta-training", "",
                  f"One tiny T5 per structure and training seed from the same initialisation per seed, model "
                  f"`{cfg['model']}`, data `{cfg['data']}`, k = {cfg['k']}"
                  + (f" (curriculum from {cfg['k_start']} over {cfg.get('k_warmup_steps')} steps)"
                     if cfg.get("k_start") else "")
                  + f", {cfg['max_steps']} steps of {cfg['batch_size']} episodes, lr {cfg['lr']}"
                  + (f"; held-out accuracy during training at k = {cfg['eval_k']}." if cfg.get("eval_k") else "."),
                  ""]
        lines += _training_table(training, analysis["plateau"]) + [""]
        for plot in ("train_loss.png", "train_heldout_accuracy.png"):
            if (out_dir / plot).exists():
                lines += [f"![{plot}]({plot})", ""]
    if stuck:
        lines += [f"**{', '.join(f'`{s}`' for s in stuck)} {PLATEAU_LABEL}** (held-out accuracy below 2x chance): "
                  "the metric of such a model is that of one that has not learned in-context, whatever its "
                  "structure, so it is never compared for quality: every quality claim involving it is "
                  "*not measurable here*. "
                  + " ".join(f"`{s}`: {why}." for s, why in stuck.items()), ""]

    lines += ["## Scaling with the number of demonstrations", "", summary["eval_description"], ""]
    lines += _scaling_table(summary) + [""]
    lines += _full_stop(summary)
    if (out_dir / "eval_scaling.png").exists():
        lines += ["Left: held-out metric against k (log scale) with error bars; right: encoder time per episode, "
                  "measured in the same evaluation (forward hooks on the encoder around every evaluation batch of "
                  f"up to {summary['config']['eval_batch_size']} episodes; median over batches, mean over training "
                  "seeds).", "",
                  "![eval_scaling.png](eval_scaling.png)", ""]

    lines += ["## Claims of the paper, checked on this run", "",
              f"Each verdict is computed from the numbers above by the rule beside it; spread: "
              f"{analysis['claims_spread']}. Quality comparisons exclude structures that {PLATEAU_LABEL}.", "",
              claims_markdown_rows(analysis["claims"]), ""]

    first = next(iter(summary["scaling"]))
    evaluation = summary["scaling"][first]["evaluation"]
    if evaluation:
        lines += ["## Held-out evaluation details" + (f" (training seed {first})" if len(seeds) > 1 else ""), "",
                  "Each column is a different model: the one " + ("trained" if training else "initialised")
                  + " under that structure, evaluated under the same structure.", "", eval_tables(evaluation), ""]

    bench = summary.get("bench")
    if bench:
        lines += ["## Speed and memory", "",
                  f"`saicl-bench` on this machine ({bench['machine']['wall_s']:.0f} s; load "
                  f"{bench['machine']['loadavg_start']} -> {bench['machine']['loadavg_end']}; peak memory is the "
                  "extra resident memory of one call, see docs/evaluation.md). Reproduce with "
                  f"`{summary['bench_command']}`.", "", bench_table(bench["rows"]), ""]
        for check in bench.get("targets", []):
            lines.append(f"- {check['target']}: **{'met' if check['met'] else 'not met'}** ({check['value']})")
        lines.append("")
        for plot in sorted(out_dir.glob("bench_*.png")):
            lines += [f"![{plot.name}]({plot.name})", ""]
    lines += ["## Files", "", "- `results.json`: everything above, machine-readable",
              "- `runs/`: trained checkpoints (`final`, `save_pretrained` format)" if training else "",
              "- `data/`: the held-out task collection (MetaICL folder layout, docs/design.md)",
              "- `bench.csv`: benchmark rows" if bench else "", ""]
    # atomic: a crash never leaves a truncated report behind (the old one or the complete new one)
    return atomic_write_text(out_dir / "report.md", "\n".join(line for line in lines if line is not None) + "\n")


def claims_markdown_rows(claims: list[dict]) -> str:
    """The claims table from its JSON rows."""
    from .claims import Claim

    return claims_markdown([Claim(**c) for c in claims])


__all__ = ["PLATEAU_LABEL", "claims_markdown_rows", "normalise", "scaling_plot", "training_plots", "write_plots",
           "write_report"]
