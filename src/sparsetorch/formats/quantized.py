"""Quantized values in any index structure: integer codes on a `QuantGrid`.

A `QuantizedTensor` pairs an index structure (`bitmask`, `nm`, `csr16`, or `dense` for sparsity
0), which says where values are stored, with the integer codes of those values and the grid
(`sparsetorch.quantize`) that turns codes back into weights. A stored value's scale is the one
of its dense column's group, so the structure is free to drop or reorder nothing: values keep
the row-major order every structure already uses. Under the weight's module prefix it stores
the structure's index tensors and (compressed-tensors' names where it has them):

    codes, 8-bit   int8, in the structure's value part ('compressed' / 'values'; dense: 'weight'
                   (rows, cols), compressed-tensors' 'int-quantized')
    codes, 4-bit   uint8, two per byte (`pack_int4`), flat in row-major order, in the value part;
                   dense: 'weight_packed' int32 (rows, ceil(cols / 8)) and 'weight_shape' int32
                   [rows, cols], compressed-tensors' 'pack-quantized'
    weight_scale       float32 (rows, groups), holding the grid's fp16 scales exactly
    weight_zero_point  asymmetric grids only: int8 (rows, groups); dense 4-bit: int32, eight
                       4-bit zero points per int32 along the rows (compressed-tensors' packing)

Codes are stored signed as compressed-tensors stores them: asymmetric codes and zero points
shifted by -2^(bits - 1) into int8, and 4-bit codes as unsigned nibbles (code + 8 when
symmetric). Scales are float32 on disk because compressed-tensors dequantizes in the scale's
dtype: fp16 scales would give it fp16 weights, not the float32 ones `to_dense` gives.

The scheme and the structure are not in the tensors: `from_parts` takes them (the compressed
directory records them per layer). 50% bitmask with int8 values costs 8 * 0.5 + 1 bits per
weight plus the row offsets and scales; dense int4 in groups of 128 costs 4 + 32 / 128.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError, SparseWeight, check_joinable
from sparsetorch.formats.registry import get_format, register_format
from sparsetorch.quantize import SCALE_DTYPE, QuantGrid, QuantScheme, dequantize, pack_int4, quantize, unpack_int4

__all__ = ["QUANTIZED_KERNEL_FORMATS", "STRUCTURES", "QuantizedTensor", "check_on_grid", "quantized_part_names"]

STRUCTURES: tuple[str, ...] = ("bitmask", "nm", "csr16", "dense")
QUANTIZED_KERNEL_FORMATS: tuple[str, ...] = tuple(f"{s}-int{b}" for s in STRUCTURES for b in (8, 4))
_PACK_COLS = 8  # compressed-tensors packs eight 4-bit codes per int32


def _placeholder(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """`True` in every position of `shape`, without memory: an index structure with these as its
    values expands to the mask of where it stores values."""
    return torch.ones((), dtype=torch.bool, device=device).expand(shape)


def _offset(scheme: QuantScheme) -> int:
    """What the stored form adds to a natural code (`quantize`'s): -2^(b-1) for asymmetric int8,
    +8 for symmetric 4-bit nibbles, else 0."""
    half = 1 << (scheme.bits - 1)
    if scheme.bits == 8:
        return 0 if scheme.symmetric else -half
    return half if scheme.symmetric else 0


def _pack_rows(codes: Tensor, dim_cols: int) -> Tensor:
    """(rows, cols) 4-bit nibbles -> int32 (rows, ceil(cols / 8)), eight per int32, low bits first."""
    rows = codes.shape[0]
    padded = codes.new_zeros(rows, -(-dim_cols // _PACK_COLS) * _PACK_COLS)
    padded[:, :dim_cols] = codes
    return pack_int4(padded).view(torch.int32).reshape(rows, -1)


def _unpack_rows(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `_pack_rows`: int32 (rows, ceil(cols / 8)) -> uint8 nibbles (rows, cols)."""
    rows = packed.shape[0]
    nibbles = unpack_int4(packed.contiguous().view(torch.uint8).reshape(-1), packed.numel() * _PACK_COLS, signed=False)
    return nibbles.view(rows, packed.shape[1] * _PACK_COLS)[:, :cols]


def _store_zero_point(zero: Tensor, scheme: QuantScheme, dense4: bool) -> Tensor:
    """Natural zero points (rows, groups) -> their stored form (see the module docstring)."""
    if dense4:
        return _pack_rows(zero.to(torch.uint8).t(), zero.shape[0]).t().contiguous()
    return (zero.to(torch.int16) + _offset(scheme)).to(torch.int8)


def _load_zero_point(stored: Tensor, scheme: QuantScheme, rows: int, dense4: bool) -> Tensor:
    """Inverse of `_store_zero_point`: natural zero points, int16 (rows, groups)."""
    if dense4:
        return _unpack_rows(stored.t(), rows).t().to(torch.int16).contiguous()
    return stored.to(torch.int16) - _offset(scheme)


def quantized_part_names(scheme: QuantScheme, structure: str) -> tuple[str, ...]:
    """The parts a quantized weight of this scheme and structure stores.

    Example:
        >>> quantized_part_names(QuantScheme(8), "bitmask")
        ('shape', 'compressed', 'bitmask', 'row_offsets', 'weight_scale')
    """
    index = get_format(structure)
    names = list(index.PARTS)
    if structure == "dense" and scheme.bits == 4:
        names = ["weight_packed", "weight_shape"]
    names.append("weight_scale")
    if not scheme.symmetric:
        names.append("weight_zero_point")
    return tuple(names)


def check_on_grid(weight: Tensor, grid: QuantGrid, name: str) -> None:
    """Check that a weight's nonzeros lie exactly on `grid` (what storing it quantized keeps).

    Raises:
        ValueError: a nonzero entry moves when rounded to the grid, naming the layer and the fix.
    """
    weight = weight.detach()
    rows, cols = weight.shape
    if tuple(grid.scale.shape) != (rows, grid.scheme.groups(cols)) or grid.cols != cols:
        raise ValueError(f"{name}: its grid has scales {tuple(grid.scale.shape)} for {grid.cols} columns, "
                         f"but the weight is {rows}x{cols}; find the grid of this weight")
    rounded = dequantize(quantize(weight, grid), grid).to(weight.dtype)
    kept = weight != 0
    off = kept & (rounded != weight)
    if off.any():
        row, col = (int(i) for i in off.nonzero()[0])
        raise ValueError(
            f"{name}: weight[{row}, {col}] = {float(weight[row, col])!r} is not on its {grid.scheme.name} grid "
            f"(nearest {float(rounded[row, col])!r}); quantize the weights first, e.g. with "
            "sparsetorch.quantize.fake_quantize, and pass the grid it returns"
        )


@register_format("quantized")
@dataclass(frozen=True)
class QuantizedTensor(SparseWeight):
    """One weight as an index structure holding integer codes on a `QuantGrid`.

    Args:
        index: where values are stored (its `values` are a memoryless placeholder).
        codes: the stored codes (see the module docstring for their layout).
        grid: the scales and zero points, fp16 scales and natural zero points as `sparsetorch.quantize` makes them.

    Example:
        >>> w = torch.tensor([[0.0, 0.5, -1.0, 0.0]])
        >>> t = QuantizedTensor.from_dense(w, find_grid(w, QuantScheme(8)), "bitmask")
        >>> t.codes, t.to_dense()
        (tensor([  64, -127], dtype=torch.int8), tensor([[ 0.0000,  0.5039, -0.9999,  0.0000]]))
    """

    index: SparseWeight
    codes: Tensor
    grid: QuantGrid

    @classmethod
    def from_dense(cls, dense: Tensor, grid: QuantGrid, structure: str = "bitmask", *layout) -> QuantizedTensor:
        """Store `dense`'s nonzeros rounded to `grid` in `structure` ('bitmask', 'nm' (layout: n, m),
        'csr16' or 'dense'). `to_dense()` then gives `dequantize(quantize(dense, grid), grid)` where
        `dense` is nonzero (and where N:M keeps a zero: 0 is on every grid), zeros elsewhere.

        Raises:
            ValueError: not 2-D, a grid of another shape, or a weight that does not fit the structure.
        """
        if structure not in STRUCTURES:
            raise ValueError(f"unknown index structure {structure!r}; choose one of {list(STRUCTURES)}")
        dense = dense.detach().cpu().contiguous()
        index = get_format(structure).from_dense(dense, *layout)
        rows, cols = index.shape
        if grid.cols != cols or tuple(grid.scale.shape) != (rows, grid.scheme.groups(cols)):
            raise ValueError(f"grid of scales {tuple(grid.scale.shape)} over {grid.cols} columns does not fit a "
                             f"{rows}x{cols} weight; find the grid of this weight")
        return cls._from_index(index, quantize(dense, grid), grid)

    @classmethod
    def _from_index(cls, index: SparseWeight, natural: Tensor, grid: QuantGrid) -> QuantizedTensor:
        """Keep `natural` (rows, cols) codes where `index` stores values."""
        index = dataclasses.replace(index, values=_placeholder(tuple(index.values.shape)))
        scheme, cols = grid.scheme, index.shape[1]
        nibbles = natural.to(torch.int16) + _offset(scheme)
        if index.FORMAT == "dense" and scheme.bits == 4:
            codes = _pack_rows(nibbles.to(torch.uint8), cols)
        elif scheme.bits == 4:
            codes = pack_int4(nibbles[index.to_dense()].to(torch.uint8))
        else:
            codes = nibbles[index.to_dense()].to(torch.int8).reshape(index.values.shape)
        zero = None if grid.zero_point is None else grid.zero_point.to(torch.int16)
        return cls(index, codes, QuantGrid(scheme, grid.scale.to(SCALE_DTYPE), zero, cols))

    @classmethod
    def cat_rows(cls, weights: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """One weight whose rows are those of `weights`, in order, with the same codes and scales.

        Raises:
            ValueError: weights of another structure, scheme, layout or width.
        """
        check_joinable(cls, weights)
        first = weights[0]
        if any((w.structure, w.scheme) != (first.structure, first.scheme) for w in weights):
            raise ValueError(f"cannot join the rows of quantized weights of different structures or schemes: "
                             f"{sorted({(w.structure, w.scheme.name) for w in weights})}")
        stored = [weight.index.to_dense() for weight in weights]  # (rows, cols) bool each
        natural = torch.cat([weight._codes_at(mask, 0, weight.shape[0]) for weight, mask in zip(weights, stored)])
        mask = torch.cat(stored)
        index = get_format(first.structure).from_mask(mask, torch.zeros(int(mask.sum())), *first.layout())
        zero = None if first.grid.zero_point is None else torch.cat([w.grid.zero_point for w in weights])
        grid = QuantGrid(first.scheme, torch.cat([w.grid.scale for w in weights]), zero, first.shape[1])
        return cls._from_index(index, natural, grid)

    def layout(self) -> tuple:
        return self.index.layout()

    def restructured(self, structure: str, *layout) -> QuantizedTensor:
        """The same codes and grid in another index structure ('nm' with layout 2, 4: a 2:4 weight stored
        as a bitmask runs the 2:4 kernels). Symmetric grids only: a slot the new structure keeps without
        a stored code holds code 0, which is weight 0 only when the grid has no zero point.

        Raises:
            ValueError: an asymmetric grid, or a weight that does not fit the structure.
        """
        if not self.scheme.symmetric:
            raise ValueError(f"only symmetric grids move between index structures, not {self.scheme.name}")
        stored = self.index.to_dense()  # (rows, cols) bool
        index = get_format(structure).from_mask(stored, torch.zeros(int(stored.sum())), *layout)  # refuses first
        return type(self)._from_index(index, self._codes_at(stored, 0, self.shape[0]), self.grid)

    def _codes_at(self, stored: Tensor, start: int, stop: int) -> Tensor:
        """Rows [start, stop)'s natural codes (int16) where `stored` (their (rows, cols) mask) is set, 0 elsewhere."""
        codes = torch.zeros(stored.shape, dtype=torch.int16, device=stored.device)
        codes[stored] = self.natural_codes(start, stop).to(stored.device)
        return codes

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor, *layout) -> QuantizedTensor:
        """Not available: quantized values need a grid; use `from_dense(dense, grid, structure)`."""
        raise TypeError("a quantized weight needs its grid: use QuantizedTensor.from_dense(dense, grid, structure)")

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        return self.index.shape

    @property
    def values(self) -> Tensor:  # type: ignore[override]
        """The stored codes (packed two per byte when 4-bit)."""
        return self.codes

    @property
    def scheme(self) -> QuantScheme:
        return self.grid.scheme

    @property
    def structure(self) -> str:
        return self.index.FORMAT

    @property
    def kernel_format(self) -> str:
        return f"{self.structure}-int{self.scheme.bits}"

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return math.prod(self.index.values.shape) / max(rows * cols, 1)

    def _dense4(self) -> bool:
        return self.structure == "dense" and self.scheme.bits == 4

    def natural_codes(self, start: int, stop: int) -> Tensor:
        """`quantize`'s codes of rows [start, stop)'s stored values, int16, flat in row-major order."""
        if self._dense4():
            nibbles = _unpack_rows(self.codes[start:stop], self.shape[1]).reshape(-1)
        elif self.scheme.bits == 4:
            first, last = self.index.value_span(start, stop)
            nibbles = unpack_int4(self.codes[first // 2:(last + 1) // 2], last - first + first % 2, signed=False)
            nibbles = nibbles[first % 2:]
        else:
            first, last = self.index.value_span(start, stop)
            nibbles = self.codes.reshape(-1)[first:last]
        return nibbles.to(torch.int16) - _offset(self.scheme)

    def _grid_rows(self, start: int, stop: int) -> QuantGrid:
        zero = None if self.grid.zero_point is None else self.grid.zero_point[start:stop]
        return QuantGrid(self.scheme, self.grid.scale[start:stop], zero, self.grid.cols)

    def dense_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the dequantized weight (float32), without expanding the others."""
        stored = self.index.dense_rows(start, stop)  # (stop - start, cols) bool
        codes = self._codes_at(stored, start, stop)
        return dequantize(codes, self._grid_rows(start, stop)).masked_fill_(~stored, 0.0)

    def to_dense(self) -> Tensor:
        return self.dense_rows(0, self.shape[0])

    def mask(self) -> Tensor:
        """(rows, cols) bool: where codes are stored."""
        return self.index.to_dense().clone()

    def parts(self) -> dict[str, Tensor]:
        """The index structure's tensors with the codes in place of its values, and the grid."""
        parts = {key: t for key, t in self.index.parts().items() if key != self.index.VALUES_PART}
        if self._dense4():
            parts["weight_packed"] = self.codes
            parts["weight_shape"] = torch.tensor(self.shape, dtype=torch.int32)
        else:
            parts[self.index.VALUES_PART] = self.codes
        parts["weight_scale"] = self.grid.scale.float()
        if self.grid.zero_point is not None:
            parts["weight_zero_point"] = _store_zero_point(self.grid.zero_point, self.scheme, self._dense4())
        return parts

    def with_parts(self, parts: dict[str, Tensor]) -> QuantizedTensor:
        return type(self).from_parts(parts, check=False, scheme=self.scheme, structure=self.structure)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str, *, scheme: QuantScheme,
                        structure: str) -> QuantizedTensor:
        """Read and check the parts stored under `prefix`.

        Raises:
            CorruptTensorError: a part is missing or the parts disagree, naming the tensor.
        """
        names = quantized_part_names(scheme, structure)
        missing = [key for key in names if f"{prefix}.{key}" not in tensors]
        if missing:
            raise CorruptTensorError(f"{prefix}: missing {missing} of the {structure} {scheme.name} tensors")
        return cls.from_parts({key: tensors[f"{prefix}.{key}"] for key in names}, prefix, scheme=scheme,
                              structure=structure)

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True, *,
                   scheme: QuantScheme | None = None, structure: str = "bitmask") -> QuantizedTensor:
        """Build from `parts()` of a weight quantized with `scheme` in `structure`, and check them
        (number of codes vs the index, their dtype, scale and zero point shapes vs the groups).

        Raises:
            TypeError: no scheme given.
            CorruptTensorError: the parts disagree, naming the tensor.
        """
        if scheme is None:
            raise TypeError("QuantizedTensor.from_parts needs scheme= (and structure=), which the directory records")
        if structure not in STRUCTURES:
            raise CorruptTensorError(f"{name}: unknown index structure {structure!r}; expected one of {list(STRUCTURES)}")
        index = _index_from_parts(parts, name, scheme, structure, check)
        codes = parts["weight_packed"] if structure == "dense" and scheme.bits == 4 else parts[index.VALUES_PART]
        rows, cols = index.shape
        if check:
            _check_codes(codes, index, scheme, name)
            _check_grid(parts, scheme, rows, cols, name, structure == "dense" and scheme.bits == 4)
        stored_zero = parts.get("weight_zero_point")
        dense4 = structure == "dense" and scheme.bits == 4
        zero = None if scheme.symmetric else _load_zero_point(stored_zero, scheme, rows, dense4)
        scale = parts["weight_scale"].to(SCALE_DTYPE)
        return cls(index, codes, QuantGrid(scheme, scale, zero, cols))


def _index_from_parts(parts: dict[str, Tensor], name: str, scheme: QuantScheme, structure: str,
                      check: bool) -> SparseWeight:
    """The index structure of `parts`, its values a placeholder of the shape its index calls for."""
    index_cls = get_format(structure)
    if structure == "dense":
        shape = _dense_shape(parts, name, scheme)
        return index_cls((shape[0], shape[1]), _placeholder(shape, parts["weight_scale"].device))
    own = {key: parts[key] for key in index_cls.PARTS}
    device = own[index_cls.VALUES_PART].device
    bare = index_cls.from_parts({**own, index_cls.VALUES_PART: torch.empty(0, device=device)}, name, check=False)
    try:
        values = _placeholder(bare.stored_shape(), device)
    except (RuntimeError, ValueError) as err:
        raise CorruptTensorError(f"{name}: the {structure} index tensors are damaged ({err})") from None
    return index_cls.from_parts({**own, index_cls.VALUES_PART: values}, name, check=check)


def _dense_shape(parts: dict[str, Tensor], name: str, scheme: QuantScheme) -> tuple[int, int]:
    if scheme.bits == 8:
        codes = parts["weight"]
        if codes.dim() != 2:
            raise CorruptTensorError(f"{name}: weight has shape {tuple(codes.shape)}, expected 2-D int8 codes")
        return codes.shape[0], codes.shape[1]
    shape = parts["weight_shape"].tolist()
    if len(shape) != 2 or min(shape) < 0:
        raise CorruptTensorError(f"{name}: weight_shape {shape} is not a 2-D weight shape")
    return int(shape[0]), int(shape[1])


def _check_codes(codes: Tensor, index: SparseWeight, scheme: QuantScheme, name: str) -> None:
    """Raise CorruptTensorError unless `codes` has the dtype and size the index and scheme call for."""
    rows, cols = index.shape
    count = math.prod(index.values.shape)
    if index.FORMAT == "dense" and scheme.bits == 4:
        dtype, shape = torch.int32, (rows, -(-cols // _PACK_COLS))
    elif scheme.bits == 4:
        dtype, shape = torch.uint8, (-(-count // 2),)
    else:
        dtype, shape = torch.int8, tuple(index.values.shape)
    if codes.dtype != dtype or tuple(codes.shape) != shape:
        raise CorruptTensorError(
            f"{name}: the index stores {count} values, so its {scheme.name} codes must be {dtype} {shape}; "
            f"found {codes.dtype} {tuple(codes.shape)}"
        )


def _check_grid(parts: dict[str, Tensor], scheme: QuantScheme, rows: int, cols: int, name: str,
                dense4: bool) -> None:
    """Raise CorruptTensorError unless scales (and zero points) have one entry per row and group."""
    groups = scheme.groups(cols)
    scale = parts["weight_scale"]
    if not scale.is_floating_point() or tuple(scale.shape) != (rows, groups):
        raise CorruptTensorError(f"{name}: weight_scale is {scale.dtype} {tuple(scale.shape)}, expected floats "
                                 f"{(rows, groups)} ({scheme.name}: {groups} group(s) of {cols} columns)")
    if not torch.equal(scale.to(SCALE_DTYPE).to(scale.dtype), scale) or not bool((scale >= 0).all()):
        raise CorruptTensorError(f"{name}: weight_scale holds values that are not non-negative fp16 numbers")
    zero = parts.get("weight_zero_point")
    if scheme.symmetric:
        if zero is not None:
            raise CorruptTensorError(f"{name}: a symmetric {scheme.name} weight has a weight_zero_point")
        return
    expected = (torch.int32, (-(-rows // _PACK_COLS), groups)) if dense4 else (torch.int8, (rows, groups))
    if zero is None or (zero.dtype, tuple(zero.shape)) != expected:
        found = None if zero is None else (zero.dtype, tuple(zero.shape))
        raise CorruptTensorError(f"{name}: weight_zero_point is {found}, expected {expected[0]} {expected[1]}")
