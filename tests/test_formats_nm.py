"""N:M packed format: the hand-checkable 2:4 case, round trips, bad input, corrupt parts."""

import pytest
import torch

from conftest import nm_weight
from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.nm import NMTensor, find_nm, index_bits, pack_indices, unpack_indices


def test_two_of_four_by_hand():
    t = NMTensor.from_dense(torch.tensor([[0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0, 8.0]]), 2, 4)
    assert t.values.tolist() == [[3.0, 4.0, 5.0, 8.0]]
    assert unpack_indices(t.indices, 2, 4).tolist() == [[2, 3, 0, 3]]
    assert t.indices.tolist() == [[2 | 3 << 2 | 0 << 4 | 3 << 6]]  # 2 bits per value, little-endian
    assert t.to_dense().tolist() == [[0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0, 8.0]]


def test_group_with_fewer_nonzeros_keeps_zeros_at_free_positions():
    t = NMTensor.from_dense(torch.tensor([[0.0, 0.0, 0.0, 4.0]]), 2, 4)
    assert t.values.tolist() == [[0.0, 4.0]]
    assert unpack_indices(t.indices, 2, 2).tolist() == [[0, 3]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 16), (2, 8)])
def test_round_trip(n, m):
    dense = nm_weight(7, 48, n, m)
    dense[0, :m] = 0
    t = NMTensor.from_dense(dense, n, m)
    assert torch.equal(t.to_dense(), dense)
    assert torch.equal(t.dense_rows(2, 5), dense[2:5])
    assert torch.equal(NMTensor.from_state_dict(t.state_dict("layer"), "layer").to_dense(), dense)
    stored = BitmaskTensor.from_dense(dense)
    assert torch.equal(NMTensor.from_mask(stored.mask(), stored.values, n, m).to_dense(), dense)


def test_two_of_four_costs_seventeen_bits_per_weight():
    t = NMTensor.from_dense(nm_weight(64, 256, 2, 4), 2, 4)
    assert (t.values.numel() * 32 + t.indices.numel() * 8) / (64 * 256) == 17


def test_index_packing():
    assert index_bits(2) == 1 and index_bits(4) == 2 and index_bits(8) == 4 and index_bits(16) == 4
    indices = torch.tensor([[1, 0, 3, 2, 1]], dtype=torch.uint8)
    assert torch.equal(unpack_indices(pack_indices(indices, 2), 2, 5), indices.long())


def test_find_nm():
    assert find_nm(nm_weight(4, 16, 2, 4)) == (2, 4)
    assert find_nm(nm_weight(4, 16, 1, 4)) == (2, 4)  # 1:4 also fits 2:4, which comes first
    assert find_nm(nm_weight(4, 16, 4, 8)) == (4, 8)
    assert find_nm(torch.ones(4, 16)) is None


def test_bad_input():
    with pytest.raises(ValueError, match="hold 3 nonzeros, more than 2"):
        NMTensor.from_dense(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 4)
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        NMTensor.from_dense(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M, got 4:4"):
        NMTensor.from_dense(torch.zeros(2, 8), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        NMTensor.from_dense(torch.zeros(8), 2, 4)


def test_corrupt_parts_are_detected():
    parts = NMTensor.from_dense(nm_weight(4, 16, 2, 4), 2, 4).state_dict("w")
    with pytest.raises(CorruptTensorError, match=r"w: missing \['indices'\]"):
        NMTensor.from_state_dict({k: v for k, v in parts.items() if k != "w.indices"}, "w")
    with pytest.raises(CorruptTensorError, match="values are"):
        NMTensor.from_state_dict({**parts, "w.values": parts["w.values"][:, :-1]}, "w")
    repeated = parts["w.indices"].clone()
    repeated[0, 0] = 0  # both values of the first group at position 0
    with pytest.raises(CorruptTensorError, match="not increasing"):
        NMTensor.from_state_dict({**parts, "w.indices": repeated}, "w")
    with pytest.raises(CorruptTensorError, match="does not fit"):
        NMTensor.from_state_dict({**parts, "w.nm": torch.tensor([2, 3])}, "w")
