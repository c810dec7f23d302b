"""Causal attention for calibration forwards that skips the masked half of the work.

PyTorch's CPU flash attention runs every 64-query block of a 512-token window against all
512 keys and masks the upper half afterwards. Calibration windows are full, unpadded and
causal, so sparsetorch's C++ kernel (`kernels/csrc/attention.h`) runs each query block
against only the keys at or before it, once per group of query heads that share a key/value
head: the same result to float32 rounding (tested against SDPA), 9.3 against 17.4 ms for a
batch of 4 SmolLM2 windows here (SDPA with transformers' key/value repeat and transpose).
Attention is about a quarter of a calibration forward's time.

It serves only float32 CPU attention of plain causal self-attention (no mask, cache,
soft-capping or sinks, and no sliding window narrower than the calibration window) of a
model whose attention is transformers' 'sdpa'; anything else, a bf16-autocast statistics
forward included, goes to transformers' SDPA function unchanged. Without the C++ kernels
(no compiler) everything does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sparsetorch.oneshot.precision import plain_fp32_cpu

__all__ = ["calibration_attention", "causal_attention_op", "kernel_causal_attention"]

NAME = "sparsetorch_causal"
_UNUSUAL = ("softcap", "position_bias", "cache", "s_aux", "sinks")


@functools.cache
def causal_attention_op():
    """The C++ causal attention of the best ISA this CPU runs, or None without a compiler."""
    from sparsetorch.kernels.build import best_ops  # here: the kernels package imports oneshot

    ops = best_ops()
    if ops is None:
        return None
    op = ops.causal_attention
    try:  # a torch build without a Fortran-interface sgemm refuses (never the case on x86 wheels)
        op(*(torch.zeros(1, 1, 1, 8),) * 3, 1.0)
    except RuntimeError:
        return None
    return op


def _kernel_can_run(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float,
                    is_causal: bool | None, kwargs: dict) -> bool:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        causal
        and attention_mask is None
        and dropout == 0.0
        and plain_fp32_cpu(query, key, value)
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and query.shape[2] == key.shape[2]
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
        and (kwargs.get("sliding_window") or query.shape[2]) >= query.shape[2]  # a window as wide is plain causal
        and not any(kwargs.get(name) is not None for name in _UNUSUAL)
        and not kwargs.get("output_attentions", False)
        and causal_attention_op() is not None
    )


def kernel_causal_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                            dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (batch, heads, tokens, dim) in,
    (batch, tokens, heads, dim) out."""
    if not _kernel_can_run(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return causal_attention_op()(query, key, value, scale), None


@contextmanager
def calibration_attention(model: nn.Module) -> Iterator[None]:
    """Run `model`'s 'sdpa' attention through `kernel_causal_attention` inside the context.

    Models of other attention implementations, and modules without a transformers config,
    are left as they are. The implementation is always put back, even on error.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, kernel_causal_attention)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
