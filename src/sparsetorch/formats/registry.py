"""Sparse weight formats by name, filled by the `register_format` class decorator.

A format is a frozen dataclass holding one (out, in) weight compressed. Every format has:
    FORMAT                       its registry name
    shape                        (out, in) of the dense weight
    values                       the stored values (1-D or 2-D), in the weight's dtype
    from_dense(dense, ...)       compress a dense weight with zeros
    to_dense()                   the exact dense weight back
    dense_rows(start, stop)      dense rows [start, stop) only (bounded memory for fallbacks)
    value_span(start, stop)      where rows [start, stop)'s values lie in the flat `values`
    stored_shape()               the shape `values` must have for its index tensors
    parts() / from_parts(parts)  its tensors by short name, checked on the way in
    state_dict(prefix)           parts under `<prefix>.<name>`, for safetensors files
    nbytes                       bytes it occupies
    kernel_format                the key its kernels are registered under (FORMAT, or e.g. 'nm-int4')
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["FORMATS", "get_format", "register_format"]

FORMATS: dict[str, type] = {}
_F = TypeVar("_F", bound=type)


def register_format(name: str):
    """Class decorator: make a format reachable as `FORMATS[name]`.

    Raises:
        ValueError: `name` is already registered.

    Example:
        >>> @register_format("mine")
        ... @dataclass(frozen=True)
        ... class MyTensor: ...
    """

    def decorator(cls: _F) -> _F:
        if name in FORMATS:
            raise ValueError(f"sparse format {name!r} is already registered by {FORMATS[name].__qualname__}")
        cls.FORMAT = name
        FORMATS[name] = cls
        return cls

    return decorator


def get_format(name: str) -> type:
    """The format class registered as `name`.

    Raises:
        NotImplementedError: nothing is registered under `name`; says how to add it.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise NotImplementedError(
            f"no sparse format {name!r}; known formats are {sorted(FORMATS)}. Add one with "
            f"@register_format({name!r}) on a frozen dataclass with from_dense/to_dense/parts/from_parts"
        ) from None
