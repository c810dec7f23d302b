"""Value grids: schemes, round-to-nearest, 4-bit packing."""

import pytest
import torch

from sparsetorch.quantize import (
    QuantScheme,
    dequantize,
    fake_quantize,
    find_grid,
    pack_int4,
    parse_scheme,
    quantize,
    unpack_int4,
)

SCHEMES = [QuantScheme(8), QuantScheme(8, 32), QuantScheme(4, 32), QuantScheme(4, 128), QuantScheme(4, 32, False),
           QuantScheme(8, None, False)]


def test_hand_checked_symmetric_int4():
    scheme = QuantScheme(bits=4, group_size=2)
    weight = torch.tensor([[0.7, -1.4, 0.1, 0.2]])
    grid = find_grid(weight, scheme)
    assert grid.scale.dtype == torch.float16 and grid.scale.shape == (1, 2)
    codes = quantize(weight, grid)
    assert codes.tolist() == [[4, -7, 4, 7]]  # 0.7 / (1.4 / 7) = 3.5 rounds to 4 (half to even gives 4)
    assert torch.allclose(dequantize(codes, grid), weight, atol=0.11)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("cols", [7, 64, 100])
def test_round_to_nearest_error_is_at_most_half_a_step(scheme, cols):
    torch.manual_seed(cols)
    weight = torch.randn(5, cols)
    mask = torch.rand(5, cols) > 0.5
    rounded, grid = fake_quantize(weight, scheme, mask)
    assert torch.equal(rounded[~mask], torch.zeros(int((~mask).sum())))  # pruned stay exactly zero
    step = grid.per_column(grid.scale)
    assert ((rounded - weight)[mask].abs() <= step[mask] / 2 + 1e-6).all()
    low, high = scheme.code_range
    codes = quantize(weight * mask, grid)
    assert int(codes.min()) >= low and int(codes.max()) <= high
    assert torch.equal(dequantize(codes, grid) * mask, rounded)  # what a stored model decodes to


def test_pruned_weights_do_not_widen_the_grid():
    weight = torch.tensor([[100.0, 1.0, -0.5, 0.25]])
    mask = torch.tensor([[False, True, True, True]])
    grid = find_grid(weight, QuantScheme(8), mask)
    assert float(grid.scale) == pytest.approx(1.0 / 127, rel=1e-3)


def test_column_slices_match_the_whole():
    torch.manual_seed(0)
    weight = torch.randn(4, 70)
    grid = find_grid(weight, QuantScheme(4, 32, False))
    whole = quantize(weight, grid)
    part = quantize(weight[:, 30:45], grid, columns=slice(30, 45))
    assert torch.equal(part, whole[:, 30:45])
    assert torch.equal(dequantize(part, grid, columns=slice(30, 45)), dequantize(whole, grid)[:, 30:45])


@pytest.mark.parametrize("count", [1, 2, 7, 64])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trips(count, signed):
    low, high = (-8, 7) if signed else (0, 15)
    codes = torch.randint(low, high + 1, (count,), dtype=torch.int8 if signed else torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
    assert torch.equal(unpack_int4(packed, count, signed=signed), codes)


def test_int4_nibble_order_is_low_first():
    assert pack_int4(torch.tensor([1, 2], dtype=torch.int8)).tolist() == [0x21]
    assert pack_int4(torch.tensor([-1, 0], dtype=torch.int8)).tolist() == [0x0F]


@pytest.mark.parametrize("text, name", [("int8", "int8"), ("INT4", "int4-g128"), ("int4-g64-asym", "int4-g64-asym")])
def test_parse_scheme(text, name):
    assert parse_scheme(text, group_size=128 if text.lower() == "int4" else None).name == name


@pytest.mark.parametrize("bad, match", [("int3", "bits must be 8 or 4"), ("fp8", "unknown quantization"),
                                        ("int4-g1", "group_size must be")])
def test_bad_schemes_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_scheme(bad)


def test_non_2d_weight_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        find_grid(torch.zeros(2, 3, 4), QuantScheme(8))


# ---- searched clipping ---------------------------------------------------------------------------------


def _group_errors(weight, grid, importance=None):
    """Each (row, group)'s squared rounding error, columns weighted by `importance`."""
    error = (dequantize(quantize(weight, grid), grid) - weight).square()
    if importance is not None:
        error = error * importance
    size = grid.scheme.group_size or weight.shape[1]
    padded = torch.nn.functional.pad(error, (0, -weight.shape[1] % size))
    return padded.view(weight.shape[0], -1, size).sum(-1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("weighted", [False, True])
def test_a_searched_grid_never_rounds_worse_than_the_full_range(scheme, weighted):
    """Per group, the searched range's (weighted) error is at most the full range's (the search tries the
    full range too and keeps the least), and on heavy-tailed weights lower for many 4-bit groups (8 bits
    have steps too fine for clipping to pay)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 100, generator=g) ** 3  # heavy tails: one large weight per group sets the range
    importance = torch.rand(100, generator=g) + 0.05 if weighted else None
    searched = find_grid(weight, QuantScheme(scheme.bits, scheme.group_size, scheme.symmetric, search=True),
                         importance=importance)
    full = find_grid(weight, scheme)
    better, plain = _group_errors(weight, searched, importance), _group_errors(weight, full, importance)
    assert (better <= plain * (1 + 1e-5)).all()
    if scheme.bits == 4:
        assert (better < plain).float().mean() > 0.25


def test_a_searched_grid_keeps_pruned_weights_out_of_the_error():
    weight = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    searched = find_grid(weight, QuantScheme(4, search=True), mask)
    assert searched.scale.float().item() == pytest.approx(0.3 / 7, rel=1e-3)  # the kept range fits exactly


def test_importance_must_name_every_column():
    with pytest.raises(ValueError, match="one entry per input column"):
        find_grid(torch.randn(2, 8), QuantScheme(4, 4, search=True), importance=torch.ones(7))
    with pytest.raises(ValueError, match="search must be True or False"):
        QuantScheme(4, search="yes")
