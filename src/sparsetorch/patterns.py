"""Sparsity patterns: which weights may be zero, decided from one score per weight.

A pattern turns a score tensor (higher means keep) and a target sparsity into a
boolean keep-mask of the same shape, exactly: an unstructured 50% layer of n weights
has exactly floor(0.5 * n) pruned entries, and 2:4 keeps exactly 2 of every 4
consecutive weights along the input dimension. Ties are broken by `torch.topk`, so
the count never drifts.

Weights are read as (out_features, in_features). Tensors with more dimensions (conv
kernels, (out, in, kh, kw)) move their input dimension last, so N:M groups run over
input channels as in NVIDIA's and NM-sparsity's conventions.

Example:
    >>> NM(2, 4).mask(torch.tensor([[1., 2, 3, 4, 5, 6, 7, 8]])).int()
    tensor([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Block",
    "NM",
    "Pattern",
    "Unstructured",
    "check_sparsity",
    "parse_pattern",
    "prune_count",
]


def check_sparsity(sparsity: float) -> float:
    """Return `sparsity` as a float, or raise ValueError if it is outside [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")
    return float(sparsity)


def prune_count(total: int, sparsity: float) -> int:
    """How many of `total` units a pattern prunes at `sparsity`: floor(sparsity * total).

    The tiny epsilon keeps 0.7 * 10 from landing on 6.999... and losing a weight.
    """
    return math.floor(sparsity * total + 1e-9)


def _keep_top(scores: Tensor, n_prune: int, dim: int = -1) -> Tensor:
    """Keep-mask that drops the `n_prune` lowest scores along `dim`; of the scores equal to the
    cut, the first ones along `dim` are dropped.

    The cut is each slice's `n_prune`-th lowest score (a selection, not a sort), so the transient
    memory is one copy of the scores, not the values and int64 indices of a top-k: a 7B model's
    largest layer is 45 M scores.
    """
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    cut = torch.kthvalue(scores, n_prune, dim=dim, keepdim=True).values
    keep = scores > cut
    ties = scores == cut
    tied = ties.sum(dim, keepdim=True)
    dropped_ties = n_prune - (~keep).sum(dim, keepdim=True) + tied  # ties to drop
    if bool((dropped_ties < tied).any()):  # some ties stay: the later ones
        keep |= _later_ties(ties, dropped_ties, dim)
    return keep


def _later_ties(ties: Tensor, n_first: Tensor, dim: int) -> Tensor:
    """Mask of the ties after each slice's first `n_first` along `dim`.

    Works on the ties' positions and the slices that hold them, a few int64s per tie, instead of a
    running count over every score (4 bytes each): a bf16 layer's cut is tied by some thousands of
    its 45 M scores.
    """
    moved = ties.movedim(dim, -1)
    width = moved.shape[-1]
    where = moved.reshape(-1).nonzero().squeeze(1)  # flat positions, slice by slice, in order along dim
    slices = where // width
    _, per_slice = torch.unique_consecutive(slices, return_counts=True)
    first = (per_slice.cumsum(0) - per_slice).repeat_interleave(per_slice)  # each tie's slice's first tie
    rank = torch.arange(where.numel(), device=ties.device) - first
    later = torch.zeros(moved.numel(), dtype=torch.bool, device=ties.device)
    later[where[rank >= n_first.movedim(dim, -1).reshape(-1)[slices]]] = True
    return later.view(moved.shape).movedim(-1, dim)


def _as_matrix(scores: Tensor) -> Tensor:
    """View scores as (rows, inputs) with the input dimension last (conv: (out*kh*kw, in))."""
    if scores.dim() < 2:
        raise ValueError(f"patterns apply to weight matrices with 2 or more dimensions, got shape {tuple(scores.shape)}")
    if scores.dim() == 2:
        return scores
    moved = scores.movedim(1, -1)  # (out, kh, kw, in)
    return moved.reshape(-1, moved.shape[-1])


def _from_matrix(mask: Tensor, like: Tensor) -> Tensor:
    """Inverse of `_as_matrix` for a mask computed on the matrix view."""
    if like.dim() == 2:
        return mask
    moved_shape = like.movedim(1, -1).shape
    return mask.reshape(moved_shape).movedim(-1, 1).contiguous()


class Pattern:
    """A sparsity structure. Subclasses implement `_matrix_mask` on a 2-D view."""

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the structure itself implies (N:M), or None if it takes any."""
        return None

    @property
    def group_width(self) -> int:
        """Columns decided together: SparseGPT must not split such a group."""
        return 1

    def resolve_sparsity(self, sparsity: float | None) -> float:
        """The sparsity this pattern prunes to, checking it against a fixed one."""
        fixed = self.fixed_sparsity
        if fixed is not None:
            if sparsity is not None and abs(sparsity - fixed) > 1e-6:
                raise ValueError(f"pattern {self.spec} always gives sparsity {fixed:g}, got sparsity={sparsity}")
            return fixed
        if sparsity is None:
            raise ValueError(f"pattern {self.spec} needs a sparsity in [0, 1)")
        return check_sparsity(sparsity)

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise ValueError if a weight of this shape cannot hold the pattern."""

    def mask(self, scores: Tensor, sparsity: float | None = None, *, n_prune: int | None = None) -> Tensor:
        """Boolean keep-mask (True = keep) with the shape of `scores`.

        Args:
            scores: importance per weight, higher means keep.
            sparsity: fraction to prune; N:M patterns imply it.
            n_prune: prune exactly this many units instead (elements, per-row elements or
                tiles, by pattern); used by solvers that prune a layer slice by slice.

        Raises:
            ValueError: the sparsity is out of range or the shape does not fit the pattern.
        """
        self.check_shape(scores.shape)
        sparsity = self.resolve_sparsity(sparsity)
        matrix = _as_matrix(scores)
        return _from_matrix(self._matrix_mask(matrix, sparsity, n_prune), scores)

    def _matrix_mask(self, scores: Tensor, sparsity: float, n_prune: int | None) -> Tensor:
        raise NotImplementedError

    def slice_n_prune(self, shape: tuple[int, int], sparsity: float, start: int, stop: int) -> int | None:
        """Units to prune in columns [start, stop) so that a left-to-right sweep over a
        (rows, cols) weight ends exact: cumulative floor counts, never per-slice rounding.
        None means the pattern decides a slice on its own (N:M)."""
        return None

    @property
    def spec(self) -> str:
        """The short string that `parse_pattern` reads back."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any weight may go; the lowest scores across the layer (or within each row) are pruned.

    Args:
        per_row: compare weights within each output row only (Wanda's choice for LLMs),
            so every row ends with the same sparsity.
    """

    per_row: bool = False

    def _matrix_mask(self, scores: Tensor, sparsity: float, n_prune: int | None) -> Tensor:
        if self.per_row:
            k = prune_count(scores.shape[1], sparsity) if n_prune is None else n_prune
            return _keep_top(scores, k, dim=1)
        k = prune_count(scores.numel(), sparsity) if n_prune is None else n_prune
        return _keep_top(scores.reshape(-1), k).reshape(scores.shape)

    def slice_n_prune(self, shape: tuple[int, int], sparsity: float, start: int, stop: int) -> int:
        per_column = 1 if self.per_row else shape[0]
        return prune_count(per_column * stop, sparsity) - prune_count(per_column * start, sparsity)

    @property
    def spec(self) -> str:
        return "unstructured-row" if self.per_row else "unstructured"


@dataclass(frozen=True)
class NM(Pattern):
    """Keep exactly `n` of every `m` consecutive weights along the input dimension.

    Example: NM(2, 4) is the 2:4 pattern that sparse tensor cores run.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ValueError(f"N:M needs whole numbers 0 < N < M (keep N of every M), got {self.n}:{self.m}")

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def group_width(self) -> int:
        return self.m

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        inputs = shape[1] if len(shape) >= 2 else None
        if inputs is None or inputs % self.m:
            raise ValueError(
                f"{self.spec} needs the input dimension to be divisible by {self.m}, got weight shape {tuple(shape)}"
            )

    def _matrix_mask(self, scores: Tensor, sparsity: float, n_prune: int | None) -> Tensor:
        groups = scores.reshape(-1, self.m)  # (rows * in / m, m)
        return _keep_top(groups, self.m - self.n, dim=1).reshape(scores.shape)

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block(Pattern):
    """Prune whole `height` x `width` tiles, ranked by the sum of their scores."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if not (isinstance(self.height, int) and isinstance(self.width, int)) or self.height < 1 or self.width < 1:
            raise ValueError(f"block size must be positive whole numbers, got {self.height}x{self.width}")

    @property
    def group_width(self) -> int:
        return self.width

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        if len(shape) != 2 or shape[0] % self.height or shape[1] % self.width:
            raise ValueError(
                f"block-{self.height}x{self.width} needs a 2-D weight with rows divisible by {self.height} "
                f"and columns divisible by {self.width}, got shape {tuple(shape)}"
            )

    def _matrix_mask(self, scores: Tensor, sparsity: float, n_prune: int | None) -> Tensor:
        rows, cols = scores.shape
        h, w = self.height, self.width
        tiles = scores.reshape(rows // h, h, cols // w, w).sum(dim=(1, 3))  # (rows/h, cols/w)
        k = prune_count(tiles.numel(), sparsity) if n_prune is None else n_prune
        keep_tiles = _keep_top(tiles.reshape(-1), k).reshape(tiles.shape)
        return keep_tiles.repeat_interleave(h, dim=0).repeat_interleave(w, dim=1)

    def slice_n_prune(self, shape: tuple[int, int], sparsity: float, start: int, stop: int) -> int:
        tiles_per_column = shape[0] // self.height
        start_tiles, stop_tiles = start // self.width, stop // self.width
        return prune_count(tiles_per_column * stop_tiles, sparsity) - prune_count(tiles_per_column * start_tiles, sparsity)

    @property
    def spec(self) -> str:
        return f"block-{self.height}x{self.width}"


_NM_SPEC = re.compile(r"^(\d+):(\d+)$")
_BLOCK_SPEC = re.compile(r"^(?:block-?)?(\d+)x(\d+)$")


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Read a pattern from its short name.

    Accepts 'unstructured', 'unstructured-row' (or 'row'), 'N:M' such as '2:4', and
    'block-HxW' such as 'block-4x4'. A Pattern passes through unchanged.

    Raises:
        ValueError: the name is none of those, or N:M / block sizes are invalid.
    """
    if isinstance(spec, Pattern):
        return spec
    text = str(spec).strip().lower()
    if text == "unstructured":
        return Unstructured()
    if text in ("unstructured-row", "row"):
        return Unstructured(per_row=True)
    if match := _NM_SPEC.match(text):
        return NM(int(match[1]), int(match[2]))
    if match := _BLOCK_SPEC.match(text):
        return Block(int(match[1]), int(match[2]))
    raise ValueError(
        f"unknown pattern {spec!r}: use 'unstructured', 'unstructured-row', 'N:M' (e.g. '2:4') "
        "or 'block-HxW' (e.g. 'block-4x4')"
    )
