"""2:4 on CUDA through torch's semi-structured sparse tensors; skipped without a CUDA device."""

import pytest
import torch
from torch import nn

from conftest import nm_weight
from sparsetorch.nn import SparseLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8, 300])
def test_semi_structured_matches_dense(dtype, batch):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability 8.0+")
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.copy_(nm_weight(128, 256, 2, 4))
    sparse = SparseLinear.from_linear(linear, "nm").to("cuda", dtype)
    linear = linear.to("cuda", dtype)
    x = torch.randn(batch, 256, device="cuda", dtype=dtype)
    assert sparse.kernel(x) == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=2e-2, atol=2e-2)


def test_unsupported_cuda_shapes_fall_back():
    sparse = SparseLinear.from_linear(nn.Linear(12, 8), "bitmask").to("cuda")
    x = torch.randn(3, 12, device="cuda")
    assert sparse.kernel(x) == "torch"
    assert sparse(x).shape == (3, 8)
