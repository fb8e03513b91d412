"""``saicl-train``: meta-train SAICL / full / fid T5 models (flags map onto :class:`TrainConfig`).

Examples::

    saicl-train                                            # the built-in default run (tiny model, synthetic)
    saicl-train --structure saicl,full,fid --max-steps 1500 --output-dir runs/cmp   # same init for all three
    saicl-train --config run.yaml --resume latest
    torchrun --nproc_per_node 2 -m saicl.meta_train.cli --max-steps 100 --output-dir runs/ddp
    torchrun --nproc_per_node 2 -m saicl.meta_train.cli --fsdp --max-steps 100 --output-dir runs/fsdp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from saicl.outputs import save_results, validate_output_file

from .config import TrainConfig, config_fields, field_type, load_yaml

PROG = "saicl-train"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        kind = field_type(f.name)[0]
        help_text = f.metadata.get("help", "")
        if f.name == "structure":
            parser.add_argument(_flag(f.name), default=None, help=help_text + "; a comma list (saicl,full,fid) "
                                "trains each into OUTPUT_DIR/STRUCTURE from the same initialisation "
                                f"(default: {f.default})")
        elif f.name == "resume":
            parser.add_argument(_flag(f.name), nargs="?", const="latest", default=None,
                                help=help_text + " (bare --resume means 'latest')")
        elif f.name == "fsdp":
            parser.add_argument(_flag(f.name), nargs="?", const="full_shard", default=None, metavar="OPTIONS",
                                help=help_text)
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
        if args.json is not None:
            validate_output_file(args.json, "--json")  # before training: a bad path must not cost the run
    except (ValueError, TypeError) as err:
        parser.exit(2, f"{PROG}: error: {err}\n")

    from .train import CheckpointWriteError, close_distributed, train, train_structures

    results: dict = {}  # filled as structures finish: kept (printed, written) whatever stops the next one
    code, error = 0, None
    try:
        if len(structures) == 1:
            results[structures[0]] = train(config)
        else:
            train_structures(config, structures, results=results)
    except (ValueError, FileNotFoundError) as err:  # bad input; every folder was checked before training
        code, error = 2, f"{PROG}: error: {err}"
    except CheckpointWriteError as err:  # disk full, ...: the last complete checkpoint is named
        code, error = 1, f"{PROG}: error: {err}"
    except KeyboardInterrupt:
        code, error = 130, f"{PROG}: interrupted{_resume_hint(config, structures, results)}"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if error is not None and rank0:
        print(error, file=sys.stderr)
    for structure, result in results.items():
        if not rank0:
            break
        last_eval = result.evals[-1] if result.evals else {}
        accuracy = (f", held-out accuracy {last_eval['accuracy']:.3f} (chance {last_eval['chance']:.3f})"
                    if "accuracy" in last_eval else "")
        where = result.model_dir or result.last_checkpoint
        print(f"{structure}: {result.steps} steps in {result.wall_time_s:.0f} s{accuracy} -> {where}")
        if result.message:
            print(f"{PROG}: error: {structure}: {result.message}", file=sys.stderr)
    if args.json and rank0 and results:
        payload = {"config": config.to_dict(), "structures": structures,
                   "results": {s: r.to_dict() for s, r in results.items()}}
        if error is not None:
            payload["error"] = error
        text = json.dumps(payload, indent=1) + "\n"
        _, saved = save_results(args.json, lambda tmp: tmp.write_text(text, encoding="utf-8"), "--json", PROG,
                                beside=[config.output_dir])
        code = code or (0 if saved else 1)
    ok = all(r.stopped == "max_steps" for r in results.values())
    close_distributed(wait=error is None)
    return code or (0 if ok else 1)


def _resume_hint(config: TrainConfig, structures: list[str], results: dict) -> str:
    """``"; continue with ..."`` naming the interrupted structure's last complete checkpoint, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    pending = [s for s in structures if s not in results]
    if not pending:
        return ""
    folder = Path(config.output_dir) / pending[0] if len(structures) > 1 else Path(config.output_dir)
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is None:
        return ""
    return f"; the last complete checkpoint is {last} (continue with --resume latest --output-dir {folder})"


if __name__ == "__main__":
    sys.exit(main())
