"""Calibration statistics of a layer's input, gathered batch by batch.

Solvers never see activations, only these small accumulators (the split that
SparseGPT's `add_batch` / `fasterprune` made popular): Wanda needs the squared norm
of every input column, SparseGPT the Gram matrix X^T X. Every statistic also keeps
the column sums, so any of them answers `input_means()` and `input_sq_norms()`: with
`tokens` those give each input's mean and variance (DSnoT's refinement reads both).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from sparsetorch.precision import full_precision

__all__ = ["Gram", "InputSqNorms", "Statistic"]


def _rows(x: Tensor) -> Tensor:
    """(..., in_features) activations as (tokens, in_features) float32."""
    return x.reshape(-1, x.shape[-1]).float()


class Statistic:
    """Base accumulator: `add_batch(x)` for each calibration batch, then read the value.

    Besides its own value, every statistic sums each input column (float64, one cheap
    reduction per batch), so the per-column mean is there whichever statistic a method
    collected.
    """

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.tokens = 0
        self.sums = torch.zeros(columns, dtype=torch.float64)

    def add_batch(self, x: Tensor) -> None:
        rows = _rows(x)
        if rows.shape[1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got {rows.shape[1]}")
        self.tokens += rows.shape[0]
        self.sums += rows.sum(dim=0).double()  # float32 pairwise sum per batch, float64 across
        self._add(rows)

    def _add(self, rows: Tensor) -> None:
        raise NotImplementedError

    def input_means(self) -> Tensor:
        """Mean of every input column over all tokens, (in,) float64.

        Raises:
            ValueError: no batch was added yet, so there is no mean.

        Example:
            >>> stat.input_means()  # after stat.add_batch(torch.tensor([[1., 2.], [3., 0.]]))
            tensor([2., 1.], dtype=torch.float64)
        """
        if self.tokens == 0:
            raise ValueError(f"{type(self).__name__} has seen no tokens: call add_batch(x) before reading means")
        return self.sums / self.tokens

    def input_sq_norms(self) -> Tensor:
        """Sum over tokens of x_j^2 for every input column j, (in,) float64: Wanda's ||X_j||_2^2."""
        raise NotImplementedError(f"{type(self).__name__} must implement input_sq_norms()")


class InputSqNorms(Statistic):
    """Sum over tokens of x_j^2, per input column: Wanda's ||X_j||_2^2."""

    def __init__(self, columns: int) -> None:
        super().__init__(columns)
        self.value = torch.zeros(columns, dtype=torch.float64)

    def _add(self, rows: Tensor) -> None:
        self.value += rows.square().sum(dim=0).double()  # float32 pairwise sum per batch

    def input_sq_norms(self) -> Tensor:
        """The accumulated value itself."""
        return self.value


class Gram(Statistic):
    """X^T X summed over tokens, (in, in) float32: the layer-wise Hessian up to scale.

    The product is symmetric, so only the upper triangle is accumulated, in 4 bands of
    rows: 5/8 of a full matmul's work (torch exposes no BLAS syrk). The lower triangle
    is mirrored in on first read. The product always runs in float32, also inside a
    bf16-autocast calibration forward (`precision.py`): a bf16 product rounds every
    entry of each batch's sum, and SparseGPT's inverse amplifies that, while products of
    bf16-rounded activations are exact in float32. Solvers may memoize derived matrices (SparseGPT's inverse factor) in
    `cache`, so layers that share an input (q/k/v) share that too.
    """

    BANDS = 4

    def __init__(self, columns: int) -> None:
        super().__init__(columns)
        self._upper = torch.zeros(columns, columns, dtype=torch.float32)
        self._full: Tensor | None = None
        edges = [round(i * columns / self.BANDS) for i in range(self.BANDS + 1)]
        self._bands = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]  # row ranges
        self.cache: dict = {}

    def _add(self, rows: Tensor) -> None:
        with full_precision(rows.device):
            for lo, hi in self._bands:  # (hi-lo, tokens) @ (tokens, in-lo): band of the upper triangle
                self._upper[lo:hi, lo:].addmm_(rows[:, lo:hi].t(), rows[:, lo:])
        self._full = None

    @property
    def value(self) -> Tensor:
        if self._full is None:
            upper = self._upper.triu()
            self._full = upper + upper.t() - torch.diag(upper.diagonal())
        return self._full

    def input_sq_norms(self) -> Tensor:
        """The diagonal is Wanda's statistic, so one pass serves both."""
        return self.value.diagonal().double()
