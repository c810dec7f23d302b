"""The quantization half of SparseGPT's joint mode: prune and quantize in one column sweep.

The SparseGPT paper (section 3.4) joins its pruning with GPTQ: as the sweep reaches column i,
each weight of it is either pruned (to 0) or rounded onto its value grid, and the error of
either choice is spread by the inverse-Hessian factor over the columns not yet visited, so
the later columns absorb the rounding error of the earlier ones exactly as they absorb the
pruning error. This file holds the grids the sweep fills in and the sweep itself.

When is a grid found?
- Per group of `group_size` input columns (int4): when the sweep reaches the group's first
  column, from the current weights, which already carry every update of the columns before it
  (GPTQ's non-static groups, its `--static-groups` off), over the entries not known to be pruned
  at that point: the lazy block's mask for unstructured and block patterns; for N:M, whose masks
  are chosen every M columns, all of the group's entries not yet chosen against (the M - N
  pruned of each M are the smallest, so they rarely set a range). The caller makes the lazy
  blocks whole multiples of the group, so a group never straddles two blocks and its later
  columns have already received the updates of every block before.
- Per output channel (int8, `group_size` None): a row's range has to be known before its first
  column is rounded, so it is found before the sweep, from the kept weights of a pruning-only
  sweep (`sparsegpt._solve`). The SparseGPT code takes the dense weight's range instead, but the
  sweep's updates grow weights: on random layers with correlated inputs most rows ended past
  their dense range, and clamping them cost more than all of int8's rounding. The pre-pass costs
  a second sweep, per-channel schemes only.
  A weight the joint sweep still pushes past the range is clamped to the grid's end.

Rounding here does the very float32 operations of `sparsetorch.quantize.quantize` and
`dequantize`, so every weight the sweep leaves lies exactly on the grid it reports.

`sweep_joint` is the sweep in torch ops: the reference of the C++ op
(`kernels/csrc/sparsegpt_joint.h`, called through `sweep_joint_with_op`), which runs instead on
CPUs where the kernels build, for the reason the pruning-only sweep is C++ (`sparsegpt.py`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from sparsetorch.patterns import NM
from sparsetorch.quantize import QuantGrid, QuantScheme, find_grid

__all__ = ["SweepGrids", "sweep_importance", "sweep_joint", "sweep_joint_with_op"]


class SweepGrids:
    """The grid of a stacked (rows, cols) weight, group by group as the sweep reaches them.

    Example:
        >>> grids = SweepGrids(QuantScheme(bits=4, group_size=32), (64, 128), torch.device("cpu"))
        >>> grids.starts_group(0)
        True
    """

    def __init__(self, scheme: QuantScheme, shape: tuple[int, int], device: torch.device,
                 row_grid: QuantGrid | None = None) -> None:
        """For a (rows, cols) weight; `row_grid`: the grid of a per-channel scheme, found before the sweep."""
        rows, cols = shape
        if (scheme.group_size is None) != (row_grid is not None):
            raise ValueError("a per-channel scheme needs its grid before the sweep (row_grid); a grouped one finds "
                             "its grids during the sweep")
        self.scheme, self.cols = scheme, cols
        self.scale = torch.zeros(rows, scheme.groups(cols), dtype=torch.float16, device=device)
        self.zero_point = None if scheme.symmetric else torch.zeros_like(self.scale, dtype=torch.int16)
        self._column_scale = self._column_zero = None  # float32 (rows,) of the group being swept
        if row_grid is not None:
            self._store(0, row_grid)

    @property
    def group_size(self) -> int | None:
        return self.scheme.group_size

    def starts_group(self, column: int) -> bool:
        """Whether the sweep must find a grid before rounding `column`."""
        return self.group_size is not None and column % self.group_size == 0

    def find(self, column: int, values: Tensor, kept: Tensor, diag: Tensor) -> None:
        """Find the grid of the group starting at `column` from its current `values` (width, rows),
        transposed as the sweep holds them, over the entries where `kept` (width, rows) is True;
        a searched grid weighs column j's error by 1 / diag[j]^2, as the sweep's scores do."""
        assert column % self.group_size == 0 and values.shape[0] == min(self.group_size, self.cols - column)
        per_row = replace(self.scheme, group_size=None)  # one group's columns: one scale per row
        self._store(column // self.group_size, find_grid(values.t(), per_row, kept.t(), sweep_importance(diag)))

    def _store(self, group: int, grid: QuantGrid) -> None:
        self.scale[:, group] = grid.scale[:, 0]
        self._column_scale = grid.scale[:, 0].float()
        if self.zero_point is not None:
            self.zero_point[:, group] = grid.zero_point[:, 0]
            self._column_zero = grid.zero_point[:, 0].float()

    def round(self, values: Tensor) -> Tensor:
        """`values` (rows,) of the column being swept, rounded to nearest on its group's grid
        (`quantize` then `dequantize`, the same float32 operations)."""
        low, high = self.scheme.code_range
        scaled = values / self._column_scale
        if self._column_zero is not None:
            scaled = scaled + self._column_zero
        codes = torch.round(scaled).clamp_(low, high)
        if self._column_zero is not None:
            codes = codes - self._column_zero
        return codes.mul_(self._column_scale).add_(0.0)  # -0.0 (a small negative rounded to 0) becomes +0.0

    def block_buffers(self, width: int) -> tuple[Tensor, Tensor]:
        """(scale, zero) float32 (groups, rows) for the C++ sweep of a block of `width` columns: the given
        per-channel grid, or room for the grids of the block's groups, which the sweep finds."""
        rows = self.scale.shape[0]
        if self.group_size is None:
            zero = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
            return self.scale.t().float().contiguous(), zero.t().float().contiguous()
        groups = -(-width // self.group_size)
        empty = torch.zeros(groups, rows, dtype=torch.float32, device=self.scale.device)
        return empty, empty.clone()

    def store_block(self, start: int, scale: Tensor, zero: Tensor) -> None:
        """Keep the grids the C++ sweep found for the block starting at column `start`."""
        if self.group_size is None:
            return
        first = start // self.group_size
        groups = slice(first, first + scale.shape[0])
        self.scale[:, groups] = scale.t().to(self.scale.dtype)  # fp16 values already: exact
        if self.zero_point is not None:
            self.zero_point[:, groups] = zero.t().to(self.zero_point.dtype)

    def grids(self, rows: list[int]) -> list[QuantGrid]:
        """The finished grid of each stacked layer, `rows` rows each."""
        zeros = [None] * len(rows) if self.zero_point is None else self.zero_point.split(rows)
        return [QuantGrid(self.scheme, scale.contiguous(), None if zero is None else zero.contiguous(), self.cols)
                for scale, zero in zip(self.scale.split(rows), zeros)]


def sweep_importance(diag: Tensor) -> Tensor:
    """How much a rounding error in each column costs the layer's output, to first order: 1 / d^2, d
    the inverse Hessian factor's diagonal (the weight of SparseGPT's (w / d)^2 scores)."""
    return 1.0 / diag.square()


def sweep_joint(block: Tensor, hinv: Tensor, pruned: Tensor, errors: Tensor, n: int, m: int, grids: SweepGrids,
                start: int) -> None:
    """SparseGPT's in-block sweep that also quantizes: `sparsegpt.sweep_reference` with each kept weight
    rounded onto `grids` as the sweep reaches it.

    block (width, out), the weight's columns [start, start + width) transposed, is swept in place;
    pruned (width, out) is given (m == 0) or, for n:m, chosen every m columns from the updated
    weights; errors (width, out) receives each column's scaled error (w - q) / d, q being 0 where
    pruned and the rounded weight where kept. On return every weight is its q: pruned ones +0.0,
    kept ones on their grid.
    """
    diag = hinv.diagonal()
    for i in range(block.shape[0]):
        if m and i % m == 0:
            group = slice(i, i + m)
            pruned[group] = ~NM(n, m).mask((block[group].t() / diag[group]).square()).t()
        if grids.starts_group(start + i):
            group = slice(i, i + grids.group_size)
            grids.find(start + i, block[group], ~pruned[group], diag[group])
        target = grids.round(block[i]).masked_fill_(pruned[i], 0.0)  # (out,)
        torch.sub(block[i], target, out=errors[i]).div_(diag[i])
        block[i:].addr_(hinv[i, i:], errors[i], alpha=-1.0)
        block[i] = target  # what the update left there, up to float rounding


def sweep_joint_with_op(op, block: Tensor, hinv: Tensor, pruned: Tensor, errors: Tensor, n: int, m: int,
                        grids: SweepGrids, start: int) -> None:
    """`sweep_joint` through the C++ op `sparsegpt_sweep_joint` (`kernels/csrc/sparsegpt_joint.h`)."""
    scale, zero = grids.block_buffers(block.shape[0])
    low, high = grids.scheme.code_range
    op(block, hinv, pruned, errors, n, m, scale, zero, grids.group_size or 0, low, high, grids.scheme.symmetric,
       grids.scheme.search)
    grids.store_block(start, scale, zero)
