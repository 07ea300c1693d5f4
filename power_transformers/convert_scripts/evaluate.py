"""Held-out perplexity, measured the same way everywhere in this package.

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens; perplexity
is exp of the mean next-token loss over all predicted tokens.
"""

from __future__ import annotations

import math

import torch


def token_windows(tokenizer, text: str, window: int) -> torch.Tensor:
    """[n, window] token ids of ``text`` (the incomplete last window dropped; at least one kept)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = max(1, ids.numel() // window)
    ids = ids[: n * window] if ids.numel() >= window else ids
    return ids.view(n, -1)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of ``model`` on ``text`` in non-overlapping windows of ``window`` tokens."""
    windows = token_windows(tokenizer, text, window)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    model.eval()
    for start in batches:
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_loss / total_tokens)
