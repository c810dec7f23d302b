"""Quantized values in every index structure: round trips, packing, forward, corrupt parts."""

import pytest
import torch

from conftest import structure_weight
from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.quantized import QuantizedTensor, check_on_grid, quantized_part_names
from sparsetorch.kernels.build import best_loaded_isa
from sparsetorch.kernels.cpu_quantized import int8_activations, takes_int8_activations
from sparsetorch.nn import SparseLinear
from sparsetorch.quantize import QuantScheme, fake_quantize, find_grid, unpack_int4

SCHEMES = [QuantScheme(8), QuantScheme(8, symmetric=False), QuantScheme(4, 32), QuantScheme(4, 32, symmetric=False),
           QuantScheme(4, 128), QuantScheme(4, 128, symmetric=False)]
STRUCTURES = [("bitmask", ()), ("nm", (2, 4)), ("csr16", ()), ("dense", ())]


def _quantized(structure, layout, scheme, rows=13, cols=96):
    """(the stored weight, the fake-quantized dense reference)."""
    weight = structure_weight(structure, rows, cols)
    reference, grid = fake_quantize(weight, scheme, weight != 0)
    return QuantizedTensor.from_dense(weight, grid, structure, *layout), reference


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("structure,layout", STRUCTURES, ids=[s for s, _ in STRUCTURES])
@pytest.mark.parametrize("cols", [96, 100])  # 100: not a multiple of the group, nor of 8 (packing)
def test_round_trip_equals_the_fake_quantized_weight(structure, layout, scheme, cols):
    stored, reference = _quantized(structure, layout, scheme, cols=cols)
    assert stored.to_dense().dtype == torch.float32
    assert torch.equal(stored.to_dense(), reference)
    assert torch.equal(stored.dense_rows(3, 8), reference[3:8])
    assert torch.equal(stored.dense_rows(5, 5), reference[5:5])
    back = QuantizedTensor.from_state_dict(stored.state_dict("p"), "p", scheme=scheme, structure=structure)
    assert torch.equal(back.to_dense(), reference)
    assert stored.kernel_format == f"{structure}-int{scheme.bits}"


@pytest.mark.parametrize("structure", ["bitmask", "csr16", "dense"])
def test_odd_shapes_and_empty_rows(structure):
    weight = structure_weight(structure, 7, 45)
    weight[2] = 0
    for scheme in (QuantScheme(4, 32, symmetric=False), QuantScheme(8)):
        reference, grid = fake_quantize(weight, scheme, weight != 0)
        stored = QuantizedTensor.from_dense(weight, grid, structure)
        assert torch.equal(stored.to_dense(), reference)
        assert all(torch.equal(stored.dense_rows(r, r + 1), reference[r:r + 1]) for r in range(7))


def test_int8_bitmask_by_hand():
    weight = torch.tensor([[0.0, 0.5, -1.0, 0.0], [0.25, 0.0, 0.0, 0.0]])
    grid = find_grid(weight, QuantScheme(8))
    stored = QuantizedTensor.from_dense(weight, grid, "bitmask")
    parts = stored.parts()
    assert sorted(parts) == ["bitmask", "compressed", "row_offsets", "shape", "weight_scale"]
    assert parts["compressed"].tolist() == [64, -127, 127]  # 0.5 / (1 / 127) rounds to 64 (63.5)
    assert parts["weight_scale"].dtype == torch.float32 and parts["weight_scale"].shape == (2, 1)
    assert parts["bitmask"].tolist() == [[6], [1]]


def test_asymmetric_codes_are_stored_signed_like_compressed_tensors():
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    grid = find_grid(weight, QuantScheme(8, symmetric=False))
    parts = QuantizedTensor.from_dense(weight, grid, "dense").parts()
    assert parts["weight"].dtype == torch.int8 and parts["weight"].tolist() == [[-128, -43, 42, 127]]
    assert parts["weight_zero_point"].tolist() == [[-128]]  # natural zero point 0, shifted by -128


