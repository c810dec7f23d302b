"""How a keep-mask is enforced on one module: in place (hard) or in the forward pass (soft).

Hard masking (magnitude schedules, SET, RigL, SRigL): the mask is the buffer
`weight_mask`, the weight holds exact zeros where it is False, and a gradient hook zeroes
their gradients, so momentum and weight decay have nothing to act on.

Soft masking (SR-STE, mask decay): the trained parameter is renamed `weight_orig`, a
dense latent weight, and a forward pre-hook computes `module.weight` from it as
w * (mask + a * ~mask). The backward gives the pruned entries b * grad (b = 1 is the
straight-through estimator) plus SR-STE's sparse-refined term lambda * ~mask * w. The
scales (a, b) live in the buffer `weight_mask_scale`, so changing them never recompiles.

Both kinds keep everything in module state: `state_dict` saves the masks and
`load_state_dict` restores them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparsetorch.training.method import LATENT, MASK

__all__ = ["attach_hard", "attach_soft", "detach", "masked_weight", "refresh_soft", "set_scales"]

SCALE = "weight_mask_scale"


class _MaskedWeight(torch.autograd.Function):
    """w * (mask + a * ~mask) forward; (mask + b * ~mask) * grad + lambda * ~mask * w backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, scales: Tensor, refine: float) -> Tensor:
        ctx.save_for_backward(weight, mask, scales)
        ctx.refine = refine
        pruned = (~mask).to(weight.dtype)
        return weight * (1 - pruned + scales[0].to(weight.dtype) * pruned)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        weight, mask, scales = ctx.saved_tensors
        pruned = (~mask).to(grad.dtype)
        grad_weight = grad * (1 - pruned + scales[1].to(grad.dtype) * pruned)
        if ctx.refine:
            grad_weight = grad_weight + ctx.refine * pruned * weight
        return grad_weight, None, None, None


def masked_weight(weight: Tensor, mask: Tensor, scales: Tensor, refine: float = 0.0) -> Tensor:
    """The effective weight of a soft-masked layer.

    Args:
        weight: the dense latent weight.
        mask: boolean keep-mask of the same shape.
        scales: (a, b): forward and gradient scale of the pruned entries.
        refine: SR-STE's lambda_W, a decay on pruned latent weights added to their gradient.

    Returns:
        w * (mask + a * ~mask), differentiable with the rule above.

    Example:
        >>> masked_weight(torch.tensor([1., 2.]), torch.tensor([True, False]), torch.tensor([0., 1.]))
        tensor([1., 0.])
    """
    return _MaskedWeight.apply(weight, mask, scales, refine)


class _GradMask:
    """Tensor hook: hand the dense gradient to `collect`, return it with pruned entries zeroed."""

    def __init__(self, module: nn.Module, collect: Callable[[Tensor], None]) -> None:
        self.module, self.collect = module, collect

    def __call__(self, grad: Tensor) -> Tensor:
        self.collect(grad)
        return grad.masked_fill(~getattr(self.module, MASK), 0)


class _SoftForward:
    """Forward pre-hook: recompute `module.weight` from the latent weight and the mask."""

    def __init__(self, refine: float) -> None:
        self.refine = refine

    def __call__(self, module: nn.Module, args: tuple) -> None:
        module.weight = masked_weight(getattr(module, LATENT), getattr(module, MASK), getattr(module, SCALE), self.refine)


def _rename_parameter(module: nn.Module, old: str, new: str) -> None:
    """Rename a parameter in place, keeping its position so `parameters()` order is unchanged."""
    items = [(new if key == old else key, value) for key, value in module._parameters.items()]
    module._parameters.clear()
    module._parameters.update(items)


def _check_free(module: nn.Module) -> None:
    if hasattr(module, MASK):
        raise ValueError(
            f"{type(module).__name__} already carries a {MASK!r}: another Sparsifier is attached; call its "
            "finalize() first"
        )


def attach_hard(module: nn.Module, collect: Callable[[Tensor], None]) -> RemovableHandle:
    """Give `module` an all-True `weight_mask` buffer and a hook masking its weight gradient.

    Args:
        module: a layer with a `weight` parameter.
        collect: called with every dense weight gradient before it is masked (RigL reads it).

    Returns:
        The hook's handle, for `detach`.

    Raises:
        ValueError: the module is masked already.
    """
    _check_free(module)
    module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
    return module.weight.register_hook(_GradMask(module, collect))


def attach_soft(module: nn.Module, refine: float) -> RemovableHandle:
    """Turn `module.weight` into the latent `weight_orig`, masked in every forward pass.

    Args:
        module: a layer with a `weight` parameter.
        refine: SR-STE's lambda_W (0 for none).

    Returns:
        The forward pre-hook's handle, for `detach`.

    Raises:
        ValueError: the module is masked already.
    """
    _check_free(module)
    weight = module.weight
    _rename_parameter(module, "weight", LATENT)
    module.register_buffer(MASK, torch.ones_like(weight, dtype=torch.bool))
    module.register_buffer(SCALE, torch.tensor([0.0, 1.0], device=weight.device))
    refresh_soft(module)
    return module.register_forward_pre_hook(_SoftForward(refine))


@torch.no_grad()
def set_scales(module: nn.Module, forward: float, backward: float) -> None:
    """Set (a, b) of a soft-masked layer: pruned entries weigh a in the forward pass and
    get b times their gradient."""
    getattr(module, SCALE).copy_(torch.tensor([forward, backward]))


@torch.no_grad()
def refresh_soft(module: nn.Module) -> None:
    """Recompute `module.weight` outside a forward pass, so it shows the current mask."""
    module.weight = masked_weight(getattr(module, LATENT), getattr(module, MASK), getattr(module, SCALE))


@torch.no_grad()
def detach(module: nn.Module, handle: RemovableHandle) -> Tensor:
    """Undo `attach_hard` / `attach_soft`: the weight becomes a plain parameter with exact
    zeros where the mask is False, and the buffers go.

    Returns:
        The final keep-mask.
    """
    handle.remove()
    mask = getattr(module, MASK)
    if hasattr(module, LATENT):
        del module.weight
        _rename_parameter(module, LATENT, "weight")
        delattr(module, SCALE)
    module.weight.masked_fill_(~mask, 0.0)
    delattr(module, MASK)
    return mask
