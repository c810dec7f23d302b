import pytest
import torch
from torch import nn

from sparsetorch.patterns import prune_count
from sparsetorch.training import Sparsifier, SRigL
from sparsetorch.training.srigl import ablate, fan_in_budget, top_per_row
from training_helpers import OPTIMIZERS, mlp, train_step


def test_top_per_row_keeps_a_different_count_in_each_row():
    scores = torch.tensor([[1.0, 3, 2, 0], [5, 4, 6, 7], [1, 1, 1, 1]])
    keep = top_per_row(scores, torch.tensor([1, 3, 0]))
    assert keep.int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]]


def test_neurons_with_too_few_salient_weights_are_ablated():
    salient = torch.tensor([[1] * 5 + [0] * 3, [1] + [0] * 7, [1] * 4 + [0] * 4], dtype=torch.bool)
    assert ablate(salient, fan_in=4, gamma=0.5, budget=12).tolist() == [True, False, True]


def test_ablation_never_leaves_fewer_neurons_than_the_budget_needs():
    salient = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert ablate(salient, fan_in=2, gamma=1.0, budget=6).tolist() == [True, False, True]  # 6 weights need 2 rows


def test_fan_in_budget_shares_the_budget_exactly():
    fan_in = fan_in_budget(torch.tensor([True, False, True]), torch.tensor([5, 1, 4]), budget=9)
    assert fan_in.tolist() == [5, 0, 4]


def train_srigl(model, gamma, steps=6, sparsity=0.75):
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, SRigL(sparsity=sparsity, end=20, every=1, gamma=gamma), optimizer=opt)
    for step in range(steps):
        train_step(model, opt, sparsifier, step)
    return sparsifier


def test_without_ablation_every_neuron_keeps_the_same_fan_in():
    sparsifier = train_srigl(mlp(), gamma=0.0)
    for layer in sparsifier.layers:
        fan_in = layer.mask.shape[1] - prune_count(layer.mask.shape[1], 0.75)
        assert layer.mask.sum(dim=1).unique().tolist() == [fan_in]


def test_ablated_neurons_go_dark_and_their_budget_moves_to_the_rest():
    sparsifier = train_srigl(mlp(), gamma=1.0)
    ablated = 0
    for layer in sparsifier.layers:
        rows = layer.mask.sum(dim=1)
        budget = layer.mask.shape[0] * (layer.mask.shape[1] - prune_count(layer.mask.shape[1], 0.75))
        assert int(rows.sum()) == budget
        live = rows[rows > 0]
        assert int(live.max() - live.min()) <= 1  # constant fan-in, up to the one-weight remainder
        ablated += int((rows == 0).sum())
        assert (layer.module.weight[rows == 0] == 0).all()
    assert ablated > 0


def test_conv_fan_in_counts_input_channels_and_kernel():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, SRigL(sparsity=0.5, end=20, every=1, gamma=0.0), optimizer=opt)
    for step in range(3):
        x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        sparsifier.step()
        opt.zero_grad()
    per_channel = model[0].weight_mask.reshape(6, -1).sum(dim=1)
    assert per_channel.tolist() == [36 - prune_count(36, 0.5)] * 6


def test_srigl_needs_the_per_row_pattern():
    model = mlp()
    with pytest.raises(ValueError, match="constant fan-in per neuron"):
        Sparsifier(model, SRigL(sparsity=0.5, end=10), pattern="unstructured", optimizer=OPTIMIZERS["adamw"](model.parameters()))


def test_gamma_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        SRigL(sparsity=0.5, end=10, gamma=2.0)
