"""SparseLinear: a drop-in Linear that holds only the compressed weight."""

import pytest
import torch
from torch import nn

from conftest import nm_weight
from sparsetorch.kernels.cpu_features import supported_isas
from sparsetorch.nn import SparseLinear, compress
from test_kernels import assert_matches_dense, require


def pruned_linear(in_features: int, out_features: int, pattern: str, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if pattern == "2:4":
            linear.weight.copy_(nm_weight(out_features, in_features, 2, 4))
        else:
            linear.weight.mul_(torch.rand_like(linear.weight) > 0.7)
    return linear


@pytest.mark.parametrize("backend", [*supported_isas(), "torch"])
@pytest.mark.parametrize("fmt,pattern", [("nm", "2:4"), ("bitmask", "70%"), ("csr16", "70%"), ("bitmask", "2:4")])
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 4), (300,)])
def test_sparse_linear_matches_the_pruned_linear(backend, fmt, pattern, batch):
    require(backend)
    dense = pruned_linear(132, 72, pattern)
    sparse = SparseLinear.from_linear(dense, fmt, backend)
    x = torch.randn(*batch, 132)
    with torch.no_grad():
        assert_matches_dense(sparse(x), dense(x))
    assert sparse.kernel(x.reshape(-1, 132)) == backend


def test_holds_no_dense_weight_and_fewer_bytes():
    dense = pruned_linear(256, 128, "2:4")
    sparse = SparseLinear.from_linear(dense, "nm")
    assert not hasattr(sparse, "weight")
    names = {name for name, _ in sparse.named_buffers()}
    assert names == {"shape", "nm", "values", "indices"}
    stored = sum(b.numel() * b.element_size() for b in sparse.buffers())
    assert stored < 0.55 * dense.weight.numel() * 4
    assert all(b.shape != dense.weight.shape for b in sparse.buffers())
    assert "format=nm, density=50.0%" in repr(sparse)


def test_auto_format_and_compress_errors():
    assert SparseLinear.from_linear(pruned_linear(64, 16, "2:4")).format == "nm"
    assert SparseLinear.from_linear(pruned_linear(64, 16, "70%")).format == "bitmask"
    with pytest.raises(ValueError, match="fits no N:M pattern; use 'bitmask' or 'csr16'"):
        compress(torch.ones(4, 8), "nm")
    with pytest.raises(NotImplementedError, match="no sparse format 'coo'"):
        compress(torch.ones(4, 8), "coo")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        SparseLinear.from_linear(pruned_linear(8, 4, "70%"), "bitmask", backend="fast")


def test_moving_to_another_dtype_keeps_working():
    sparse = SparseLinear.from_linear(pruned_linear(64, 32, "70%"), "csr16").double()
    assert sparse.sparse_weight.values.dtype == torch.float64
    x = torch.randn(5, 64, dtype=torch.float64)
    assert sparse.kernel(x) == "torch"
    expected = nn.functional.linear(x, sparse.sparse_weight.to_dense(), sparse.bias)
    torch.testing.assert_close(sparse(x), expected)


def test_gpt2_conv1d_is_read_transposed():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 64)  # weight (in=64, out=24)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.6)
    sparse = SparseLinear.from_linear(conv, "bitmask")
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert_matches_dense(sparse(x), conv(x))
