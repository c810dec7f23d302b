"""How much sparsity each decoder block gets, keeping the mean at the target.

- `uniform`: every block the target (what Wanda and SparseGPT do).
- `owl` (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): blocks with more outliers keep more
  weights. A block's outlier ratio is the fraction of its Wanda scores |W|·‖X‖ above M times their mean
  (over all its target layers together); the ratios are scaled to a spread of 2λ around the target,
  higher ratio, lower sparsity.
- `depth`: an arithmetic progression over depth, later blocks sparser (ATP-style), `step` apart.
Every layer of a block gets its block's sparsity; an explicit `{layer: sparsity}` map overrides per layer.
These are pure functions of numbers: the statistics OWL needs are gathered by the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ALLOCATIONS", "check_spread", "depth", "outlier_ratio", "owl", "uniform"]

ALLOCATIONS: tuple[str, ...] = ("uniform", "owl", "depth")


def uniform(blocks: int, target: float) -> list[float]:
    """Every block the target sparsity."""
    return [target] * blocks


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction of the entries of `scores` (a block's Wanda scores, any shapes) above `m` times their mean.

    Example:
        >>> outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], m=2.0)  # mean 3: one entry above 6
        0.25
    """
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).sum()) / max(flat.numel(), 1)


def owl(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Sparsity per block from its outlier ratio: densities spread over [1 - target - λ, 1 - target + λ]
    by min-max scaling, then shifted so their mean is 1 - target. Equal ratios give `uniform`.

    Example:
        >>> owl([0.01, 0.02, 0.03], target=0.7, lam=0.08)  # the most outliers, the least sparsity
        [0.78, 0.7, 0.62]
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    if r.numel() == 0 or float(r.max() - r.min()) == 0.0:
        return uniform(r.numel(), target)
    scaled = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    density = scaled - scaled.mean() + (1 - target)
    return [round(float(1 - d), 12) for d in density]


def depth(blocks: int, target: float, step: float) -> list[float]:
    """target + step·(i - (blocks - 1)/2) for block i: later blocks sparser, the mean the target.

    Example:
        >>> depth(3, 0.5, 0.1)
        [0.4, 0.5, 0.6]
    """
    middle = (blocks - 1) / 2
    return [round(target + step * (i - middle), 12) for i in range(blocks)]


def check_spread(sparsities: Sequence[float], what: str) -> None:
    """Every sparsity must lie in [0, 1).

    Raises:
        ValueError: naming the allocation and the out-of-range value, with the knob to turn.
    """
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"{what} gives a block sparsity of {bad[0]:.3f}, outside [0, 1); lower the spread "
                         "(owl_lambda, depth_step) or the target sparsity")
