"""Reconstruction after masking: refit the kept weights so the pruned layer, or block, computes
what the dense one did on the calibration data. The mask is fixed; only kept weights change.

- `refit_layer`: per layer, least squares on the layer's outputs. Every row r solves
  min (w - w_dense) H (w - w_dense)^T over the weights on its support keep[r], with H the
  calibration Gram X^T X damped as in SparseGPT. Each row has its own support, so an exact solve
  is one Cholesky per row; instead all rows run conjugate gradient together, one
  (out, in) @ (in, in) product per iteration, each row with its own step sizes, Jacobi
  preconditioned (LLM Grams have a few outlier columns orders of magnitude above the rest).
  It starts from the method's weights, so a few iterations suffice and stopping early only
  leaves part of the gain.
- `reconstruct_block`: per decoder block, a few optimizer steps on the kept weights of its
  pruned linears so the block's output matches the dense block's (the nonlinearities and the
  interaction between layers that a per-layer fit cannot see, as in Wanda++ and SquareHead).

Both guarantee not to make things worse on the calibration data: a row whose refit error is
not below its starting error keeps its starting weights, and a block whose loss did not drop
gets its starting weights back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsetorch.precision import calibration_precision, full_precision

__all__ = ["BlockFit", "reconstruct_block", "refit_layer"]

DEFAULT_ITERATIONS = 16  # CG iterations per layer: most of the gain of an exact solve (see refit_layer)
DEFAULT_STEPS = 12  # optimizer steps per block, one calibration batch each
DEFAULT_LR = 1e-3  # Adam's: a few steps go far, well below the rates at which they overshoot


def refit_layer(
    dense_weight: Tensor,
    weight: Tensor,
    keep: Tensor,
    gram: Tensor,
    *,
    dampening: float = 0.01,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = 1e-3,
) -> Tensor:
    """Refit the kept weights of every row to the dense layer's outputs on the calibration inputs.

    Minimizes, per row r, (w - dense[r]) (H + d I) (w - dense[r])^T over w that are zero outside
    keep[r], with H = `gram` and d = dampening * mean(diag H) (the ridge SparseGPT uses: it keeps
    weights of rarely active inputs from growing without bound). Batched Jacobi-preconditioned
    conjugate gradient from `weight`; a row whose undamped error (w - dense[r]) H (...)^T ends
    no lower than `weight[r]`'s keeps `weight[r]`.

    Args:
        dense_weight: (out, in) the layer's weights before pruning.
        weight: (out, in) the pruning method's weights (the starting point; values outside
            `keep` are ignored).
        keep: (out, in) bool mask of the kept weights.
        gram: (in, in) X^T X of the layer's calibration inputs (any positive scale).
        dampening: fraction of the mean Gram diagonal added to it.
        iterations: most CG iterations (each one (out, in) @ (in, in) product).
        tolerance: stop once every row's preconditioned residual fell below this fraction of
            its starting one.

    Returns:
        (out, in) float32 weights, exactly +0.0 outside `keep`.

    Raises:
        ValueError: shapes that do not fit, dampening not positive, negative iterations.

    Example:
        >>> new_weight = refit_layer(dense, wanda_weight, keep, gram.value)
        >>> bool((new_weight[~keep] == 0).all())
        True
    """
    _check_layer(dense_weight, weight, keep, gram, dampening, iterations)
    with full_precision(weight.device), torch.no_grad():
        keep = keep.to(torch.bool)
        dense = dense_weight.detach().float()
        start = weight.detach().float().masked_fill(~keep, 0.0)
        hessian = gram.detach().float()
        damp = dampening * float(hessian.diagonal().mean())
        if not damp > 0 or iterations == 0:  # an all-zero Gram: no calibration data to fit
            return start.contiguous()
        damped = hessian.clone()
        damped.diagonal().add_(damp)
        start_error = (start - dense) @ damped  # (out, in): the start's error times H + dI
        step = _conjugate_gradient(damped, -start_error, keep, iterations, tolerance)
        # change in undamped error, step D from start S (error E): D H D^T + 2 D H E^T, per row
        step_h = step @ damped - damp * step
        start_h = start_error - damp * (start - dense)
        change = (step * (step_h + 2 * start_h)).double().sum(1)
        better = (change < 0).unsqueeze(1)
        return torch.where(better, start + step, start).masked_fill_(~keep, 0.0)


def _conjugate_gradient(matrix: Tensor, residual: Tensor, keep: Tensor, iterations: int,
                        tolerance: float) -> Tensor:
    """The step D, zero outside `keep`, that approximately solves (D matrix)[keep] = residual[keep]
    for every row at once: Jacobi-preconditioned CG with per-row step sizes, from D = 0.

    The mask lives in the preconditioner alone: z = keep * residual / diag is zero outside the
    support, so are the search directions, and the residual's values outside it are never read.
    That spares a masking pass over each product. `residual` is updated in place.
    """
    preconditioner = keep / matrix.diagonal()  # (out, in): Jacobi, restricted to each row's support
    step = torch.zeros_like(residual)
    z = residual * preconditioner
    direction = z.clone()
    rz = torch.linalg.vecdot(residual, z)  # (out,) preconditioned residual norm^2 per row
    stop = rz * tolerance**2
    for _ in range(iterations):
        product = direction @ matrix  # (out, in); outside the support it is never used
        curvature = torch.linalg.vecdot(direction, product)
        alpha = torch.where(curvature > 0, rz / curvature, 0.0).unsqueeze(1)
        step.addcmul_(alpha, direction)
        residual.addcmul_(alpha, product, value=-1.0)
        torch.mul(residual, preconditioner, out=z)
        rz_next = torch.linalg.vecdot(residual, z)
        if bool((rz_next <= stop).all()):
            break
        beta = torch.where(rz > 0, rz_next / rz, 0.0).unsqueeze(1)
        z.addcmul_(beta, direction)
        direction, z = z, direction  # the old direction's memory takes the next z
        rz = rz_next
    return step


def _check_layer(dense: Tensor, weight: Tensor, keep: Tensor, gram: Tensor, dampening: float,
                 iterations: int) -> None:
    if dense.dim() != 2 or weight.shape != dense.shape or keep.shape != dense.shape:
        raise ValueError(f"dense_weight, weight and keep must be one (out, in) shape, got {tuple(dense.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(keep.shape)}")
    columns = dense.shape[1]
    if gram.shape != (columns, columns):
        raise ValueError(f"gram must be (in, in) = ({columns}, {columns}) for weights {tuple(dense.shape)}, "
                         f"got {tuple(gram.shape)}")
    if not dampening > 0:
        raise ValueError(f"dampening must be > 0 (a fraction of the mean Gram diagonal), got {dampening}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


@dataclass(frozen=True)
class BlockFit:
    """What `reconstruct_block` did: the mean normalized loss over all batches before and after,
    the optimizer steps taken and the time it took (after = before where the start was restored)."""

    loss_before: float
    loss_after: float
    steps: int
    seconds: float


def reconstruct_block(
    block: nn.Module,
    keep: dict[nn.Module, Tensor],
    forwards: list[Callable[[], Tensor]],
    targets: list[Tensor],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    precision: str = "auto",
    seed: int = 0,
    outputs: list[Tensor] | None = None,
    project: Callable[[], None] | None = None,
) -> BlockFit:
    """Train the kept weights of `block`'s pruned linears so its outputs match the dense block's.

    The loss of batch i is ||forwards[i]() - targets[i]||^2 / ||targets[i]||^2 (normalized, as
    SquareHead's, so one learning rate suits blocks of any output scale). Adam takes `steps`
    steps, one calibration batch each, in a fixed shuffled order; gradients of pruned weights
    are zeroed and the masks reapplied after every step, so pruned weights stay exactly +0.0.
    Everything but the keys' weights stays frozen. The forward and backward run under bf16
    autocast where `precision` asks for it (see `precision.calibration_dtype`); weights and
    optimizer state stay in the model's dtype. The loss over all batches is measured before and
    after, in the model's dtype; if it did not drop, the starting weights are put back.

    Args:
        block: the decoder block, its pruned linears already masked.
        keep: pruned linear -> its keep mask, shaped like its `weight`.
        forwards: one thunk per calibration batch running `block` on that batch's input.
        targets: the dense block's output per batch, shaped like `forwards[i]()`.
        steps: optimizer steps (one batch each; batches repeat when steps exceed them).
        lr: Adam's learning rate.
        precision: the training forwards' dtype choice, one of `precision.CALIB_DTYPES`.
        seed: of the batch order.
        outputs: a list to fill with the block's final output per batch, in the model's dtype
            (the next block's inputs): the loss measurement after the fit computes them anyway,
            so a caller that wants them is spared a pass over the calibration data.
        project: called without gradients on the trained weights (when steps > 0) before the
            loss after is measured, e.g. to round them back onto their quantization grids: the
            loss after, the outputs and the choice between trained and starting weights are
            then those of the projected weights.

    Returns:
        BlockFit with the mean loss over all batches before and after, steps taken and seconds.

    Raises:
        ValueError: no batches, as many targets as batches not given, a mask that does not
            fit its layer's weight, or negative steps or lr.

    Example:
        >>> fit = reconstruct_block(block, {block.mlp.down_proj: keep}, batches.forwards(block, hidden), dense_outputs)
        >>> fit.loss_after <= fit.loss_before
        True
    """
    _check_block(keep, forwards, targets, steps, lr)
    started = time.perf_counter()
    layers = list(keep)
    weights = [layer.weight for layer in layers]
    masks = [keep[layer].to(device=w.device, dtype=torch.bool) for layer, w in zip(layers, weights)]
    wanted = {p: p.requires_grad for p in block.parameters()}
    start = [w.detach().clone() for w in weights]
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        before = _mean_loss(forwards, targets)
        if steps:
            _train(block, weights, masks, forwards, targets, steps, lr, precision, seed)
            if project is not None:
                with torch.no_grad():
                    project()
        after = _mean_loss(forwards, targets, outputs)
        if not after < before:
            with torch.no_grad():
                for w, saved in zip(weights, start):
                    w.copy_(saved)  # in place, so packed copies of the weight see the change
            after = before
            if outputs is not None:
                outputs.clear()
                _mean_loss(forwards, targets, outputs)
    finally:
        for p, flag in wanted.items():
            p.requires_grad_(flag)
    return BlockFit(before, after, steps, time.perf_counter() - started)


def _train(block: nn.Module, weights: list[Tensor], masks: list[Tensor], forwards: list[Callable[[], Tensor]],
           targets: list[Tensor], steps: int, lr: float, precision: str, seed: int) -> None:
    """Adam on the masked weights over the batches in a fixed shuffled order."""
    optimizer = torch.optim.Adam(weights, lr=lr)
    order = list(range(len(forwards)))
    random.Random(seed).shuffle(order)
    with torch.enable_grad():
        for step in range(steps):
            batch = order[step % len(order)]
            with calibration_precision(block, precision):
                loss = _normalized_error(forwards[batch](), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for w, mask in zip(weights, masks):
                w.grad.masked_fill_(~mask, 0.0)
            optimizer.step()
            with torch.no_grad():
                for w, mask in zip(weights, masks):
                    w.masked_fill_(~mask, 0.0)


def _normalized_error(output: Tensor, target: Tensor) -> Tensor:
    """||output - target||^2 / ||target||^2, in float32 (or the output's wider dtype)."""
    dtype = torch.promote_types(output.dtype, torch.float32)
    target = target.to(dtype)
    return (output.to(dtype) - target).square().sum() / target.square().sum().clamp_min(1e-30)


def _mean_loss(forwards: list[Callable[[], Tensor]], targets: list[Tensor], outputs: list[Tensor] | None = None) -> float:
    """The mean normalized error over all batches, without gradients and in the model's dtype;
    the outputs are appended to `outputs` if given."""
    total = 0.0
    with torch.no_grad():
        for forward, target in zip(forwards, targets):
            output = forward()
            total += float(_normalized_error(output, target))
            if outputs is not None:
                outputs.append(output)
    return total / len(forwards)


def _check_block(keep: dict[nn.Module, Tensor], forwards: list, targets: list, steps: int, lr: float) -> None:
    if not forwards or len(targets) != len(forwards):
        raise ValueError(f"need one target per calibration batch and at least one batch, got {len(forwards)} "
                         f"batches and {len(targets)} targets")
    for layer, mask in keep.items():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or weight.shape != mask.shape:
            shape = None if weight is None else tuple(weight.shape)
            raise ValueError(f"keep mask of {type(layer).__name__} is {tuple(mask.shape)}, its weight {shape}: "
                             "pass each pruned layer's mask shaped like its weight")
    if steps < 0 or not lr >= 0:
        raise ValueError(f"steps and lr must be >= 0, got steps={steps}, lr={lr}")
