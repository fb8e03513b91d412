"""Run a model over episodes: option NLLs for classification/multiple choice, generated text otherwise.

Both functions batch episodes, run without autograd and never shuffle, so the result depends only on
the model, the episodes and the batch size (deterministic on a fixed machine).

Why ``torch.no_grad()`` and not ``torch.inference_mode()``: the main job trains and evaluates in one
process, and an inference tensor that leaks into any cache breaks later training ("Inference tensors cannot
be saved for backward"; saicl.positions once had such a cache, now fixed and tested). The speed is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from saicl import ICLProcessor, SAICLForConditionalGeneration

Progress = Callable[[int], None]


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _model_inputs(processor: ICLProcessor, episodes: Sequence[dict], device: torch.device) -> dict[str, torch.Tensor]:
    batch = processor(list(episodes))
    return {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "segment_ids")}


def score_episodes(
    model: SAICLForConditionalGeneration,
    processor: ICLProcessor,
    episodes: Sequence[dict],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Mean per-token NLL of every option of every episode (lower is better).

    Args:
        model: the model (its current structure and backend are used; it is not switched to eval mode here).
        processor: turns episodes into ``(batch, length)`` inputs.
        episodes: dicts with ``demonstrations``, ``query`` and a non-empty ``options`` list.
        batch_size: episodes per encoder pass (the encoder runs once per episode; options share it).
        progress: called with the number of episodes finished after each batch.
    Returns:
        Per episode, one float per option, in the episode's option order.
    """
    device = next(model.parameters()).device
    results: list[list[float]] = []
    with torch.no_grad():
        for chunk in _batches(episodes, batch_size):
            inputs = _model_inputs(processor, chunk, device)
            scores = model.score_options(**inputs, options=[e["options"] for e in chunk], tokenizer=processor.tokenizer)
            results += [s.double().cpu().tolist() for s in scores]
            if progress is not None:
                progress(len(chunk))
    return results


def generate_episodes(
    model: SAICLForConditionalGeneration,
    processor: ICLProcessor,
    episodes: Sequence[dict],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy generation for every episode (generation tasks: no options), decoded without special tokens."""
    device = next(model.parameters()).device
    texts: list[str] = []
    with torch.no_grad():
        for chunk in _batches(episodes, batch_size):
            inputs = _model_inputs(processor, chunk, device)
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            texts += processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            if progress is not None:
                progress(len(chunk))
    return texts


__all__ = ["generate_episodes", "score_episodes"]