def test_four_bit_codes_are_packed_two_per_byte():
    weight = torch.randn(6, 64) * (torch.rand(6, 64) > 0.5)
    grid = fake_quantize(weight, QuantScheme(4, 32), weight != 0)[1]
    stored = QuantizedTensor.from_dense(weight, grid, "bitmask")
    count = int((weight != 0).sum())
    assert stored.codes.dtype == torch.uint8 and stored.codes.numel() == -(-count // 2)
    nibbles = unpack_int4(stored.codes, count, signed=False).to(torch.int16) - 8  # symmetric: code + 8
    assert torch.equal(nibbles, torch.round(weight / grid.per_column(grid.scale))[weight != 0].to(torch.int16))
    dense = QuantizedTensor.from_dense(weight, grid, "dense")
    assert dense.parts()["weight_packed"].dtype == torch.int32 and dense.parts()["weight_packed"].shape == (6, 8)
    assert dense.parts()["weight_shape"].tolist() == [6, 64]


def test_bits_per_weight():
    weight = torch.randn(64, 256) * (torch.rand(64, 256) > 0.5)
    for scheme, low, high in ((QuantScheme(8), 5.0, 5.5), (QuantScheme(4, 128), 3.0, 3.6)):
        stored = QuantizedTensor.from_dense(weight, fake_quantize(weight, scheme, weight != 0)[1], "bitmask")
        assert low < stored.nbytes * 8 / weight.numel() < high
    dense4 = QuantizedTensor.from_dense(weight, find_grid(weight, QuantScheme(4, 128)), "dense")
    assert dense4.nbytes * 8 / weight.numel() == pytest.approx(4 + 32 / 128 + 64 / weight.numel())


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32, symmetric=False)], ids=lambda s: s.name)
@pytest.mark.parametrize("structure,layout", STRUCTURES, ids=[s for s, _ in STRUCTURES])
def test_sparse_linear_forward_is_the_dequantized_matmul(structure, layout, scheme):
    stored, reference = _quantized(structure, layout, scheme, rows=24, cols=64)
    bias = torch.randn(24)
    layer = SparseLinear(stored, bias)
    x = torch.randn(3, 5, 64)
    served = structure in ("bitmask", "dense") and scheme.symmetric  # by a C++ kernel (test_kernels_quantized.py)
    assert layer.kernel(x) == ((best_loaded_isa() or "torch") if served else "torch")
    seen = x
    if layer.kernel(x) == "avx512vnni" and takes_int8_activations(stored):
        seen = int8_activations(x.reshape(-1, 64)).view(x.shape)
    torch.testing.assert_close(layer(x), seen @ reference.T + bias)
    moved = layer.to(torch.float64)  # rebuilt from its buffers: scales in float64 still hold the fp16 values
    torch.testing.assert_close(moved(x.double()), x.double() @ reference.double().T + bias.double())
    assert "density" in repr(layer)


def test_weights_off_their_grid_are_refused_by_name():
    weight = torch.randn(4, 32)
    rounded, grid = fake_quantize(weight, QuantScheme(8))
    check_on_grid(rounded, grid, "layer")
    with pytest.raises(ValueError, match=r"layer: weight\[.*\] = .* is not on its int8 grid .* quantize the weights first"):
        check_on_grid(weight, grid, "layer")
    with pytest.raises(ValueError, match="find the grid of this weight"):
        check_on_grid(rounded[:, :16], grid, "layer")


def test_unknown_structure_and_missing_scheme():
    weight = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown index structure 'coo'"):
        QuantizedTensor.from_dense(weight, find_grid(weight, QuantScheme(8)), "coo")
    with pytest.raises(TypeError, match="needs scheme="):
        QuantizedTensor.from_parts({})
    with pytest.raises(TypeError, match="needs its grid"):
        QuantizedTensor.from_mask(weight != 0, weight[weight != 0])


def _parts(structure, scheme, layout=()):
    stored, _ = _quantized(structure, layout, scheme, rows=8, cols=64)
    return stored.state_dict("w")


def _load(parts, scheme, structure):
    return QuantizedTensor.from_state_dict(parts, "w", scheme=scheme, structure=structure)


@pytest.mark.parametrize("structure,layout", STRUCTURES, ids=[s for s, _ in STRUCTURES])
@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32)], ids=lambda s: s.name)
def test_codes_that_do_not_match_the_index_are_detected(structure, layout, scheme):
    parts = _parts(structure, scheme, layout)
    key = next(f"w.{k}" for k in ("compressed", "values", "weight", "weight_packed") if f"w.{k}" in parts)
    short = parts[key].reshape(-1)[:-1] if parts[key].dim() == 1 else parts[key][:, :-1]
    if key != "w.weight":  # dense int8 codes carry their own shape, as in compressed-tensors
        with pytest.raises(CorruptTensorError, match=r"w: the index stores \d+ values, so its .* codes must be"):
            _load({**parts, key: short}, scheme, structure)
    with pytest.raises(CorruptTensorError, match="codes must be"):
        _load({**parts, key: parts[key].to(torch.int16)}, scheme, structure)


def test_scales_and_zero_points_must_fit_the_groups():
    scheme = QuantScheme(4, 32, symmetric=False)
    parts = _parts("bitmask", scheme)
    with pytest.raises(CorruptTensorError, match=r"w: weight_scale is .* expected floats \(8, 2\)"):
        _load({**parts, "w.weight_scale": parts["w.weight_scale"][:, :1]}, scheme, "bitmask")
    with pytest.raises(CorruptTensorError, match="not non-negative fp16"):
        _load({**parts, "w.weight_scale": parts["w.weight_scale"] + 1e-4}, scheme, "bitmask")
    with pytest.raises(CorruptTensorError, match="weight_zero_point is"):
        _load({**parts, "w.weight_zero_point": parts["w.weight_zero_point"].to(torch.int32)}, scheme, "bitmask")
    with pytest.raises(CorruptTensorError, match=r"w: missing \['weight_zero_point'\]"):
        _load({k: v for k, v in parts.items() if k != "w.weight_zero_point"}, scheme, "bitmask")
    assert quantized_part_names(scheme, "dense") == ("weight_packed", "weight_shape", "weight_scale",
                                                     "weight_zero_point")


def test_damaged_index_is_detected():
    parts = _parts("bitmask", QuantScheme(8))
    offsets = parts["w.row_offsets"] + 1
    with pytest.raises(CorruptTensorError, match="row_offsets"):
        _load({**parts, "w.row_offsets": offsets}, QuantScheme(8), "bitmask")
    nm = _parts("nm", QuantScheme(4, 32), (2, 4))
    with pytest.raises(CorruptTensorError, match="does not fit"):
        _load({**nm, "w.nm": torch.tensor([2, 3])}, QuantScheme(4, 32), "nm")
