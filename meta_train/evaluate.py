"""Held-out accuracy during meta-training: score every option of each episode, pick the lowest NLL
(ties broken by :func:`saicl.eval.metrics.choose_option`, as in ``saicl-eval``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saicl.eval.metrics import choose_option


@torch.no_grad()
def option_accuracy(model, processor, tokenizer, episodes: Sequence[dict], batch_size: int = 128) -> dict[str, float]:
    """Accuracy of ``model.score_options`` over episodes that carry ``options`` and a gold ``output``.

    Returns ``{"accuracy", "chance", "ratio"}``: ``chance`` is the mean of ``1 / len(options)``, ``ratio``
    is accuracy over chance. Episodes without options are skipped (generation tasks).
    """
    episodes = [e for e in episodes if e.get("options")]
    if not episodes:
        return {}
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(episodes), batch_size):
            chunk = episodes[start:start + batch_size]
            batch = processor(chunk).to(model.device)
            scores = model.score_options(**batch, options=[e["options"] for e in chunk], tokenizer=tokenizer)
            # The same tie rule as saicl-eval (round, then the first listed option), so the accuracy logged
            # during training is the one the evaluation would report.
            correct += sum(e["options"][choose_option(s.tolist())] == e["output"] for e, s in zip(chunk, scores))
    finally:
        model.train(was_training)
    accuracy = correct / len(episodes)
    chance = sum(1 / len(e["options"]) for e in episodes) / len(episodes)
    return {"accuracy": accuracy, "chance": chance, "ratio": accuracy / chance}


__all__ = ["option_accuracy"]
