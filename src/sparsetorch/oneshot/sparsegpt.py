"""SparseGPT: prune a layer and update the kept weights to undo the damage (Frantar & Alistarh, 2023).

Optimal Brain Surgeon, column by column: pruning column i leaves an error that the
inverse Hessian spreads over the columns not yet visited. Updates are applied lazily,
one block of columns at a time, so the expensive part is one matrix product per block.
The mask is chosen adaptively from the *updated* weights: for every block of columns
(unstructured and block patterns), or for every group of M columns (N:M).

Inside a block, the column-by-column sweep runs as a C++ op on float32 CPU tensors
(`kernels/csrc/sparsegpt.h`: slices of rows, each through the whole block in L1), since
as torch ops the per-column call overhead would dominate the solve. `sweep_reference` is
the same sweep in torch ops: the op's test reference, and what runs on other devices or
without a compiler.

`sparsegpt_quantize_many` is the paper's joint sparsification and quantization: the same sweep
also rounds each kept weight onto its grid and spreads that error too (`oneshot/joint.py`), as a
C++ op as well (`kernels/csrc/sparsegpt_joint.h`), with `joint.sweep_joint` its torch reference.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from sparsetorch.kernels.build import best_ops
from sparsetorch.oneshot.joint import SweepGrids, sweep_importance, sweep_joint, sweep_joint_with_op
from sparsetorch.patterns import NM, Pattern
from sparsetorch.quantize import QuantGrid, QuantScheme, find_grid

__all__ = ["inverse_hessian_factor", "sparsegpt_prune", "sparsegpt_prune_many", "sparsegpt_quantize_many"]


def inverse_hessian_factor(gram: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, computed in float64.

    LLM input Hessians are badly conditioned; factoring in double precision (cheap: one
    (in, in) matrix per group of layers) measurably lowers the pruned model's perplexity
    compared with float32. Dampening is raised
    tenfold (up to 1.0) if the matrix is still not positive definite, rather than giving
    up on the layer.

    Raises:
        ValueError: dampening is not positive.
    """
    if not dampening > 0:
        raise ValueError(f"dampening must be > 0 (a fraction of the mean Hessian diagonal), got {dampening}")
    reversed_gram = gram.detach().flip(0, 1).double()  # J H J (J reverses order): see _upper_factor_of_inverse
    dead = reversed_gram.diagonal() == 0
    reversed_gram[dead, dead] = 1.0  # a dead input gets a unit curvature: its weights are zeroed anyway
    mean_diag = reversed_gram.diagonal().flip(0).mean()  # summed in the stored order
    added = 0.0
    while True:
        reversed_gram.diagonal().add_(dampening * mean_diag - added)  # damped in place: no second matrix
        added = dampening * mean_diag
        factor, info = torch.linalg.cholesky_ex(reversed_gram)
        if info == 0:
            del reversed_gram
            return _upper_factor_of_inverse(factor)
        if dampening >= 1.0:
            raise RuntimeError("SparseGPT: the Hessian stays singular even with dampening 1.0")
        dampening = min(dampening * 10, 1.0)


def _upper_factor_of_inverse(reversed_factor: Tensor) -> Tensor:
    """U with H^-1 = U^T U, upper triangular, from L = cholesky(J H J) (J reverses order).

    H = (J L J)(J L J)^T with J L J upper triangular, so U = (J L J)^-1 = J L^-1 J: one
    factorization and one triangular solve, a third less time than factoring H,
    inverting it and factoring the inverse (the same U to float32 rounding).

    The result is float32 and row-major (the sweep reads rows); at most two float64 matrices
    exist at once (a 7B model's MLP input is 11008 wide: 0.97 GB each).
    """
    eye = torch.eye(reversed_factor.shape[0], dtype=reversed_factor.dtype, device=reversed_factor.device)
    inverse = torch.linalg.solve_triangular(reversed_factor, eye, upper=False, out=eye)
    return inverse.float().flip(0, 1)


