"""Dynamic sparse training: SET and RigL move a fixed budget of weights during training.

Every `every` steps until `end`, each layer drops the `f * active` smallest-magnitude
active weights and grows as many inactive ones: at random for SET (Mocanu et al., 2018),
by largest dense-gradient magnitude for RigL (Evci et al., 2020), that of the last batch
or, with `grad_steps`, summed over the last batches before the update. The drop fraction
f decays from `drop_fraction` by a cosine (RigL) or stays constant (SET). Grown weights
start at zero with zeroed optimizer state; the active count never changes, so every
layer stays at exactly its sparsity. Initial masks are random (use distribution='erk'),
and the Sparsifier rescales the kept weights to each unit's sparse fan-in
(`from_scratch`), so the signal does not shrink layer by layer before the first update.

The exact counts come from the patterns: drop is a mask with `n_prune` set, grow is a
mask over gradient scores where the survivors score +inf. `unstructured-row` drops and
grows within each row (constant fan-in, without SRigL's neuron ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from sparsetorch.patterns import Pattern, Unstructured, prune_count
from sparsetorch.training.method import (
    Layer,
    MaskUpdate,
    Method,
    Schedule,
    check_fraction,
    check_step,
    kept_magnitude,
    register_method,
)

__all__ = ["SET", "DynamicSchedule", "RigL", "drop_fraction_at", "drop_grow"]

DECAYS = ("cosine", "constant")


@dataclass(frozen=True, kw_only=True)
class DynamicSchedule(Schedule):
    """Shared knobs of the drop-and-grow methods.

    Args:
        sparsity: global sparsity, held from the first step.
        end: no mask updates from this step on (RigL's T_end, often 75% of training).
        every: steps between mask updates (Delta T).
        drop_fraction: fraction of active weights moved at the first update (alpha).
        decay: 'cosine' (alpha/2 * (1 + cos(pi * t / end))) or 'constant'.
    """

    end: int
    every: int = 100
    drop_fraction: float = 0.3
    decay: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.end, "end", low=1)
        check_step(self.every, "every", low=1)
        check_fraction(self.drop_fraction, "drop_fraction")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")

    def updates_at(self, step: int) -> bool:
        """Whether masks move after `step` steps."""
        return 0 < step < self.end and step % self.every == 0


def drop_fraction_at(config: DynamicSchedule, step: int) -> float:
    """The fraction of active weights to move at `step`.

    Example:
        >>> drop_fraction_at(RigL(sparsity=0.9, end=100), 50)
        0.15...
    """
    if config.decay == "constant":
        return config.drop_fraction
    return config.drop_fraction / 2 * (1 + math.cos(math.pi * step / config.end))


def drop_grow(layer: Layer, pattern: Pattern, fraction: float, grow_scores: Tensor) -> Tensor:
    """One layer's new mask: drop the weakest `fraction` of active weights, grow as many
    inactive ones with the highest `grow_scores` (just-dropped ones may come back).

    Args:
        layer: the layer, with its current mask.
        pattern: Unstructured (whole layer) or Unstructured(per_row=True) (each row).
        fraction: share of the active weights to move.
        grow_scores: weight-shaped, higher means grow first.

    Returns:
        A keep-mask with exactly as many kept weights (per row, for per-row) as before.
    """
    units = layer.matrix(layer.weight).shape[1] if pattern.per_row else layer.weight.numel()
    active = units - prune_count(units, layer.final)
    drop = math.floor(fraction * active)
    survivors = layer.pattern_mask(pattern, kept_magnitude(layer.weight, layer.mask), layer.final, n_prune=units - active + drop)
    ranked = grow_scores.float().masked_fill(survivors, float("inf"))
    return layer.pattern_mask(pattern, ranked, layer.final, n_prune=units - active)


class DropGrowMethod(Method):
    """Random initial masks, then drop-and-grow on the schedule; subclasses pick grow scores."""

    @classmethod
    def check_pattern(cls, pattern: Pattern) -> None:
        if not isinstance(pattern, Unstructured):
            raise ValueError(f"{cls.__name__} moves single weights: use 'unstructured' or 'unstructured-row', got {pattern.spec}")

    @property
    def from_scratch(self) -> bool:
        return True

    def initial_masks(self) -> MaskUpdate:
        return MaskUpdate(self.scored_masks(0, self.random_scores))

    def grow_scores(self, layer: Layer, grad: Tensor | None) -> Tensor:
        raise NotImplementedError

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        if not self.config.updates_at(step):
            return None
        fraction = drop_fraction_at(self.config, step)
        grads = grads or [None] * len(self.layers)
        return MaskUpdate([
            drop_grow(layer, self.pattern, fraction, self.grow_scores(layer, grad)) for layer, grad in zip(self.layers, grads)
        ])


@dataclass(frozen=True, kw_only=True)
class SET(DynamicSchedule):
    """Sparse Evolutionary Training: regrow at random (Mocanu et al., 2018).

    Example:
        >>> SET(sparsity=0.9, end=3000, every=100, drop_fraction=0.3)
    """

    name: ClassVar[str] = "set"
    decay: str = "constant"


@register_method(SET)
class SETMethod(DropGrowMethod):
    """Grow uniformly at random among the inactive weights."""

    def grow_scores(self, layer: Layer, grad: Tensor | None) -> Tensor:
        return self.random_scores(layer)


@dataclass(frozen=True, kw_only=True)
class RigL(DynamicSchedule):
    """Rigging the Lottery: regrow where the dense gradient is largest (Evci et al., 2020).

    Args:
        grad_steps: grow by the dense gradients summed over the last `grad_steps` steps up to
            each update (at most `every`). 1 is the paper's single batch (4096 images on
            ImageNet); with small batches one batch's gradient is mostly noise,
            so the grown weights are dropped again at the next update before they learned
            anything, and summing the batches of the interval (gradient accumulation, as
            rigl-torch's `grad_accumulation_n`) picks the weights the data keep asking for.

    Example:
        >>> RigL(sparsity=0.9, end=3000)  # Delta T = 100, alpha = 0.3, cosine decay
        >>> RigL(sparsity=0.9, end=450, every=45, grad_steps=45)  # a short run with small batches
    """

    name: ClassVar[str] = "rigl"
    grad_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.grad_steps, "grad_steps", low=1)
        if self.grad_steps > self.every:
            raise ValueError(f"grad_steps must be between 1 and every ({self.every}), got {self.grad_steps}")


@register_method(RigL)
class RigLMethod(DropGrowMethod):
    """Grow by |dense gradient| summed over the `grad_steps` steps up to the update."""

    def needs_grads(self, step: int) -> bool:
        return self.config.updates_at(step)

    def collects_grads(self, step: int) -> bool:
        return any(self.config.updates_at(t) for t in range(step, step + self.config.grad_steps))

    def grow_scores(self, layer: Layer, grad: Tensor | None) -> Tensor:
        return grad.abs()
