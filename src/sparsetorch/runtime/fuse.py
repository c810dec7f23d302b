"""Fewer, larger matmuls per decode step: q, k and v as one projection, gate and up as another.

A decode step of a small model is bound by the cost of each kernel call more than by its weight
traffic, and q, k and v (gate and up) read the same input. Stacking their weights' rows gives one
call instead of three (two), and the stacked q/k/v output is what the one-op decode attention of
`models.llama` reads. Stacking is exact: a dense weight's rows are concatenated, a compressed one's
by its format's `cat_rows` (the same values, codes and scales), so the fused model computes what the
unfused one did, to float rounding. Layers that do not agree (one kept dense, another sparse; other
formats or quantization schemes) stay separate.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetorch.models.llama import LeanLlama
from sparsetorch.nn import SparseLinear

__all__ = ["FUSED_PROJECTIONS", "fuse_projections"]

# (block child, the projections it holds, the fused projection's name), in the order of their rows.
FUSED_PROJECTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"),
)


def fuse_projections(model: LeanLlama) -> list[str]:
    """Replace each block's q/k/v and gate/up projections by one stacked projection where they agree.

    Returns:
        The names of the fused projections ('model.layers.0.self_attn.qkv_proj', ...).

    Example:
        >>> model, _ = load_lean_model("pruned/smollm2-50", "sparse", fuse=False)
        >>> fuse_projections(model)[:2]
        ['model.layers.0.self_attn.qkv_proj', 'model.layers.0.mlp.gate_up_proj']
    """
    fused = []
    for i, block in enumerate(model.model.layers):
        for child, names, target in FUSED_PROJECTIONS:
            owner = getattr(block, child)
            if getattr(owner, target) is not None:
                continue
            joined = stack_rows([getattr(owner, name) for name in names])
            if joined is None:
                continue
            setattr(owner, target, joined)
            for name in names:
                delattr(owner, name)
            fused.append(f"model.layers.{i}.{child}.{target}")
    return fused


def stack_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing `torch.cat([layer(x) for layer in layers], -1)`, or None where they do not agree."""
    if all(type(layer) is SparseLinear for layer in layers):
        return _stack_sparse(layers)
    if all(isinstance(layer, nn.Linear) and not getattr(layer, "packed", None) for layer in layers):
        return _stack_dense(layers)
    return None


def _stacked_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    """The layers' biases end to end (zeros for a layer without one), or None where none has one."""
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if not biases:
        return None
    return torch.cat([layer.bias.detach() if layer.bias is not None else biases[0].new_zeros(layer.out_features)
                      for layer in layers])


def _stack_dense(layers: list[nn.Linear]) -> nn.Linear | None:
    weights = [layer.weight for layer in layers]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        return None
    bias = _stacked_bias(layers)
    with torch.device("meta"):
        stacked = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=bias is not None)
    stacked.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    if bias is not None:
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    return stacked


def _stack_sparse(layers: list[SparseLinear]) -> SparseLinear | None:
    if len({layer.backend for layer in layers}) != 1:
        return None
    weights = [layer.sparse_weight for layer in layers]
    try:
        stacked = type(weights[0]).cat_rows(weights)
    except ValueError:
        return None
    return SparseLinear(stacked, _stacked_bias(layers), layers[0].backend)
