"""ICLProcessor: episodes (demonstrations + query) -> the padded batch of the design (docs/design.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import BatchEncoding

from .structures import QUERY_SEGMENT

logger = logging.getLogger(__name__)

Episode = Mapping[str, object]


@dataclass
class TruncationReport:
    """What the caps cut: counts per part, never silent.

    ``demonstrations`` / ``queries`` count the parts that were cut, ``*_total`` every part encoded,
    ``tokens_dropped`` the tokens removed. ``episodes`` lists the cut episodes' indices within one batch
    (only a single batch's report has them; sums of reports leave it empty).
    """

    demonstrations: int = 0
    demonstrations_total: int = 0
    queries: int = 0
    queries_total: int = 0
    tokens_dropped: int = 0
    episodes: list[int] = field(default_factory=list)

    COUNTS = ("demonstrations", "demonstrations_total", "queries", "queries_total", "tokens_dropped")

    @property
    def any(self) -> bool:
        return self.demonstrations > 0 or self.queries > 0

    def add(self, other: TruncationReport) -> TruncationReport:
        """Add ``other``'s counts to this report (in place; returns ``self``)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def __add__(self, other: TruncationReport) -> TruncationReport:
        return TruncationReport().add(self).add(other)

    def counts(self) -> dict[str, int]:
        """The counts as a JSON-ready dict (no episode indices)."""
        return {name: getattr(self, name) for name in self.COUNTS}

    def __str__(self) -> str:
        return (
            f"truncated {self.demonstrations}/{self.demonstrations_total} demonstrations and "
            f"{self.queries}/{self.queries_total} queries ({self.tokens_dropped} tokens dropped)"
        )


def _demonstration_fields(episode_index: int, demo_index: int, demo: object) -> tuple[str, str]:
    where = f"episode {episode_index}, demonstration {demo_index}"
    if isinstance(demo, Mapping):
        if "input" not in demo or "output" not in demo:
            raise ValueError(f"{where}: a dict demonstration needs 'input' and 'output' keys, got {sorted(demo)}")
        x, y = demo["input"], demo["output"]
    elif isinstance(demo, Sequence) and not isinstance(demo, str) and len(demo) == 2:
        x, y = demo
    else:
        raise ValueError(f"{where}: expected an (input, output) pair or a dict, got {demo!r}")
    for name, value in (("input", x), ("output", y)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return x, y


class ICLProcessor:
    """Turns episodes into ``input_ids``, ``attention_mask`` and ``segment_ids`` (docs/design.md).

    An episode is ``{"demonstrations": [(input, output), ...], "query": str}`` (demonstrations may
    also be ``{"input": ..., "output": ...}`` dicts; extra keys such as ``"options"`` are ignored).
    Each demonstration is rendered with ``template`` and capped at ``max_demo_tokens``; the query is
    rendered with ``query_template``, capped at ``max_query_tokens`` and ends with EOS (as T5's
    tokenizer does), so one demonstration + query tokenizes like the concatenated text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: demonstration format with ``{input}`` and ``{output}``.
        query_template: query format with ``{input}``.
        max_demo_tokens, max_query_tokens: caps (>= 1); what they cut is counted and logged.
        add_eos: end the query with the tokenizer's EOS token.

    Truncation accounting: each batch carries its own report (``batch.truncation``, also
    ``self.last_truncation``), and ``self.truncation_total`` sums every batch since construction or the
    last :meth:`reset_truncation`, so a caller that encodes one task in several batches reads the task's
    total there. A processor copied into ``DataLoader`` workers counts in the worker: carry
    ``batch.truncation`` back with the batch instead (as the meta-training collator does).
    """

    def __init__(
        self,
        tokenizer,
        template: str = "{input} {output}",
        query_template: str = "{input}",
        max_demo_tokens: int = 256,
        max_query_tokens: int = 256,
        add_eos: bool = True,
    ):
        for name, cap in (("max_demo_tokens", max_demo_tokens), ("max_query_tokens", max_query_tokens)):
            if not isinstance(cap, int) or cap < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {cap!r}")
        for name, text, keys in (("template", template, ("input", "output")), ("query_template", query_template,
                                                                                  ("input",))):
            try:
                text.format(**{k: "" for k in keys})
            except (KeyError, IndexError) as err:
                raise ValueError(f"{name}={text!r} may only use the fields {list(keys)}: {err}") from err
        self.tokenizer = tokenizer
        self.template = template
        self.query_template = query_template
        self.max_demo_tokens = max_demo_tokens
        self.max_query_tokens = max_query_tokens
        self.eos_id = tokenizer.eos_token_id if add_eos else None
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.last_truncation = TruncationReport()
        self.truncation_total = TruncationReport()

    def reset_truncation(self) -> TruncationReport:
        """Start a new running count; returns the counts accumulated so far."""
        total, self.truncation_total = self.truncation_total, TruncationReport()
        return total

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_episode(self, index: int, episode: Episode, report: TruncationReport) -> tuple[list[int], list[int]]:
        """Token ids and segment ids of one episode (validated)."""
        if not isinstance(episode, Mapping):
            raise ValueError(f"episode {index}: expected a dict with 'demonstrations' and 'query', got {episode!r}")
        if "query" not in episode:
            raise ValueError(f"episode {index}: missing field 'query'")
        query = episode["query"]
        if not isinstance(query, str):
            raise ValueError(f"episode {index}: field 'query' must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ValueError(f"episode {index}: field 'query' is empty")
        demos = episode.get("demonstrations", [])
        if isinstance(demos, (str, bytes)) or not isinstance(demos, Sequence):
            raise ValueError(f"episode {index}: field 'demonstrations' must be a list of (input, output) pairs")

        ids: list[int] = []
        segments: list[int] = []
        truncated_here = False
        for d, demo in enumerate(demos):
            x, y = _demonstration_fields(index, d, demo)
            tokens = self._tokens(self.template.format(input=x, output=y))
            if not tokens:
                raise ValueError(f"episode {index}, demonstration {d}: renders to no tokens")
            report.demonstrations_total += 1
            if len(tokens) > self.max_demo_tokens:
                report.demonstrations += 1
                report.tokens_dropped += len(tokens) - self.max_demo_tokens
                tokens = tokens[: self.max_demo_tokens]
                truncated_here = True
            ids += tokens
            segments += [d] * len(tokens)

        tokens = self._tokens(self.query_template.format(input=query))
        if not tokens:
            raise ValueError(f"episode {index}: field 'query' renders to no tokens")
        room = self.max_query_tokens - (self.eos_id is not None)
        report.queries_total += 1
        if len(tokens) > room:
            report.queries += 1
            report.tokens_dropped += len(tokens) - room
            tokens = tokens[: max(room, 0)]
            truncated_here = True
        if self.eos_id is not None:
            tokens = tokens + [self.eos_id]
        ids += tokens
        segments += [QUERY_SEGMENT] * len(tokens)
        if truncated_here:
            report.episodes.append(index)
        return ids, segments

    def __call__(self, episodes: Sequence[Episode], return_tensors: str = "pt") -> BatchEncoding:
        """Encode a batch.

        Returns:
            ``BatchEncoding`` with ``input_ids``, ``attention_mask``, ``segment_ids``, each
            ``(batch, length)`` long tensors, padded on the right; ``.truncation`` holds the report.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        if isinstance(episodes, Mapping):
            episodes = [episodes]
        if len(episodes) == 0:
            raise ValueError("episodes is empty: pass at least one episode")
        report = TruncationReport()
        encoded = [self.encode_episode(i, ep, report) for i, ep in enumerate(episodes)]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), length, dtype=torch.long)
        segment_ids = torch.full((len(encoded), length), QUERY_SEGMENT, dtype=torch.long)
        for b, (ids, segments) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
            segment_ids[b, : len(ids)] = torch.tensor(segments, dtype=torch.long)
        self.last_truncation = report
        self.truncation_total.add(report)
        if report.any:
            logger.warning("ICLProcessor: %s (episodes %s)", report, report.episodes[:10])
        batch = BatchEncoding(
            {"input_ids": input_ids, "attention_mask": attention_mask, "segment_ids": segment_ids}
        )
        batch.truncation = report
        return batch

    def encode_targets(self, outputs: Sequence[str], max_tokens: int = 64) -> torch.Tensor:
        """Decoder labels ``(batch, target_length)`` for output strings (EOS appended, -100 padding)."""
        rows = []
        for i, text in enumerate(outputs):
            if not isinstance(text, str):
                raise ValueError(f"outputs[{i}] must be a string, got {type(text).__name__}")
            ids = self._tokens(text)[: max_tokens - (self.eos_id is not None)]
            rows.append(ids + ([self.eos_id] if self.eos_id is not None else []))
        labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
        for b, ids in enumerate(rows):
            labels[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return labels
