"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling."""
from __future__ import annotations

import torch


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token id from ``logits`` ``[vocab]``.

    Args:
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: keep only the ``top_k`` most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability mass reaches ``top_p`` (1.0 = all).
        generator: torch RNG for reproducible sampling.
    """
    logits = logits.float().flatten()  # [vocab]
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
