"""CSR with 16-bit columns: by hand, round trips, limits, corrupt parts."""

import pytest
import torch

from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import Csr16Tensor


def test_by_hand():
    t = Csr16Tensor.from_dense(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]]))
    assert t.values.tolist() == [2.0, 3.0, 4.0]
    assert t.cols.dtype == torch.uint16 and t.cols.tolist() == [1, 0, 2]
    assert t.row_ptr.tolist() == [0, 1, 1, 3]


def test_round_trip():
    dense = torch.randn(9, 33) * (torch.rand(9, 33) > 0.6)
    dense[3] = 0
    t = Csr16Tensor.from_dense(dense)
    assert torch.equal(t.to_dense(), dense)
    assert torch.equal(t.dense_rows(2, 7), dense[2:7])
    assert torch.equal(Csr16Tensor.from_state_dict(t.state_dict("p"), "p").to_dense(), dense)
    stored = BitmaskTensor.from_dense(dense)
    assert torch.equal(Csr16Tensor.from_mask(stored.mask(), stored.values).to_dense(), dense)


def test_columns_must_fit_16_bits():
    with pytest.raises(ValueError, match="65537 columns is more than 65536; use 'bitmask'"):
        Csr16Tensor.from_dense(torch.zeros(1, 65537))


def test_corrupt_parts_are_detected():
    parts = Csr16Tensor.from_dense(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])).state_dict("w")
    with pytest.raises(CorruptTensorError, match="row_ptr"):
        Csr16Tensor.from_state_dict({**parts, "w.row_ptr": parts["w.row_ptr"].flip(0)}, "w")
    with pytest.raises(CorruptTensorError, match="values"):
        Csr16Tensor.from_state_dict({**parts, "w.values": parts["w.values"][:-1]}, "w")
    swapped = parts["w.cols"].to(torch.int64)[[1, 0, 2]].to(torch.uint16)  # row 0 lists column 2 before 0
    with pytest.raises(CorruptTensorError, match="not rising"):
        Csr16Tensor.from_state_dict({**parts, "w.cols": swapped}, "w")
