"""Temporary overrides of a model's code for calibration forwards, always undone.

The calibration-only speedups (`fused.py`, `linears.py`) change how a module computes,
never what: each sets a forward on the module instance, or swaps a function in a modeling
module, for the length of a context. Forward hooks still fire, since `nn.Module.__call__`
runs them around whatever `forward` the instance has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["instance_forward", "module_global"]


@contextmanager
def instance_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Set `module.forward` for the context; put back whatever the instance had (accelerate
    hooks set one), else let the class's forward show through again."""
    had = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had is None:
            del module.forward
        else:
            module.forward = had


@contextmanager
def module_global(namespace: object, name: str, value: object) -> Iterator[None]:
    """Set `namespace.name` (a function in a modeling module) for the context."""
    original = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, original)
