"""SRigL: RigL with constant fan-in and neuron ablation (Lasby et al., 2024).

Every output neuron (row; output channel of a convolution) keeps the same number of
active weights, k = fan_in - floor(s * fan_in), which a condensed kernel can exploit. At
each update, on the layer as a whole:
1. unstructured RigL marks the salient weights: the largest-magnitude active weights that
   survive the drop, and the inactive ones with the largest gradient that would be grown;
2. a neuron with fewer than `gamma * k` salient weights is ablated (its row goes to zero);
3. the freed budget goes to the remaining neurons: each gets budget // alive weights, and
   the budget % alive neurons with the most salient weights get one more, so the layer's
   count of active weights never changes;
4. each live neuron keeps its largest surviving weights (up to its fan-in) and regrows
   the rest of its fan-in by gradient magnitude, starting from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sparsetorch.patterns import Pattern, Unstructured, prune_count
from sparsetorch.training.dynamic import DropGrowMethod, DynamicSchedule, drop_fraction_at
from sparsetorch.training.method import Layer, MaskUpdate, check_fraction, kept_magnitude, register_method

__all__ = ["SRigL", "ablate", "fan_in_budget", "top_per_row"]


@dataclass(frozen=True, kw_only=True)
class SRigL(DynamicSchedule):
    """Structured RigL: constant fan-in per neuron, and neuron ablation.

    Args:
        gamma: a neuron with fewer than gamma * fan-in salient weights is ablated (the
            paper's gamma_sal, 0.3); 0 never ablates.
        (the rest as RigL)

    Example:
        >>> SRigL(sparsity=0.9, end=3000, gamma=0.3)
    """

    name: ClassVar[str] = "srigl"
    gamma: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.gamma, "gamma")


def top_per_row(scores: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask holding the `counts[r]` highest scores of each row r (ties by position).

    Example:
        >>> top_per_row(torch.tensor([[1., 3, 2], [5, 4, 6]]), torch.tensor([1, 2])).int()
        tensor([[0, 1, 0],
                [0, 1, 1]], dtype=torch.int32)
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < counts.unsqueeze(1)


def ablate(salient: Tensor, fan_in: int, gamma: float, budget: int) -> Tensor:
    """Which neurons stay alive: those with at least gamma * fan_in salient weights, and
    never fewer than the budget needs (the most salient neurons are kept first).

    Args:
        salient: (rows, cols) boolean, the salient weights.
        fan_in: the current fan-in of a live neuron.
        gamma: ablation threshold as a fraction of `fan_in`.
        budget: active weights the layer must hold.
    """
    counts = salient.sum(dim=1)
    alive = counts >= gamma * fan_in
    needed = -(-budget // salient.shape[1])  # ceil: rows that can hold the budget
    if int(alive.sum()) < needed:
        alive = torch.zeros_like(alive).scatter_(0, counts.topk(needed).indices, True)
    return alive


def fan_in_budget(alive: Tensor, salient_counts: Tensor, budget: int) -> Tensor:
    """Fan-in per neuron: budget // live neurons each, one more for the budget % live
    neurons with the most salient weights, zero for ablated neurons. Sums to `budget`."""
    live = int(alive.sum())
    fan_in = torch.where(alive, budget // live, 0)
    extra = budget % live
    if extra:
        ranked = salient_counts.float().masked_fill(~alive, float("-inf"))
        fan_in[ranked.topk(extra).indices] += 1
    return fan_in


@register_method(SRigL)
class SRigLMethod(DropGrowMethod):
    """Constant fan-in drop-and-grow with neuron ablation, on each (out, fan-in) view."""

    default_pattern: ClassVar[str] = "unstructured-row"

    @classmethod
    def check_pattern(cls, pattern: Pattern) -> None:
        if pattern != Unstructured(per_row=True):
            raise ValueError(f"SRigL keeps a constant fan-in per neuron: use pattern 'unstructured-row', got {pattern.spec}")

    def needs_grads(self, step: int) -> bool:
        return self.config.updates_at(step)

    @staticmethod
    def _rows(layer: Layer, tensor: Tensor) -> Tensor:
        matrix = layer.matrix(tensor)
        return matrix.reshape(matrix.shape[0], -1)  # (out, fan-in)

    @staticmethod
    def _back(layer: Layer, rows: Tensor) -> Tensor:
        return layer.matrix(rows.reshape(layer.matrix(layer.weight).shape))

    def initial_masks(self) -> MaskUpdate:
        masks = []
        for layer in self.layers:
            scores = self._rows(layer, self.random_scores(layer))
            masks.append(self._back(layer, Unstructured(per_row=True).mask(scores, layer.final)))
        return MaskUpdate(masks)

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        if not self.config.updates_at(step):
            return None
        fraction = drop_fraction_at(self.config, step)
        return MaskUpdate([self._layer_mask(layer, grad, fraction) for layer, grad in zip(self.layers, grads)])

    def _layer_mask(self, layer: Layer, grad: Tensor, fraction: float) -> Tensor:
        magnitude = self._rows(layer, kept_magnitude(layer.weight, layer.mask))  # (out, fan-in)
        growth = self._rows(layer, grad.abs().float())
        rows, cols = magnitude.shape
        budget = rows * (cols - prune_count(cols, layer.final))
        drop = int(fraction * budget)
        layerwise = Unstructured()
        survivors = layerwise.mask(magnitude, layer.final, n_prune=magnitude.numel() - budget + drop)
        salient = layerwise.mask(growth.masked_fill(survivors, float("inf")), layer.final, n_prune=magnitude.numel() - budget)
        current = budget // max(int(self._rows(layer, layer.mask).any(dim=1).sum()), 1)
        alive = ablate(salient, current, self.config.gamma, budget)
        fan_in = fan_in_budget(alive, salient.sum(dim=1), budget)
        live = survivors & alive.unsqueeze(1)
        kept = top_per_row(magnitude.masked_fill(~live, float("-inf")), torch.minimum(live.sum(dim=1), fan_in))
        regrown = top_per_row(growth.masked_fill(kept, float("-inf")), fan_in - kept.sum(dim=1))
        return self._back(layer, kept | regrown)
