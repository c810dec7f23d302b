"""Perplexity on fixed, non-overlapping windows of held-out text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over all windows.

    Every window is scored independently (no carried context), predicting tokens
    1..T-1 from their prefix, so the number is the same whatever the batch size.

    Args:
        model: a causal LM returning `.logits` of shape (B, T, vocab).
        windows: (n, T) token ids, e.g. from `sparsetorch.data.evaluation_windows`.
        batch_size: windows per forward.

    Example:
        >>> perplexity(model, evaluation_windows(tokenizer, text, 16384, 512))
        18.7
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, T>=2) token ids, got shape {tuple(windows.shape)}")
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (B, T-1, vocab)
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
