"""Which modules to sparsify, and how to read their weight as an (out, in) matrix.

Names follow the compressed-tensors convention so recipes move between tools:
`'re:<regex>'` matches full module names, a class name (`'Linear'`) matches the
module type and its subclasses (Falcon's `FalconLinear` is a `Linear`), and any other
string matches a module named exactly that or ending in
`'.<string>'` (so `'lm_head'` matches `'model.lm_head'`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "find_targets",
    "is_conv1d",
    "is_prunable",
    "matches",
    "set_weight_matrix",
    "weight_matrix",
]

DEFAULT_TARGETS: tuple[str, ...] = ("Linear", "Conv1D")
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head",)


def is_prunable(module: nn.Module) -> bool:
    """True for layers whose weight multiplies the input: Linear and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as (out_features, in_features); GPT-2's Conv1D stores it transposed."""
    weight = module.weight.data
    return weight.t() if is_conv1d(module) else weight


def set_weight_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write an (out, in) matrix back into the module's own layout and dtype, in place.

    Through `detach()`, not `.data`: the write bumps the weight's version counter, which is
    how caches of derived forms of the weight (`models/packed.py`) see that it changed.
    """
    target = module.weight.detach()
    source = matrix.t() if is_conv1d(module) else matrix
    target.copy_(source.to(target.dtype))


def _is_a(module: nn.Module, class_name: str) -> bool:
    """Whether the module's class, or a class it derives from, is called `class_name`."""
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """Whether a module named `name` is picked by any of `patterns` (see module docstring)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or _is_a(module, pattern):
            return True
    return False


def _check_patterns(patterns: Sequence[str], what: str) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{what} must be module names, class names or 're:<regex>' strings, got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"bad regular expression in {what}: {pattern!r} ({err})") from None


def find_targets(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    prunable: Callable[[nn.Module], bool] = is_prunable,
) -> dict[str, nn.Module]:
    """Prunable modules of `model` picked by `targets` and not by `ignore`, in model order.

    Args:
        model: any module.
        targets: patterns to include; default: every Linear and Conv1D.
        ignore: patterns to leave dense; default: `lm_head`.
        prunable: which module kinds may be picked at all (default: `is_prunable`, Linear
            and Conv1D; sparse training also takes convolutions).

    Raises:
        ValueError: nothing matched, with the names of the modules that could have.

    Example:
        >>> find_targets(model, targets=["re:.*mlp.*"], ignore=["lm_head"])
    """
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    ignore = tuple(DEFAULT_IGNORE if ignore is None else ignore)
    _check_patterns(targets, "targets")
    _check_patterns(ignore, "ignore")
    found = {
        name: module
        for name, module in model.named_modules()
        if prunable(module) and matches(name, module, targets) and not matches(name, module, ignore)
    }
    if not found:
        candidates = [name for name, module in model.named_modules() if prunable(module)]
        shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"targets={list(targets)} with ignore={list(ignore)} match no prunable layer; "
            f"prunable layers are: {shown or 'none'}"
        )
    return found


def dense_fraction(tensor: Tensor) -> float:
    """Fraction of nonzero entries."""
    return float(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)
