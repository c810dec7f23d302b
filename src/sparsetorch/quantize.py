"""Integer value grids for weights: int8 per output channel, 4-bit per group along the input.

A `QuantScheme` says how kept weights become integers: `bits` (8 or 4), `group_size` (None:
one scale per output row; g: one scale per row and each run of g input columns, the GPTQ /
compressed-tensors / llama.cpp convention) and `symmetric` (codes in [-2^(b-1), 2^(b-1) - 1]
around zero, scale = absmax / (2^(b-1) - 1); or asymmetric codes in [0, 2^b - 1] with a zero
point). Scales are stored in fp16, as in GGUF's Q8_0 / Q4_0, and every computation here uses the
fp16-rounded scale, so `dequantize(quantize(w))` is exactly what a stored model decodes to.

`search` (searched clipping): a group's range is not simply its largest magnitude. A few outliers
set that range and leave most weights on a handful of codes, so each group tries the ranges
1, 31/32, ..., 17/32 of its extent and keeps the one whose rounding error, weighted by each
column's `importance` where given, is least (GPTQ's `mse` option and llama.cpp's quantizers do
the same). The fractions are exact in float32, so the C++ joint sweep finds the same candidates.

Only kept weights define a grid (`mask`): a pruned weight is stored as no value at all, so it
must not widen the range of the weights that are. A zero weight stays exactly zero under a
symmetric grid; under an asymmetric one the index structure, not the grid, keeps it zero.

Example:
    >>> scheme = QuantScheme(bits=4, group_size=2)
    >>> w = torch.tensor([[0.7, -1.4, 0.1, 0.2]])
    >>> grid = find_grid(w, scheme)
    >>> dequantize(quantize(w, grid), grid)
    tensor([[ 0.7998, -1.3997,  0.1143,  0.2000]])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["QuantGrid", "QuantScheme", "dequantize", "fake_quantize", "find_grid", "pack_int4", "parse_scheme",
           "quantize", "unpack_int4"]

SCALE_DTYPE = torch.float16
SEARCH_STEPS = 16  # searched clipping tries the ranges (32 - k) / 32 of a group's extent, k < SEARCH_STEPS
_TINY = 2.0**-24  # a group of zeros gets this scale instead of 0, so dividing by it is safe: fp16's smallest
# subnormal (a smaller floor, such as 1e-8, rounds to a zero scale in fp16, and 0 / 0 is NaN)


@dataclass(frozen=True)
class QuantScheme:
    """How weights become integers.

    Args:
        bits: 8 or 4.
        group_size: input columns sharing one scale; None: one scale per output row.
        symmetric: codes centred on zero (no zero point); False adds a zero point per group.
        search: choose each group's range by searched clipping (module docstring); how a grid was
            found is not part of the stored format, so `name` and equality leave it out.

    Raises:
        ValueError: bits other than 8 or 4, or a group size below 2.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    search: bool = field(default=False, compare=False)  # how grids are found, not what they are

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if not isinstance(self.search, bool):
            raise ValueError(f"search must be True or False, got {self.search!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2):
            raise ValueError(f"group_size must be an integer >= 2 or None (one scale per row), got {self.group_size!r}")

    @property
    def name(self) -> str:
        """'int8', 'int4-g128', 'int4-g128-asym': what `parse_scheme` reads back."""
        group = "" if self.group_size is None else f"-g{self.group_size}"
        return f"int{self.bits}{group}{'' if self.symmetric else '-asym'}"

    @property
    def code_range(self) -> tuple[int, int]:
        """(lowest, highest) integer code."""
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def groups(self, cols: int) -> int:
        """Scales per row for a weight of `cols` input columns (the last group may be short)."""
        return 1 if self.group_size is None else -(-cols // self.group_size)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "search": self.search}


def parse_scheme(text: str, group_size: int | None = None) -> QuantScheme:
    """'int8' / 'int4' (with `group_size`), or a full name such as 'int4-g128-asym'.

    Raises:
        ValueError: an unknown name, naming the accepted forms.
    """
    found = re.fullmatch(r"int(\d+)(?:-g(\d+))?(-asym)?", text.strip().lower())
    if found is None:
        raise ValueError(f"unknown quantization {text!r}; use int8, int4, or a name such as int4-g128 or int4-g64-asym")
    group = int(found[2]) if found[2] else group_size
    return QuantScheme(bits=int(found[1]), group_size=group, symmetric=not found[3])


@dataclass(frozen=True)
class QuantGrid:
    """The scales (and zero points) of one (rows, cols) weight: (rows, groups) each."""

    scheme: QuantScheme
    scale: Tensor  # (rows, groups), SCALE_DTYPE
    zero_point: Tensor | None  # (rows, groups) int8 codes of 0.0; None when symmetric
    cols: int

    def per_column(self, tensor: Tensor, columns: slice | None = None) -> Tensor:
        """A (rows, groups) tensor repeated to one entry per input column: (rows, cols), float32."""
        tensor = tensor.float()
        if self.scheme.group_size is not None:
            tensor = tensor.repeat_interleave(self.scheme.group_size, dim=1)[:, : self.cols]
        else:
            tensor = tensor.expand(-1, self.cols)
        return tensor if columns is None else tensor[:, columns]


def _as_2d(weight: Tensor) -> Tensor:
    if weight.dim() != 2:
        raise ValueError(f"quantization takes 2-D (out, in) weights, got shape {tuple(weight.shape)}")
    return weight


def _grouped(weight: Tensor, scheme: QuantScheme) -> Tensor:
    """(rows, cols) -> (rows, groups, group_size), padded with zeros."""
    rows, cols = weight.shape
    size = cols if scheme.group_size is None else scheme.group_size
    groups = scheme.groups(cols)
    padded = weight.new_zeros(rows, groups * size)
    padded[:, :cols] = weight
    return padded.view(rows, groups, size)


def find_grid(weight: Tensor, scheme: QuantScheme, mask: Tensor | None = None,
              importance: Tensor | None = None) -> QuantGrid:
    """The grid of `weight`'s kept entries (all where `mask` is None): their full range, or with
    `scheme.search` the clipped range of least rounding error, each column's squared error
    weighted by `importance` (cols,) where given.

    Raises:
        ValueError: `weight` is not 2-D, or `mask` or `importance` has another shape.
    """
    weight = _as_2d(weight).detach().float()
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}")
        weight = weight * mask
    top, bottom = _extent(_grouped(weight, scheme), scheme, mask)
    best = _range_grid(top, bottom, scheme, weight.shape[1])
    if not scheme.search:
        return best
    if importance is not None and importance.shape != (weight.shape[1],):
        raise ValueError(f"importance must have one entry per input column ({weight.shape[1]}), "
                         f"got shape {tuple(importance.shape)}")
    least = _rounding_error(weight, best, importance)
    for k in range(1, SEARCH_STEPS):
        fraction = (32 - k) / 32
        grid = _range_grid(top * fraction, None if bottom is None else bottom * fraction, scheme, weight.shape[1])
        error = _rounding_error(weight, grid, importance)
        better = error < least
        least = torch.where(better, error, least)
        best = QuantGrid(scheme, torch.where(better, grid.scale, best.scale),
                         None if grid.zero_point is None else torch.where(better, grid.zero_point, best.zero_point),
                         best.cols)
    return best


def _extent(grouped: Tensor, scheme: QuantScheme, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(top, bottom) of each group's kept values, (rows, groups): the largest magnitude and None when
    symmetric; else the range, widened to hold 0.0 (GPTQ and llama.cpp keep 0 on the grid)."""
    if scheme.symmetric:
        return grouped.abs().amax(dim=-1), None
    if mask is not None:  # the range of the kept values only; pruned ones do not stretch it
        kept = _grouped(mask.float(), scheme).bool()
        top = grouped.masked_fill(~kept, -torch.inf).amax(dim=-1)
        bottom = grouped.masked_fill(~kept, torch.inf).amin(dim=-1)
        empty = ~kept.any(dim=-1)
        top, bottom = top.masked_fill(empty, 0.0), bottom.masked_fill(empty, 0.0)
    else:
        top, bottom = grouped.amax(dim=-1), grouped.amin(dim=-1)
    return top.clamp_min(0.0), bottom.clamp_max(0.0)


def _range_grid(top: Tensor, bottom: Tensor | None, scheme: QuantScheme, cols: int) -> QuantGrid:
    """The round-to-nearest grid spanning [bottom, top] ([-top, top] when symmetric)."""
    low, high = scheme.code_range
    if scheme.symmetric:
        scale = (top / high).clamp_min(_TINY).to(SCALE_DTYPE)
        return QuantGrid(scheme, scale, None, cols)
    scale = ((top - bottom) / (high - low)).clamp_min(_TINY).to(SCALE_DTYPE)
    zero = torch.round(-bottom / scale.float()).clamp(low, high)
    return QuantGrid(scheme, scale, zero.to(torch.int16), cols)


def _rounding_error(weight: Tensor, grid: QuantGrid, importance: Tensor | None) -> Tensor:
    """Each group's squared error of rounding `weight` (rows, cols) on `grid`, columns weighted by
    `importance` where given: (rows, groups)."""
    error = (dequantize(quantize(weight, grid), grid) - weight).square_()
    if importance is not None:
        error = error * importance.float()
    return _grouped(error, grid.scheme).sum(dim=-1)


def quantize(weight: Tensor, grid: QuantGrid, columns: slice | None = None) -> Tensor:
    """Integer codes of `weight` (rows, cols) on `grid`, round to nearest: int8 (4-bit codes unpacked).

    `columns` quantizes only that slice of the weight's columns (`weight` is then that slice),
    as a column-by-column solver such as SparseGPT needs.
    """
    low, high = grid.scheme.code_range
    scaled = weight.float() / grid.per_column(grid.scale, columns)
    if grid.zero_point is not None:
        scaled = scaled + grid.per_column(grid.zero_point, columns)
    return torch.round(scaled).clamp(low, high).to(torch.int8 if grid.scheme.symmetric else torch.uint8)


def dequantize(codes: Tensor, grid: QuantGrid, columns: slice | None = None) -> Tensor:
    """float32 weights of `codes` on `grid` (the inverse of `quantize` up to rounding)."""
    values = codes.float()
    if grid.zero_point is not None:
        values = values - grid.per_column(grid.zero_point, columns)
    return values * grid.per_column(grid.scale, columns)


def fake_quantize(weight: Tensor, scheme: QuantScheme, mask: Tensor | None = None,
                  importance: Tensor | None = None) -> tuple[Tensor, QuantGrid]:
    """(weight rounded to its own grid, the grid): round-to-nearest, in `weight`'s dtype; entries
    outside `mask` come back exactly zero. `importance`: see `find_grid`."""
    grid = find_grid(weight, scheme, mask, importance)
    rounded = dequantize(quantize(weight, grid), grid)
    if mask is not None:
        rounded = rounded * mask
    return rounded.to(weight.dtype), grid


def pack_int4(codes: Tensor) -> Tensor:
    """4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]), flattened, two per byte: element 2k in the
    low nibble of byte k (llama.cpp's and compressed-tensors' order). An odd count pads one zero."""
    flat = codes.reshape(-1).to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: Tensor, count: int, signed: bool = True) -> Tensor:
    """Inverse of `pack_int4`: the first `count` codes, int8 (signed) or uint8."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count]
    if not signed:
        return nibbles
    return (nibbles.to(torch.int8) ^ 8) - 8  # sign-extend 4 bits
