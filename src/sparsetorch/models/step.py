"""`LeanLlama`'s decode step as a plan of bound calls, made once per key/value cache.

At batch 1 a small model's step costs more in Python than in its kernels: each Linear module call
resolves submodules, reshapes, looks up its kernel and views the result, and a block's attention
is a dozen small tensor ops. The plan holds, for every block, its four matmuls (q/k/v and gate/up
stacked where `runtime.fuse_projections` stacked them) as calls straight to their bound kernels on
(rows, features) activations, and its norms' weights; a step is then per block the four matmuls,
one op for the attention after the cache (rotary, cache writes, softmax), two for the residual adds
with the next norms and one for the gating (`models.ops.decode_ops`), with nothing in between.

A cache's plan is made at its first step (`LeanLlama.forward`): modules replaced after that are not
seen by steps with that cache, a new cache sees them. A module with forward hooks is called as a
module, so its hooks run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BlockPlan", "DecodePlan"]

Rows = Callable[[Tensor], Tensor]  # (rows, in) -> (rows, out)


def rows_function(module: nn.Module, like: Tensor) -> Rows:
    """`module` on (rows, in) activations like `like`: its bound kernel where it offers one, F.linear for
    a plain Linear, else the module itself (also when hooks must run)."""
    if module._forward_hooks or module._forward_pre_hooks:  # read only: hooks must see their calls
        return module
    bound = getattr(module, "rows_function", None)
    if bound is not None:
        return bound(like)
    if type(module) is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    return module


def _concatenated(parts: Sequence[Rows]) -> Rows:
    return lambda x: torch.cat([part(x) for part in parts], dim=-1)


@dataclass(frozen=True)
class BlockPlan:
    """One block's bound calls and constants."""

    qkv: Rows  # (rows, C) -> (rows, (H + 2 KV) D)
    o: Rows
    gated: Rows  # (rows, C) -> silu(gate) * up, (rows, I)
    down: Rows
    post_norm: Tensor  # post_attention_layernorm's weight
    next_norm: Tensor  # the next block's input norm, or the final norm, weight
    heads: int
    scale: float


class DecodePlan:
    """The bound calls of every block of `model` for activations like `like` (see the module docstring).

    Example:
        >>> plan = DecodePlan(model, x, decode_ops())
        >>> h = plan.run(x, cos, sin, cache)  # x: (B * T, C) residual stream, added to in place
    """

    def __init__(self, model: nn.Module, like: Tensor, ops) -> None:
        self.ops = ops
        self.eps = model.config.rms_norm_eps
        layers = model.model.layers
        self.first_norm = layers[0].input_layernorm.weight
        self.blocks = [self._block(block, following, like)
                       for block, following in zip(layers, [*(b.input_layernorm for b in layers[1:]), model.model.norm])]

    def _block(self, block: nn.Module, following: nn.Module, like: Tensor) -> BlockPlan:
        attn, mlp = block.self_attn, block.mlp
        if attn.qkv_proj is not None:
            qkv = rows_function(attn.qkv_proj, like)
        else:
            qkv = _concatenated([rows_function(p, like) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
        ops = self.ops
        if mlp.gate_up_proj is not None:
            gate_up = rows_function(mlp.gate_up_proj, like)

            def gated(h: Tensor) -> Tensor:
                return ops.silu_mul_halves(gate_up(h))
        else:
            gate, up = rows_function(mlp.gate_proj, like), rows_function(mlp.up_proj, like)

            def gated(h: Tensor) -> Tensor:
                return ops.silu_mul(gate(h), up(h))
        return BlockPlan(
            qkv=qkv, o=rows_function(attn.o_proj, like), gated=gated, down=rows_function(mlp.down_proj, like),
            post_norm=block.post_attention_layernorm.weight, next_norm=following.weight,
            heads=attn.heads, scale=attn.head_dim ** -0.5,
        )

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor],
            past: int) -> Tensor:
        """Every block over the residual stream x (B * T, C), added to in place; returns its final norm.
        keys and values: each layer's cache tensors, with room for the T new positions after `past`."""
        ops, eps = self.ops, self.eps
        h = ops.rms_norm(x, self.first_norm, eps)
        for block, k, v in zip(self.blocks, keys, values):
            out = ops.attention_after_cache(block.qkv(h), cos, sin, k, v, block.heads, past, block.scale)
            h = ops.add_rms_norm(x, block.o(out), block.post_norm, eps)
            h = ops.add_rms_norm(x, block.down(block.gated(h)), block.next_norm, eps)
        return h
