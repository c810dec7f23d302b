"""N:M from scratch: SR-STE and progressive mask decay, both on a dense latent weight.

SR-STE (Zhou et al., 2021): every step the N:M mask is taken afresh from |w| of the
dense latent weight; the forward pass uses w * mask; the backward passes the gradient
straight through to every latent weight and adds the sparse-refined decay
lambda_W * ~mask * w to the pruned ones, so a weight that keeps losing drifts to zero.

Progressive N:M by mask decay (Kao et al., 2022; "MDGF" in Bambhaniya et al., 2024): the
pruned entries of the N:M mask hold beta instead of 0 in the forward pass, and get beta
times their gradient; beta falls linearly from 1 (dense) at `start` to 0 (exact N:M) at
`end`, after which the mask is frozen.

The mask (buffer `weight_mask`) always holds exactly N of every M; `module.weight` is the
masked weight the forward pass uses, `weight_orig` the trained latent one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from sparsetorch.patterns import NM, Pattern
from sparsetorch.training.method import MaskUpdate, Method, Schedule, check_step, register_method

__all__ = ["SRSTE", "ProgressiveNM", "decay_at"]


class NMMethod(Method):
    """Soft masks recomputed from the latent magnitudes; N:M patterns only."""

    soft: ClassVar[bool] = True
    default_pattern: ClassVar[str] = "2:4"

    @classmethod
    def check_pattern(cls, pattern: Pattern) -> None:
        if not isinstance(pattern, NM):
            raise ValueError(f"{cls.__name__} trains N:M sparsity: use a pattern such as '2:4', got {pattern.spec}")

    def latent_masks(self) -> list[Tensor]:
        """N:M of |latent weight|; a pruned weight may win its place back."""
        return [layer.pattern_mask(self.pattern, layer.weight.detach().abs()) for layer in self.layers]


@dataclass(frozen=True, kw_only=True)
class SRSTE(Schedule):
    """Sparse-refined straight-through estimator for N:M from scratch.

    Args:
        refine: lambda_W, the decay applied to pruned latent weights through their
            gradient (the paper's 2e-4 for SGD).

    Example:
        >>> Sparsifier(model, SRSTE(), pattern="2:4")
    """

    name: ClassVar[str] = "srste"
    refine: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.refine, bool) or not isinstance(self.refine, (int, float)) or self.refine < 0:
            raise ValueError(f"refine (lambda_W) must be a number >= 0, got {self.refine!r}")


@register_method(SRSTE)
class SRSTEMethod(NMMethod):
    """Mask from |w| every step, straight-through gradients plus the refine term."""

    @property
    def refine(self) -> float:
        return self.config.refine

    def initial_masks(self) -> MaskUpdate:
        return MaskUpdate(self.latent_masks(), scales=(0.0, 1.0))

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate:
        return MaskUpdate(self.latent_masks(), scales=(0.0, 1.0))


def decay_at(step: int, start: int, end: int) -> float:
    """beta: 1 until `start`, linear down to 0 at `end`, 0 after.

    Example:
        >>> decay_at(75, 50, 150)
        0.75
    """
    if step <= start:
        return 1.0
    return max(0.0, (end - step) / (end - start))


@dataclass(frozen=True, kw_only=True)
class ProgressiveNM(Schedule):
    """Progressive N:M: decay the pruned entries of the mask from dense to exact N:M.

    Args:
        end: the step at which the model is exactly N:M; masks are frozen after it.
        start: the step at which the decay begins.

    Example:
        >>> Sparsifier(model, ProgressiveNM(end=2000), pattern="2:4")
    """

    name: ClassVar[str] = "progressive-nm"
    end: int
    start: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.start, "start")
        check_step(self.end, "end", low=self.start + 1)


@register_method(ProgressiveNM)
class ProgressiveNMMethod(NMMethod):
    """Mask from |w| each step while beta > 0, scaled by beta forward and backward."""

    def _update(self, step: int) -> MaskUpdate:
        beta = decay_at(step, self.config.start, self.config.end)
        return MaskUpdate(self.latent_masks(), scales=(beta, beta))

    def initial_masks(self) -> MaskUpdate:
        return self._update(0)

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        return self._update(step) if step <= self.config.end else None
