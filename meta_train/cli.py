"""``saicl-train``: meta-train SAICL / full / fid T5 models (flags map onto :class:`TrainConfig`).

Examples::

    saicl-train                                            # the built-in default run (tiny model, synthetic)
    saicl-train --structure saicl,full,fid --max-steps 1500 --output-dir runs/cmp   # same init for all three
    saicl-train --config run.yaml --resume latest
    torchrun --nproc_per_node 2 -m saicl.meta_train.cli --max-steps 100 --output-dir runs/ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

from .config import TrainConfig, config_fields, load_yaml


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saicl-train",
        description="Meta-train a SAICL T5 (MetaICL-style) on synthetic or real tasks. Flags override --config. "
        "With no flags: the built-in default run (tiny T5, synthetic lookup tasks, ~1500 steps).",
    )
    parser.add_argument("--config", help="YAML file whose keys are the flag names below (without --, '-' or '_')")
    parser.add_argument("--json", metavar="PATH", help="write the results (losses, held-out accuracy) as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    for f in config_fields():
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        if f.name == "structure":
            parser.add_argument(_flag(f.name), default=None, help=help_text + "; a comma list (saicl,full,fid) "
                                "trains each into OUTPUT_DIR/STRUCTURE from the same initialisation "
                                f"(default: {f.default})")
        elif f.name == "resume":
            parser.add_argument(_flag(f.name), nargs="?", const="latest", default=None,
                                help=help_text + " (bare --resume means 'latest')")
        elif kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.default})")
        else:
            parser.add_argument(_flag(f.name), type=kind, default=None, help=f"{help_text} (default: {f.default})")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The config (defaults <- YAML <- flags) and the structures to train."""
    values = load_yaml(args.config) if args.config else {}
    for f in config_fields():
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
    structures = values.pop("structure", "saicl")
    structures = [s.strip() for s in str(structures).split(",") if s.strip()] if isinstance(structures, str) \
        else list(structures)
    if not structures:
        raise ValueError("--structure is empty")
    config = TrainConfig(structure=structures[0], **values)
    for s in structures[1:]:
        config.replace(structure=s)  # validates every name before any training starts
    return config, structures


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("saicl.meta_train").setLevel(logging.INFO)
    try:
        config, structures = config_from_args(args)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"saicl-train: error: {err}\n")

    from .train import train, train_structures

    try:
        if len(structures) == 1:
            results = {structures[0]: train(config)}
        else:
            results = train_structures(config, structures)
    except (ValueError, FileNotFoundError) as err:
        print(f"saicl-train: error: {err}", file=sys.stderr)
        return 2
    ok = all(r.stopped == "max_steps" for r in results.values())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for structure, result in results.items():
        if not rank0:
            break
        last_eval = result.evals[-1] if result.evals else {}
        accuracy = (f", held-out accuracy {last_eval['accuracy']:.3f} (chance {last_eval['chance']:.3f})"
                    if "accuracy" in last_eval else "")
        where = result.model_dir or result.last_checkpoint
        print(f"{structure}: {result.steps} steps in {result.wall_time_s:.0f} s{accuracy} -> {where}")
        if result.message:
            print(f"saicl-train: error: {structure}: {result.message}", file=sys.stderr)
    if args.json and rank0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": config.to_dict(), "structures": structures,
                   "results": {s: r.to_dict() for s, r in results.items()}}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
