import pytest
import torch
from torch import nn

from sparsetorch.training import SRSTE, ProgressiveNM, Sparsifier
from sparsetorch.training.nm import decay_at
from training_helpers import OPTIMIZERS, mlp, train_step


def four_weights(schedule, weights=(1.0, -2.0, 3.0, 0.5)):
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weights]))
    return model, Sparsifier(model, schedule, pattern="2:4")


def test_srste_masks_the_forward_and_passes_gradients_straight_through_with_the_refine_term():
    model, _ = four_weights(SRSTE(refine=0.1))
    layer = model[0]
    assert layer.weight_mask.int().tolist() == [[0, 1, 1, 0]]
    model(torch.ones(1, 4)).sum().backward()
    assert layer.weight.tolist() == [[0.0, -2.0, 3.0, 0.0]]  # what the forward used
    assert layer.weight_orig.grad[0].tolist() == pytest.approx([1.1, 1.0, 1.0, 1.05])  # g + 0.1 * ~mask * w


def test_srste_takes_the_mask_afresh_from_the_latent_weights_every_step():
    model, sparsifier = four_weights(SRSTE())
    with torch.no_grad():
        model[0].weight_orig.copy_(torch.tensor([[9.0, -2.0, 3.0, 0.5]]))  # as if the optimizer had moved it
    assert sparsifier.step()
    assert model[0].weight_mask.int().tolist() == [[1, 0, 1, 0]]
    assert model[0].weight.tolist() == [[9.0, 0.0, 3.0, 0.0]]


def test_decay_by_hand():
    assert [decay_at(t, 50, 150) for t in (0, 50, 75, 150, 200)] == [1.0, 1.0, 0.75, 0.0, 0.0]


def test_progressive_nm_scales_pruned_weights_and_their_gradients_by_beta():
    model, sparsifier = four_weights(ProgressiveNM(start=0, end=4))
    sparsifier.step()  # beta = 0.75
    layer = model[0]
    model(torch.ones(1, 4)).sum().backward()
    assert layer.weight[0].tolist() == pytest.approx([0.75, -2.0, 3.0, 0.375])
    assert layer.weight_orig.grad[0].tolist() == pytest.approx([0.75, 1.0, 1.0, 0.75])


def test_progressive_nm_is_exact_and_frozen_after_end():
    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, ProgressiveNM(end=3), pattern="2:4")
    for step in range(3):
        train_step(model, opt, sparsifier, step)
    frozen = sparsifier.masks()
    for step in range(3, 6):
        train_step(model, opt, sparsifier, step)
        for layer in sparsifier.layers:
            assert torch.equal(layer.mask, frozen[layer.name])
            assert (layer.module.weight[~layer.mask] == 0).all()


def test_nm_methods_need_an_nm_pattern():
    with pytest.raises(ValueError, match="trains N:M sparsity"):
        Sparsifier(mlp(), SRSTE(), pattern="unstructured")


def test_a_layer_whose_inputs_do_not_divide_by_m_is_named():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="layer '0'.*divisible by 4.*ignore=\\['0'\\]"):
        Sparsifier(model, SRSTE(), pattern="2:4")


def test_a_sparsity_that_disagrees_with_the_pattern_is_refused():
    with pytest.raises(ValueError, match="always gives sparsity 0.5"):
        Sparsifier(mlp(), SRSTE(sparsity=0.9), pattern="2:4")


def test_n_not_below_m_is_refused():
    with pytest.raises(ValueError, match="0 < N < M"):
        Sparsifier(mlp(), SRSTE(), pattern="4:4")


def test_negative_refine_is_refused():
    with pytest.raises(ValueError, match="refine"):
        SRSTE(refine=-1.0)
