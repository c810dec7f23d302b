"""Keep masks held as bits (`oneshot/masks.py`): what goes in comes out, in an eighth of the bytes."""

import pytest
import torch

from sparsetorch.oneshot.masks import PackedMasks


@pytest.mark.parametrize("shape", [(5, 13), (4, 16), (3, 4, 5), (7,), (0, 3), (3, 0)])
def test_masks_come_back_as_they_went_in(shape):
    masks = PackedMasks()
    keep = torch.rand(shape) > 0.5
    masks["layer"] = keep
    back = masks["layer"]
    assert back.dtype == torch.bool and back.shape == keep.shape and torch.equal(back, keep)


def test_a_mapping_of_names_stored_packed():
    masks = PackedMasks()
    masks["a"], masks["b"] = torch.ones(8, 64, dtype=torch.bool), torch.tensor([[1, 0, 2]])
    assert list(masks) == ["a", "b"] and len(masks) == 2 and "a" in masks
    assert torch.equal(masks["b"], torch.tensor([[True, False, True]]))  # any nonzero keeps
    assert masks._packed["a"][0].numel() == 8 * 64 // 8
    del masks["a"]
    assert masks.get("a") is None and masks.pop("b").shape == (1, 3) and len(masks) == 0
