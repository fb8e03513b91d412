"""A self-contained demonstration on built-in defaults (no network, no pretrained weights).

Builds a tiny random T5 locally (``save_pretrained``), loads it as a SAICL model, runs one
episode under the three structures, shows order (in)variance and times the encoder against the
number of demonstrations. Until the training and evaluation pipelines land, the weights are
untrained: the numbers show the mechanics (invariance, speed), not accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from . import ICLProcessor, SAICLForConditionalGeneration
from .attention import available_backends
from .testing import save_tiny_t5

WORDS = "red blue green cat dog bird one two three sun moon star".split()


def _episode(rng: random.Random, k: int) -> dict:
    demos = [(" ".join(rng.choices(WORDS, k=6)), rng.choice(["yes", "no"])) for _ in range(k)]
    return {"demonstrations": demos, "query": " ".join(rng.choices(WORDS, k=6))}


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(demos_for_speed: list[int], repeats: int, d_model: int) -> dict:
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    processor = ICLProcessor(tokenizer, max_demo_tokens=64, max_query_tokens=64)
    rng = random.Random(0)
    results: dict = {"structures": {}, "speed": []}
    with tempfile.TemporaryDirectory() as path:
        save_tiny_t5(path, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2)
        model = SAICLForConditionalGeneration.from_pretrained(path).eval()

    episode = _episode(rng, 8)
    permuted = dict(episode, demonstrations=list(reversed(episode["demonstrations"])))
    batch, batch_perm = processor([episode]), processor([permuted])
    options = [["yes", "no"]]
    print(f"saicl {__import__('saicl').__version__}; backends on cpu: "
          + ", ".join(f"{n}={'ok' if r is None else 'unavailable'}" for n, r in available_backends("cpu").items()))
    print(f"\nOne episode, 8 demonstrations, untrained tiny T5 (d_model={d_model}):")
    print("| structure | NLL(yes) | NLL(no) | max |logit change| after reversing the demonstrations |")
    print("|---|---|---|---|")
    labels = processor.encode_targets(["yes"])
    for structure in ("saicl", "full", "fid"):
        model.set_structure(structure)
        with torch.no_grad():
            nll = model.score_options(**batch, options=options, tokenizer=tokenizer)[0]
            change = (model(**batch, labels=labels).logits - model(**batch_perm, labels=labels).logits).abs().max()
        results["structures"][structure] = {"nll": nll.tolist(), "order_change": change.item()}
        print(f"| {structure} | {nll[0]:.4f} | {nll[1]:.4f} | {change.item():.2e} |")

    print(f"\nEncoder forward time (ms, median of {repeats}) against the number of demonstrations:")
    print("| demos | encoder tokens | saicl (torch) | full (torch, dense) | full / saicl |")
    print("|---|---|---|---|---|")
    for k in demos_for_speed:
        speed_batch = processor([_episode(rng, k)])
        row = {"n_demos": k, "tokens": int(speed_batch["attention_mask"].sum())}
        for structure in ("saicl", "full"):
            model.set_structure(structure)
            with torch.no_grad():
                row[structure] = _time(lambda batch=speed_batch: model.encoder(**batch), repeats)
        results["speed"].append(row)
        print(f"| {k} | {row['tokens']} | {row['saicl']:.1f} | {row['full']:.1f} | {row['full'] / row['saicl']:.1f}x |")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saicl demo", description=__doc__.splitlines()[0])
    parser.add_argument("--demos", default="16,64,256", help="comma-separated demonstration counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--d-model", type=int, default=64, help="width of the tiny T5")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    try:
        demos = [int(x) for x in args.demos.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--demos must be comma-separated integers, got {args.demos!r}")
    if not demos or min(demos) < 0:
        parser.error("--demos needs at least one count >= 0")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.d_model < 4 or args.d_model % 4:
        parser.error("--d-model must be a positive multiple of 4")
    results = run(demos, args.repeats, args.d_model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
