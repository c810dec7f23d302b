"""Importance scores: one number per weight, higher means keep.

Each criterion is a pure function of the weight and, where it needs one, a
calibration statistic gathered by `sparsetorch.oneshot.stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["magnitude_scores", "random_scores", "wanda_scores"]


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W|: the classic baseline (Han et al., 2015)."""
    return weight.abs()


def wanda_scores(weight: Tensor, input_sq_norms: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2023, "Wanda").

    Args:
        weight: (out_features, in_features).
        input_sq_norms: (in_features,) sum over calibration tokens of x_j^2.

    Example:
        >>> wanda_scores(torch.tensor([[1., -2.]]), torch.tensor([4., 1.]))
        tensor([[2., 2.]])
    """
    if input_sq_norms.shape != weight.shape[1:2]:
        raise ValueError(
            f"wanda needs one input norm per column: weight {tuple(weight.shape)}, norms {tuple(input_sq_norms.shape)}"
        )
    return weight.abs() * input_sq_norms.sqrt().to(weight.dtype).unsqueeze(0)


def random_scores(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random scores: the baseline any criterion must beat."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32)
