"""The C++ kernels for quantized weights against the dequantized dense matmul, on every ISA this CPU runs."""

import pytest
import torch
import torch.nn.functional as F

from conftest import structure_weight
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.kernels.build import best_loaded_isa
from sparsetorch.kernels.cpu_features import supported_isas
from sparsetorch.kernels.cpu_quantized import int8_activations, takes_int8_activations
from sparsetorch.kernels.dispatch import bind_kernel, kernel_name
from sparsetorch.kernels.registry import CPU
from sparsetorch.nn import SparseLinear
from sparsetorch.quantize import QuantScheme, find_grid
from test_kernels import assert_matches_dense, require

# (structure, scheme): every combination a C++ kernel serves, per-row scales and groups of 32 and 128.
CASES = [("bitmask", QuantScheme(8)), ("bitmask", QuantScheme(8, 64)), ("dense", QuantScheme(8)),
         ("dense", QuantScheme(8, 32)), ("nm", QuantScheme(4, 32)), ("nm", QuantScheme(4, 128)), ("nm", QuantScheme(4)),
         ("dense", QuantScheme(4, 32)), ("dense", QuantScheme(4, 128)), ("bitmask", QuantScheme(4, 32)),
         ("bitmask", QuantScheme(4, 128)), ("bitmask", QuantScheme(4))]
# 100 and 260: not a multiple of 16, 32 or the group (a short last group); (8, 4): less than one chunk
SHAPES = [(37, 64), (5, 100), (130, 516), (8, 4), (3, 260)]
BATCHES = [1, 2, 3, 8, 11]  # 11: two passes over the weight (8 + 3 rows)


def quantized(structure: str, scheme: QuantScheme, dense: torch.Tensor) -> QuantizedTensor:
    layout = (2, 4) if structure == "nm" else ()
    return QuantizedTensor.from_dense(dense, find_grid(dense, scheme, dense != 0), structure, *layout)


def check_all_batches(weight: QuantizedTensor, isa: str) -> None:
    """The kernel equals the dequantized matmul, of `int8_activations(x)` where the ISA multiplies int8 ones."""
    rows, cols = weight.shape
    reference = weight.to_dense()
    int8_x = isa == "avx512vnni" and takes_int8_activations(weight)
    for batch in BATCHES:
        x, bias = torch.randn(batch, cols), torch.randn(rows)
        x[0, :3] *= 40  # an outlier block
        seen = int8_activations(x) if int8_x else x
        assert kernel_name(weight, x, isa) == isa
        run = bind_kernel(weight, x, isa)
        assert_matches_dense(run(x, bias), F.linear(seen, reference, bias))
        assert_matches_dense(run(x, None), F.linear(seen, reference))


def test_every_case_is_registered():
    assert {(f"{s}-int{scheme.bits}", "linear") for s, scheme in CASES} <= set(CPU.keys())


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("structure,scheme", CASES, ids=[f"{s}-{scheme.name}" for s, scheme in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_kernel_matches_dequantized_dense(isa, structure, scheme, shape):
    require(isa)
    check_all_batches(quantized(structure, scheme, structure_weight(structure, *shape)), isa)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("structure,scheme", CASES, ids=[f"{s}-{scheme.name}" for s, scheme in CASES])
def test_empty_rows_and_rows_with_everything_kept(isa, structure, scheme):
    require(isa)
    dense = structure_weight(structure, 6, 100)
    dense[1] = 0  # nothing stored (bitmask), all zero codes (nm, dense)
    dense[4] = torch.randn(100) if structure != "nm" else dense[4]  # every column kept
    dense[5, :64] = 0  # an empty first group
    check_all_batches(quantized(structure, scheme, dense), isa)


@pytest.mark.parametrize("isa", supported_isas())
def test_empty_batch(isa):
    require(isa)
    weight = quantized("bitmask", QuantScheme(8), structure_weight("bitmask", 9, 40))
    assert bind_kernel(weight, torch.zeros(1, 40), isa)(torch.zeros(0, 40), None).shape == (0, 9)


def test_dispatch_picks_the_cpp_kernel_where_it_serves():
    best = best_loaded_isa()
    if best is None:
        pytest.skip("no C++ build here (no compiler?)")
    x = torch.randn(2, 64)
    for structure, scheme in CASES:
        weight = quantized(structure, scheme, structure_weight(structure, 16, 64))
        assert kernel_name(weight, x) == best, weight.kernel_format
        assert SparseLinear(weight).kernel(x) == best


@pytest.mark.parametrize("structure,scheme", [
    ("bitmask", QuantScheme(8, symmetric=False)),  # zero points: fallback
    ("dense", QuantScheme(4, 32, symmetric=False)),
    ("nm", QuantScheme(4, 48)),  # a group that is not a multiple of 32 columns
    ("dense", QuantScheme(8, 16)),
    ("csr16", QuantScheme(8)),  # no C++ kernel for this structure
], ids=lambda case: case if isinstance(case, str) else case.name)
def test_other_grids_fall_back_to_pytorch(structure, scheme):
    weight = quantized(structure, scheme, structure_weight(structure, 16, 96))
    x = torch.randn(3, 96)
    assert kernel_name(weight, x) == "torch"
    assert_matches_dense(bind_kernel(weight, x)(x, None), F.linear(x, weight.to_dense()))


def test_int8_activations_round_each_block_on_its_own():
    x = torch.cat([torch.linspace(-1, 1, 64), 100 * torch.linspace(-1, 1, 64), torch.zeros(10)])[None]
    seen = int8_activations(x)
    assert seen.shape == x.shape and seen[0, -10:].eq(0).all()
    for block in (slice(0, 64), slice(64, 128)):  # each block's step is its own absmax / 127
        step = float(x[0, block].abs().max()) / 127
        assert float((seen[0, block] - x[0, block]).abs().max()) <= step / 2 + 1e-6
    assert seen[0, 0] == -1 and seen[0, 127] == 100


def test_the_vnni_build_takes_only_whole_activation_blocks():
    assert takes_int8_activations(quantized("bitmask", QuantScheme(8), structure_weight("bitmask", 4, 64)))
    assert takes_int8_activations(quantized("dense", QuantScheme(4, 128), structure_weight("dense", 4, 256)))
    assert not takes_int8_activations(quantized("dense", QuantScheme(4, 32), structure_weight("dense", 4, 64)))
    assert takes_int8_activations(quantized("nm", QuantScheme(4, 128), structure_weight("nm", 4, 256)))
    assert not takes_int8_activations(quantized("bitmask", QuantScheme(8, symmetric=False), structure_weight("bitmask", 4, 64)))


def test_other_dtypes_fall_back_to_pytorch():
    weight = quantized("dense", QuantScheme(8), structure_weight("dense", 16, 64))
    x = torch.randn(3, 64, dtype=torch.float64)
    assert kernel_name(weight, x) == "torch"
    torch.testing.assert_close(bind_kernel(weight, x)(x, None), F.linear(x, weight.to_dense().double()))
