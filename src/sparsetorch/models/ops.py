"""The own model path's fused ops, each beside the plain PyTorch it replaces.

Between a Llama block's matmuls, eager PyTorch makes several passes over activations too big for
cache (RMSNorm is five ops, the rotary embedding eight for q and k, SiLU gating two), and its CPU
flash attention computes the masked half of a causal window before throwing it away. The C++ ops
of `models/csrc` do each step in one pass, and attention over only the visible keys, with the
same arithmetic to float32 rounding (tested against the PyTorch code below and against
transformers' models).

Each function takes the C++ op for contiguous float32 CPU tensors outside autocast and autograd,
and otherwise (other dtypes and devices, bf16 autocast, no compiler, or gradients that must flow
through it: the C++ ops have no backward) runs the PyTorch code, so callers never branch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetorch.kernels.build import Extension, best_ops
from sparsetorch.precision import plain_fp32_cpu

__all__ = ["MODEL_OPS", "STEP_TOKENS", "attention_op", "causal_attention", "compiled_ops",
           "decode_ops", "fused_add_rms_norm", "rms_norm", "rotary", "silu_mul", "silu_mul_halves"]

MODEL_OPS = Extension("models", Path(__file__).parent / "csrc")
STEP_TOKENS = 16  # new tokens up to which attention after a cache runs as one op (a decode step); more: BLAS


@functools.cache
def compiled_ops():
    """The C++ ops of the best ISA this CPU runs, or None without a compiler."""
    return best_ops(MODEL_OPS)


@functools.cache
def attention_op():
    """The C++ causal attention, or None: no compiler, or a torch build without a Fortran-interface
    sgemm for it to call (never the case on x86 wheels)."""
    ops = compiled_ops()
    if ops is None:
        return None
    try:
        ops.causal_attention(*(torch.zeros(1, 1, 1, 8),) * 3, 1.0)
    except RuntimeError:
        return None
    return ops.causal_attention


def decode_ops():
    """The C++ ops of `LeanLlama`'s fp32 decode step (rms_norm, add_rms_norm, silu_mul_halves and
    attention_after_cache: rotary embedding, cache writes and attention of a few new tokens in one
    op), or None without a compiler or without the BLAS the attention calls."""
    return None if attention_op() is None else compiled_ops()


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records this call: then only the PyTorch code, which has a backward, may run."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _contiguous_fp32(*tensors: Tensor) -> bool:
    return plain_fp32_cpu(*tensors) and all(t.is_contiguous() for t in tensors) and not _needs_grad(*tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x) over the last dim, the statistics in fp32 whatever x's dtype."""
    if _contiguous_fp32(x, weight) and compiled_ops() is not None:
        return compiled_ops().rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(x: Tensor, update: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x += update in place (x: a residual stream), then `rms_norm(x, weight, eps)`."""
    if _contiguous_fp32(x, update, weight) and compiled_ops() is not None:
        return compiled_ops().add_rms_norm(x, update, weight, eps)
    x += update
    return rms_norm(x, weight, eps)


def silu_mul_halves(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused projection's output (..., 2 * inner): gate first, then up."""
    if _contiguous_fp32(gate_up) and compiled_ops() is not None:
        return compiled_ops().silu_mul_halves(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the SiLU-gated MLP's product."""
    if _contiguous_fp32(gate, up) and compiled_ops() is not None:
        return compiled_ops().silu_mul(gate, up)
    return F.silu(gate) * up


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated in pairs (i, i + D/2) by the angles of cos and sin (B or 1, 1, T, D)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q (B, H, T, D) and k (B, KV, T, D) by cos and sin (B or 1, T, D)."""
    if (
        cos.shape == sin.shape
        and cos.stride() == sin.stride()
        and cos.shape[0] in (1, q.shape[0])
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
        and plain_fp32_cpu(q, k, cos, sin)
        and not _needs_grad(q, k, cos, sin)
        and compiled_ops() is not None
    ):
        return compiled_ops().rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) v under a causal mask, q (B, H, T, D), k and v (B, KV, T, D) with KV
    dividing H (grouped-query heads share theirs). Returns (B, T, H, D), the output projection's layout."""
    if (
        q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and plain_fp32_cpu(q, k, v)
        and not _needs_grad(q, k, v)
        and attention_op() is not None
    ):
        return attention_op()(q, k, v, scale)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)
