"""The dense index structure, and half-precision values in every format."""

import pytest
import torch

from conftest import nm_weight
from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import Csr16Tensor
from sparsetorch.formats.dense import DenseTensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.nn import SparseLinear


def test_dense_stores_everything():
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    t = DenseTensor.from_dense(dense)
    assert torch.equal(t.to_dense(), dense) and torch.equal(t.dense_rows(1, 2), dense[1:])
    assert t.value_span(1, 2) == (2, 4) and t.stored_shape() == (2, 2)
    assert sorted(t.state_dict("p")) == ["p.weight"]
    assert torch.equal(DenseTensor.from_state_dict(t.state_dict("p"), "p").to_dense(), dense)
    with pytest.raises(CorruptTensorError, match="p: weight has shape"):
        DenseTensor.from_parts({"weight": torch.zeros(3)}, "p")
    x = torch.randn(2, 2)
    torch.testing.assert_close(SparseLinear(t)(x), x @ dense.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [BitmaskTensor, NMTensor, Csr16Tensor, DenseTensor], ids=lambda f: f.FORMAT)
def test_half_precision_values_round_trip_bit_exactly(fmt, dtype):
    dense = nm_weight(8, 32, 2, 4).to(dtype)
    t = fmt.from_dense(dense, 2, 4) if fmt is NMTensor else fmt.from_dense(dense)
    assert t.values.dtype == dtype
    back = fmt.from_state_dict(t.state_dict("p"), "p")
    assert torch.equal(back.to_dense().view(torch.int16), dense.view(torch.int16))
    assert torch.equal(back.dense_rows(2, 5), dense[2:5])
    x = torch.randn(3, 32, dtype=dtype)
    torch.testing.assert_close(SparseLinear(back, backend="torch")(x), x @ dense.T)