def sparsegpt_prune(
    weight: Tensor,
    gram: Tensor,
    pattern: Pattern,
    sparsity: float | None,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    hinv: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune `weight` to `pattern` and reconstruct the layer output on calibration data.

    Args:
        weight: (out_features, in_features).
        gram: (in, in) X^T X of the layer inputs (any positive scale).
        pattern: the structure to prune to; N:M masks are chosen every M columns.
        sparsity: fraction to prune (N:M implies it).
        block_size: columns per lazy update; rounded down to whole pattern groups.
        dampening: fraction of the mean Hessian diagonal added to it.
        hinv: `inverse_hessian_factor(gram, dampening)` if already computed.

    Returns:
        (pruned weight float32, keep mask), both (out, in).

    Example:
        >>> new_weight, keep = sparsegpt_prune(layer.weight, gram.value, NM(2, 4), None)
    """
    [result] = sparsegpt_prune_many([weight], gram, pattern, sparsity, block_size=block_size,
                                    dampening=dampening, hinv=hinv)
    return result


def sparsegpt_prune_many(
    weights: list[Tensor],
    gram: Tensor,
    pattern: Pattern,
    sparsity: float | None,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    hinv: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """`sparsegpt_prune` for layers that share one input (q/k/v): one column sweep over
    their stacked rows, the same result as pruning each alone, at one sweep's cost.

    Each layer keeps its own exact sparsity: masks are chosen per layer.
    """
    pruned, keep, _ = _solve(weights, gram, pattern, sparsity, block_size, dampening, hinv, None)
    return list(zip(pruned, keep))


def sparsegpt_quantize_many(
    weights: list[Tensor],
    gram: Tensor,
    pattern: Pattern,
    sparsity: float | None,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    hinv: Tensor | None = None,
) -> list[tuple[Tensor, Tensor, QuantGrid]]:
    """SparseGPT's joint mode: prune to `pattern` and quantize the kept weights to `scheme` in one sweep.

    Each kept weight is rounded onto its grid as the sweep reaches it, and the rounding error,
    like the pruning error, is spread over the columns not yet visited (see `oneshot/joint.py`
    for when each grid is found). The lazy blocks are rounded up to whole groups of the scheme.

    Returns:
        Per layer (weight float32, keep mask, grid): every kept weight lies exactly on the grid,
        `dequantize(quantize(w, grid), grid) * keep == w`; pruned weights are +0.0.

    Example:
        >>> [(w, keep, grid)] = sparsegpt_quantize_many([layer.weight], gram, NM(2, 4), None,
        ...                                             QuantScheme(bits=4, group_size=128))
    """
    pruned, keep, grids = _solve(weights, gram, pattern, sparsity, block_size, dampening, hinv, scheme)
    return list(zip(pruned, keep, grids))


def _solve(weights: list[Tensor], gram: Tensor, pattern: Pattern, sparsity: float | None, block_size: int,
           dampening: float, hinv: Tensor | None, scheme: QuantScheme | None):
    """The column sweep over the stacked rows of `weights`: (weights, masks, grids or None), per layer."""
    for weight in weights:
        pattern.check_shape(weight.shape)
    sparsity = pattern.resolve_sparsity(sparsity)
    rows = [w.shape[0] for w in weights]
    W = torch.cat([w.detach().float() for w in weights])  # (sum of rows, in)
    cols = W.shape[1]
    W[:, gram.diagonal() == 0] = 0.0  # inputs that were always zero carry no information
    if hinv is None:
        hinv = inverse_hessian_factor(gram, dampening)  # (in, in), upper triangular
    grids = None if scheme is None else _sweep_grids(weights, gram, pattern, sparsity, block_size, dampening, hinv,
                                                     scheme)
    group = _lazy_unit(pattern, scheme)
    block_size = max(group, block_size // group * group)
    keep = torch.ones_like(W, dtype=torch.bool)
    Wt = W.t().contiguous()  # (in, out): column i of W is a contiguous row here
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block_keep, errors = _prune_block(Wt, hinv, pattern, sparsity, rows, start, stop, grids)
        keep[:, start:stop] = block_keep
        Wt[stop:] -= hinv[start:stop, stop:].t() @ errors  # lazy update of the columns to the right
    pruned = Wt.t().contiguous()
    return pruned.split(rows), keep.split(rows), None if grids is None else grids.grids(rows)


def _sweep_grids(weights: list[Tensor], gram: Tensor, pattern: Pattern, sparsity: float, block_size: int,
                 dampening: float, hinv: Tensor, scheme: QuantScheme) -> SweepGrids:
    """The grids the joint sweep fills in; a per-channel scheme's are found first, from the kept
    weights of a pruning-only sweep (why: `oneshot/joint.py`)."""
    shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
    row_grid = None
    if scheme.group_size is None:
        pruned, keep, _ = _solve(weights, gram, pattern, sparsity, block_size, dampening, hinv, None)
        row_grid = find_grid(torch.cat(pruned), scheme, torch.cat(keep), sweep_importance(hinv.diagonal()))
    return SweepGrids(scheme, shape, weights[0].device, row_grid)


def _lazy_unit(pattern: Pattern, scheme: QuantScheme | None) -> int:
    """Columns a lazy block is a multiple of: the pattern's group, and the quantization group."""
    if scheme is None or scheme.group_size is None:
        return pattern.group_width
    return math.lcm(pattern.group_width, scheme.group_size)


def _slice_keep(scores: Tensor, pattern: Pattern, sparsity: float, rows: list[int], cols: int, start: int,
                stop: int) -> Tensor:
    """Keep-mask of one column slice, (out, width), chosen layer by layer."""
    masks = []
    for part, count in zip(scores.split(rows), rows):
        n_prune = pattern.slice_n_prune((count, cols), sparsity, start, stop)
        masks.append(pattern.mask(part, sparsity, n_prune=n_prune))
    return torch.cat(masks)


def _prune_block(
    Wt: Tensor, hinv: Tensor, pattern: Pattern, sparsity: float, rows: list[int], start: int, stop: int,
    grids: SweepGrids | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune columns [start, stop) of W (rows of Wt) in place, and quantize them onto `grids` if
    given; return their keep mask and the scaled errors, (width, out)."""
    block = Wt[start:stop]  # (width, out), a view: swept in place
    hinv_block = hinv[start:stop, start:stop]
    if isinstance(pattern, NM):  # masks chosen during the sweep, from the updated weights
        n, m = pattern.n, pattern.m
        pruned = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
    else:
        n = m = 0
        scores = (block.t() / hinv_block.diagonal()).square()
        pruned = (~_slice_keep(scores, pattern, sparsity, rows, Wt.shape[0], start, stop)).t().contiguous()
    errors = torch.zeros_like(block)
    if grids is not None:
        if _op_can_sweep(block, hinv_block, m) and joint_sweep_op() is not None:
            sweep_joint_with_op(joint_sweep_op(), block, hinv_block, pruned, errors, n, m, grids, start)
        else:
            sweep_joint(block, hinv_block, pruned, errors, n, m, grids, start)
    else:
        sweep = sweep_op() if _op_can_sweep(block, hinv_block, m) else sweep_reference
        sweep(block, hinv_block, pruned, errors, n, m)
    return ~pruned.t(), errors


@functools.cache
def sweep_op():
    """The C++ sweep of the best ISA this CPU runs (`kernels/csrc/sparsegpt.h`), or None."""
    ops = best_ops()
    return None if ops is None else ops.sparsegpt_sweep


@functools.cache
def joint_sweep_op():
    """The C++ joint sweep (`kernels/csrc/sparsegpt_joint.h`), or None."""
    ops = best_ops()
    return None if ops is None else getattr(ops, "sparsegpt_sweep_joint", None)


def _op_can_sweep(block: Tensor, hinv_block: Tensor, m: int) -> bool:
    return (
        block.device.type == "cpu"
        and hinv_block.device.type == "cpu"
        and hinv_block.dtype == torch.float32
        and hinv_block.stride(1) == 1
        and m <= MAX_OP_GROUP
        and sweep_op() is not None
    )


MAX_OP_GROUP = 64  # the C++ sweep's largest m (kMaxGroup)


def sweep_reference(block: Tensor, hinv: Tensor, pruned: Tensor, errors: Tensor, n: int, m: int) -> None:
    """The sweep in torch ops, on any device: the C++ op's reference and fallback.

    block (width, out) is swept in place; pruned (width, out) is given (m == 0) or, for
    n:m, chosen every m columns from the updated weights; errors (width, out) receives
    each column's error (0 where kept). Pruned weights end as exactly +0.0.
    """
    diag = hinv.diagonal()
    scale = pruned / diag.unsqueeze(1)  # error per unit of weight, 0 where kept
    for i in range(block.shape[0]):
        if m and i % m == 0:
            group = slice(i, i + m)
            pruned[group] = ~NM(n, m).mask((block[group].t() / diag[group]).square()).t()
            scale[group] = pruned[group] / diag[group].unsqueeze(1)
        torch.mul(block[i], scale[i], out=errors[i])
        block[i:].addr_(hinv[i, i:], errors[i], alpha=-1.0)
    block.masked_fill_(pruned, 0.0)
