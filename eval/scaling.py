"""The scaling evaluation of the main job: held-out metric and encoder time against k, per structure.

Each model is evaluated under its own structure at every k (``saicl.eval.evaluate.evaluate_model``, one
call per (structure, k)), and the encoder's forward passes are timed during those same calls (forward hooks
on ``model.encoder``; CUDA is synchronised around each pass; the median over passes of seconds per
episode is reported), so the time-vs-k curve comes from the run that
produced the metric-vs-k curve, on the real episode lengths.

``full`` costs quadratic time and memory in the episode length. It is evaluated at a k only if both hold
(:func:`full_decision`), and once refused at some k it is not tried at larger ones:

- memory: the estimated peak of one evaluation batch (``saicl.eval.memory.estimate_bytes`` for a model-level
  case of the same shape, backend and batch) is within the memory budget (85% of the memory available now);
- time: the predicted wall time of the whole k -- the measured seconds per episode of ``full`` at the previous
  k, times the ratio of the model's FLOPs per evaluation batch at the two k (``saicl.eval.flops``: linear
  layers grow with L, attention with L^2; fixed per-call overheads do not grow, so the prediction errs long),
  times the episodes at k -- is within ``full_max_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

FULL_RULE = ("`full` is evaluated at k only if the estimated peak memory of one evaluation batch is within the "
             "memory budget and its predicted time for that k (measured seconds per episode at the previous k x "
             "ratio of FLOPs per batch x episodes) is within {budget:g} s; once refused, larger k are not tried")


@dataclass
class ScalingSettings:
    """What the scaling evaluation runs (a subset of the main job's settings)."""

    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    orders: int
    queries: int
    batch_size: int
    full_max_s: float
    max_demo_tokens: int = 64
    max_query_tokens: int = 64


class EncoderTimer:
    """Wall time of every ``encoder.forward`` call and its batch rows (hooks; CUDA synchronised at both ends).

    :meth:`per_episode` is the median over calls of seconds per episode, so a first call that pays for lazy
    initialisation, or one slowed by another process, does not set the number.
    """

    def __init__(self):
        self.calls: list[tuple[float, int]] = []  # (seconds, episodes in the batch)
        self._start = 0.0

    @property
    def seconds(self) -> float:
        return sum(seconds for seconds, _ in self.calls)

    def per_episode(self) -> float:
        values = sorted(seconds / max(rows, 1) for seconds, rows in self.calls)
        if not values:
            return math.nan
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    @staticmethod
    def _sync(module: torch.nn.Module) -> None:
        param = next(module.parameters(), None)
        if param is not None and param.device.type == "cuda":
            torch.cuda.synchronize(param.device)

    @contextmanager
    def attached(self, encoder: torch.nn.Module):
        rows = [0]

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows[0] = int(ids.shape[0]) if ids is not None else 1
            self._sync(module)
            self._start = time.perf_counter()

        def after(module, args, output):
            self._sync(module)
            self.calls.append((time.perf_counter() - self._start, rows[0]))

        handles = [encoder.register_forward_pre_hook(before, with_kwargs=True), encoder.register_forward_hook(after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def episode_tokens(processor, task, k: int, seed: int) -> int:
    """Input tokens of one episode of ``task`` with ``k`` demonstrations (before fid copies the query)."""
    from saicl.meta_train.data import make_episode, sample_demonstrations

    demos = sample_demonstrations(task, k, seed)
    return int(processor([make_episode(demos, task.test[0])])["attention_mask"].sum())


def eval_case(model, structure: str, k: int, tokens: int, query_tokens: int, batch: int, n_options: int):
    """The ``BenchCase`` (model level, forward) of one evaluation batch of ``model`` at ``k``."""
    from saicl.attention.registry import resolve_backend_name

    from .bench_cases import BenchCase

    config = model.config
    device = next(model.parameters()).device
    backend = resolve_backend_name(config.attn_backend, device, config.d_kv)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    demo_len = max(1, math.ceil((tokens - query_tokens) / max(k, 1)))
    return BenchCase(what="model", structure=structure, backend=backend, pass_="fwd", n_demos=k, demo_len=demo_len,
                     query_len=query_tokens, batch=batch, heads=config.num_heads, head_dim=config.d_kv, dtype=dtype,
                     device=device.type, d_model=config.d_model, d_ff=config.d_ff, num_layers=config.num_layers,
                     num_decoder_layers=config.num_decoder_layers, vocab_size=config.vocab_size,
                     n_options=n_options, option_len=2)


def full_decision(estimated_bytes: int, limit_bytes: int, previous: dict | None, flops: int, episodes: int,
                  budget_s: float) -> tuple[bool, str, float | None]:
    """``(run, reason, predicted seconds)`` for ``full`` at one k (the rule in the module docstring).

    Args:
        previous: the timing row of ``full`` at the previous k (``k``, ``flops_per_batch``,
            ``eval_s_per_episode``), or ``None``.
        flops: FLOPs of one evaluation batch at this k.
    """
    if estimated_bytes > limit_bytes:
        return False, (f"estimated peak {estimated_bytes / 2**30:.1f} GiB of one evaluation batch exceeds the "
                       f"memory budget {limit_bytes / 2**30:.1f} GiB"), None
    if previous is None:
        return True, "first k: within the memory budget, no time measured yet", None
    predicted = previous["eval_s_per_episode"] * flops / previous["flops_per_batch"] * episodes
    if predicted > budget_s:
        return False, (f"predicted {predicted:.0f} s for {episodes} episodes (measured "
                       f"{previous['eval_s_per_episode'] * 1e3:.0f} ms/episode at k={previous['k']}, scaled by "
                       f"FLOPs) exceeds the {budget_s:g} s budget"), predicted
    return True, f"predicted {predicted:.0f} s within the {budget_s:g} s budget", predicted


def _episodes(result: dict, orders: int) -> int:
    return sum(r["n_queries"] * len(r["per_seed"]) for r in result["rows"]) * orders


def merge_results(parts: Sequence[dict], structures: Sequence[str], ks: Sequence[int]) -> dict:
    """One evaluation result (as ``evaluate_model`` returns) from several (structure, k) calls."""
    if not parts:
        return {}
    merged = {key: value for key, value in parts[0].items()}
    merged["config"] = dict(parts[0]["config"], structures=list(structures), ks=sorted(set(ks)))
    for key in ("rows", "overall", "order", "skipped", "identical_seeds"):
        merged[key] = [item for part in parts for item in part.get(key, [])]
    # every structure draws the same demonstrations: list each (task, k) once
    merged["identical_seeds"] = list({(i["task"], i["k"]): i for i in merged["identical_seeds"]}.values())
    merged["truncation"] = {}
    for part in parts:
        for key, value in part["truncation"].items():
            merged["truncation"][key] = merged["truncation"].get(key, 0) + value
    return merged


def evaluate_scaling(models: Mapping[str, tuple], data: str, settings: ScalingSettings, show_progress: bool = True,
                     on_done: Callable[[str, int], None] | None = None, label: str = "") -> dict:
    """Evaluate each ``structure -> (model, tokenizer)`` under its own structure at every k.

    Returns:
        ``{"evaluation": merged evaluate_model result, "timing": [per (structure, k): tokens, episodes,
        eval_s, eval_s_per_episode, encoder_s (total), encoder_s_per_episode (median over calls), encoder_calls,
        batch_size],
        "skipped": [{"structure", "k", "reason"}], "full_rule": text, "full_decisions": [...]}``.
    """
    from saicl import ICLProcessor
    from saicl.meta_train.data import load_tasks

    from .bench_cases import case_flops
    from .evaluate import EvalConfig, evaluate_model
    from .memory import estimate_bytes, memory_limit_bytes

    parts, timing, skipped, decisions = [], [], [], []
    ks = sorted(set(settings.ks))
    for structure, (model, tokenizer) in models.items():
        processor = ICLProcessor(tokenizer, max_demo_tokens=settings.max_demo_tokens,
                                 max_query_tokens=settings.max_query_tokens)
        device = str(next(model.parameters()).device)
        limit = memory_limit_bytes(device)
        previous, refused = None, None
        tasks = load_tasks(data, split="test", k=0)
        task = next(iter(tasks.values()))
        query_tokens = episode_tokens(processor, task, 0, settings.seeds[0])
        for k in ks:
            tokens = episode_tokens(processor, task, k, settings.seeds[0])
            episodes = len(tasks) * min(settings.queries, len(task.test)) * len(settings.seeds) * settings.orders
            case = eval_case(model, structure, k, tokens, query_tokens, settings.batch_size,
                             len(task.test[0].options))
            flops = case_flops(case)
            if structure == "full":
                if refused is not None:
                    skipped.append({"structure": structure, "k": k, "reason": f"not tried: refused at k={refused}"})
                    if on_done:
                        on_done(structure, k)
                    continue
                estimate = estimate_bytes(case)
                run, reason, predicted = full_decision(estimate, limit, previous, flops, episodes,
                                                       settings.full_max_s)
                decisions.append({"k": k, "run": run, "reason": reason, "predicted_s": predicted,
                                  "estimated_bytes": estimate, "limit_bytes": limit})
                if not run:
                    refused = k
                    skipped.append({"structure": structure, "k": k, "reason": reason})
                    if on_done:
                        on_done(structure, k)
                    continue
            config = EvalConfig(data=data, structures=(structure,), seeds=settings.seeds, ks=(k,),
                                orders=settings.orders, batch_size=settings.batch_size,
                                max_queries=settings.queries, max_demo_tokens=settings.max_demo_tokens,
                                max_query_tokens=settings.max_query_tokens)
            timer = EncoderTimer()
            start = time.perf_counter()
            with timer.attached(model.get_encoder()):
                result = evaluate_model(model, tokenizer, config, show_progress=show_progress,
                                        label=f"{label}{structure} k={k}")
            wall = time.perf_counter() - start
            parts.append(result)
            done = _episodes(result, settings.orders)
            previous = {"structure": structure, "k": k, "tokens": tokens, "flops_per_batch": flops,
                        "episodes": done, "eval_s": wall,
                        "eval_s_per_episode": wall / max(done, 1), "encoder_s": timer.seconds,
                        "encoder_s_per_episode": timer.per_episode(), "encoder_calls": len(timer.calls),
                        "batch_size": settings.batch_size}
            timing.append(previous)
            if on_done:
                on_done(structure, k)
    return {"evaluation": merge_results(parts, list(models), [t["k"] for t in timing]), "timing": timing,
            "skipped": skipped, "full_rule": FULL_RULE.format(budget=settings.full_max_s),
            "full_decisions": decisions}


__all__ = ["FULL_RULE", "EncoderTimer", "ScalingSettings", "eval_case", "evaluate_scaling", "full_decision",
           "merge_results"]
