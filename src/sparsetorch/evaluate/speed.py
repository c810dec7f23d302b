"""Inference speed: prefill and greedy-decode tokens per second, medians of repeats.

Dense and sparse models go through the very same loop, so their ratio measures the
weights, not the harness. The loop is a plain KV-cache decode (no sampling, no
`generate` bookkeeping), which is also what a lean server would run. It drives a
transformers model or a `models.llama.LeanLlama` (anything with `new_cache`) alike.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SpeedResult", "greedy_decode", "measure_decode", "measure_prefill"]


@dataclass(frozen=True)
class SpeedResult:
    """Median tokens per second over `repeats` timed runs (after one warm-up run)."""

    tokens_per_second: float
    seconds: tuple[float, ...]
    tokens: int


def _last_logits_only(model: nn.Module) -> dict:
    """`logits_to_keep=1` where the model takes it: a prefill for generation needs only the last
    position's logits, and the full (T, vocabulary) logits would cost a large share of the
    prefill's time and memory (SmolLM2: 49,152 floats a token). `generate` does the same."""
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


def _is_lean(model: nn.Module) -> bool:
    return hasattr(model, "new_cache")  # sparsetorch.models.llama.LeanLlama


def _start(model: nn.Module, prompt: Tensor) -> tuple[Tensor, object]:
    """Prefill for generation: (the last position's logits (B, vocab), the cache to go on from)."""
    if _is_lean(model):
        cache = model.new_cache(prompt.shape[0])
        return model(prompt, cache), cache
    out = model(input_ids=prompt, use_cache=True, **_last_logits_only(model))
    return out.logits[:, -1], out.past_key_values


def _step(model: nn.Module, token: Tensor, cache: object) -> tuple[Tensor, object]:
    """One more (B, 1) token after `cache`: (its logits (B, vocab), the cache)."""
    if _is_lean(model):
        return model(token, cache), cache
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return out.logits[:, -1], out.past_key_values


@torch.inference_mode()
def greedy_decode(model: nn.Module, prompt: Tensor, new_tokens: int) -> tuple[Tensor, float]:
    """Greedy continuation of a (1, T) prompt, by a transformers model or a LeanLlama.

    Returns:
        (the new_tokens generated ids, seconds spent after the prompt's prefill).
    """
    logits, cache = _start(model, prompt)
    token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    generated = [token]
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, cache = _step(model, token, cache)
        token = logits.argmax(dim=-1, keepdim=True)
        generated.append(token)
    seconds = time.perf_counter() - started
    return torch.cat(generated, dim=1)[0], seconds


def _median(seconds: list[float], tokens: int) -> SpeedResult:
    return SpeedResult(tokens / statistics.median(seconds), tuple(seconds), tokens)


def measure_decode(model: nn.Module, prompt: Tensor, new_tokens: int = 128, repeats: int = 3) -> SpeedResult:
    """Decode speed: tokens per second of the greedy single-token steps after `prompt`.

    The memory-bound regime that dominates chat latency; one untimed warm-up run first.
    """
    greedy_decode(model, prompt, new_tokens)
    seconds = [greedy_decode(model, prompt, new_tokens)[1] for _ in range(repeats)]
    return _median(seconds, new_tokens - 1)


@torch.inference_mode()
def _prefill_seconds(model: nn.Module, ids: Tensor) -> float:
    options = {} if _is_lean(model) else {"use_cache": False, **_last_logits_only(model)}  # lean: no cache, last logits
    started = time.perf_counter()
    model(ids, **options)
    return time.perf_counter() - started


def measure_prefill(model: nn.Module, ids: Tensor, repeats: int = 3) -> SpeedResult:
    """Prefill speed: one forward over a (B, T) batch, tokens = B * T, logits of the last position only."""
    _prefill_seconds(model, ids)
    return _median([_prefill_seconds(model, ids) for _ in range(repeats)], ids.numel())
