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
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparsetorch.kernels.build import best_ops
from sparsetorch.patterns import NM, Pattern

__all__ = ["inverse_hessian_factor", "sparsegpt_prune", "sparsegpt_prune_many"]


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
    gram = gram.detach().double().clone()
    dead = gram.diagonal() == 0
    gram[dead, dead] = 1.0  # a dead input gets a unit curvature: its weights are zeroed anyway
    mean_diag = gram.diagonal().mean()
    while True:
        damped = gram.clone()
        damped.diagonal().add_(dampening * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if info == 0:
            return _upper_factor_of_inverse(factor).float().contiguous()  # row-major: the sweep reads rows
        if dampening >= 1.0:
            raise RuntimeError("SparseGPT: the Hessian stays singular even with dampening 1.0")
        dampening = min(dampening * 10, 1.0)


def _upper_factor_of_inverse(reversed_factor: Tensor) -> Tensor:
    """U with H^-1 = U^T U, upper triangular, from L = cholesky(J H J) (J reverses order).

    H = (J L J)(J L J)^T with J L J upper triangular, so U = (J L J)^-1 = J L^-1 J: one
    factorization and one triangular solve, a third less time than factoring H,
    inverting it and factoring the inverse (the same U to float32 rounding).
    """
    eye = torch.eye(reversed_factor.shape[0], dtype=reversed_factor.dtype, device=reversed_factor.device)
    return torch.linalg.solve_triangular(reversed_factor, eye, upper=False).flip(0, 1)


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
    for weight in weights:
        pattern.check_shape(weight.shape)
    sparsity = pattern.resolve_sparsity(sparsity)
    rows = [w.shape[0] for w in weights]
    W = torch.cat([w.detach().float() for w in weights])  # (sum of rows, in)
    cols = W.shape[1]
    W[:, gram.diagonal() == 0] = 0.0  # inputs that were always zero carry no information
    if hinv is None:
        hinv = inverse_hessian_factor(gram, dampening)  # (in, in), upper triangular
    group = pattern.group_width
    block_size = max(group, block_size // group * group)
    keep = torch.ones_like(W, dtype=torch.bool)
    Wt = W.t().contiguous()  # (in, out): column i of W is a contiguous row here
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block_keep, errors = _prune_block(Wt, hinv, pattern, sparsity, rows, start, stop)
        keep[:, start:stop] = block_keep
        Wt[stop:] -= hinv[start:stop, stop:].t() @ errors  # lazy update of the columns to the right
    pruned = Wt.t().contiguous()
    return list(zip(pruned.split(rows), keep.split(rows)))


def _slice_keep(scores: Tensor, pattern: Pattern, sparsity: float, rows: list[int], cols: int, start: int,
                stop: int) -> Tensor:
    """Keep-mask of one column slice, (out, width), chosen layer by layer."""
    masks = []
    for part, count in zip(scores.split(rows), rows):
        n_prune = pattern.slice_n_prune((count, cols), sparsity, start, stop)
        masks.append(pattern.mask(part, sparsity, n_prune=n_prune))
    return torch.cat(masks)


def _prune_block(
    Wt: Tensor, hinv: Tensor, pattern: Pattern, sparsity: float, rows: list[int], start: int, stop: int
) -> tuple[Tensor, Tensor]:
    """Prune columns [start, stop) of W (rows of Wt) in place; return their keep mask and
    the scaled errors, (width, out)."""
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
    sweep = sweep_op() if _op_can_sweep(block, hinv_block, m) else sweep_reference
    sweep(block, hinv_block, pruned, errors, n, m)
    return ~pruned.t(), errors


@functools.cache
def sweep_op():
    """The C++ sweep of the best ISA this CPU runs (`kernels/csrc/sparsegpt.h`), or None."""
    ops = best_ops()
    return None if ops is None else ops.sparsegpt_sweep


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
