import pytest
import torch
from torch import nn

from sparsetorch.training.masking import attach_hard, attach_soft, detach, masked_weight


def test_masked_weight_forward_and_backward_by_hand():
    weight = torch.tensor([2.0, -4.0, 6.0], requires_grad=True)
    mask = torch.tensor([True, False, False])
    out = masked_weight(weight, mask, torch.tensor([0.5, 0.25]), refine=0.1)
    assert out.tolist() == [2.0, -2.0, 3.0]  # pruned entries scaled by a = 0.5
    out.sum().backward()
    assert weight.grad.tolist() == pytest.approx([1.0, 0.25 - 0.4, 0.25 + 0.6])  # b * g + refine * w on the pruned


def test_hard_masking_zeroes_gradients_and_hands_the_dense_ones_over():
    layer = nn.Linear(3, 2)
    seen = []
    attach_hard(layer, seen.append)
    layer.weight_mask[0, 0] = False
    layer(torch.ones(1, 3)).sum().backward()
    assert layer.weight.grad[0, 0] == 0 and (layer.weight.grad.flatten()[1:] != 0).all()
    assert seen[0][0, 0] != 0


def test_soft_masking_keeps_parameter_order_and_detach_restores_a_plain_weight():
    layer = nn.Linear(4, 2)
    weight = layer.weight
    handle = attach_soft(layer, refine=0.0)
    assert [name for name, _ in layer.named_parameters()] == ["weight_orig", "bias"]
    assert set(layer.state_dict()) == {"weight_orig", "bias", "weight_mask", "weight_mask_scale"}
    layer.weight_mask[0, 1] = False
    mask = detach(layer, handle)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight is weight and layer.weight[0, 1] == 0 and not mask[0, 1]
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert not layer._forward_pre_hooks


def test_a_module_cannot_be_masked_twice():
    layer = nn.Linear(4, 2)
    attach_hard(layer, lambda grad: None)
    with pytest.raises(ValueError, match="another Sparsifier is attached"):
        attach_soft(layer, 0.0)
