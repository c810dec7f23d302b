import pytest
import torch
from torch import nn

from sparsetorch.training import SET, RigL, Sparsifier
from sparsetorch.training.dynamic import drop_fraction_at
from training_helpers import OPTIMIZERS, mlp, train_step


def test_cosine_drop_fraction_by_hand():
    config = RigL(sparsity=0.9, end=100, drop_fraction=0.3)
    assert [drop_fraction_at(config, t) for t in (0, 50, 100)] == pytest.approx([0.3, 0.15, 0.0])
    assert drop_fraction_at(SET(sparsity=0.9, end=100), 50) == 0.3  # SET's default is constant


def test_updates_happen_every_delta_t_until_end():
    config = RigL(sparsity=0.9, end=10, every=3)
    assert [t for t in range(15) if config.updates_at(t)] == [3, 6, 9]


def one_layer(weights, grads, momentum=1.0):
    """A Linear(8 -> 1) with given weights (the zeros are pruned), one RigL update with these
    dense gradients, and the momentum buffer filled with `momentum` before the update."""
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sparsifier = Sparsifier(model, RigL(sparsity=0.5, end=100, every=1, drop_fraction=0.5, decay="constant"), optimizer=opt)
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
        layer.weight_mask.copy_(layer.weight != 0)
    (layer.weight * torch.tensor([grads])).sum().backward()
    opt.step()
    opt.state[layer.weight]["momentum_buffer"].fill_(momentum)
    assert sparsifier.step()
    return layer, opt.state[layer.weight]["momentum_buffer"]


def test_rigl_drops_the_smallest_and_grows_the_largest_gradients_at_zero_with_fresh_state():
    layer, momentum = one_layer([1.0, -2, 3, 4, 0, 0, 0, 0], [0, 0, 0, 0, 0.1, -5, 0.2, 7])
    assert layer.weight_mask.int().tolist() == [[0, 0, 1, 1, 0, 1, 0, 1]]
    assert layer.weight.tolist() == [[0.0, 0, 3, 4, 0, 0, 0, 0]]  # kept values stay, grown start at 0
    assert momentum.tolist() == [[0.0, 0, 1, 1, 0, 0, 0, 0]]  # dropped and grown: state reset


def test_rigl_may_regrow_a_just_dropped_weight_which_then_keeps_its_value():
    layer, _ = one_layer([1.0, -2, 3, 4, 0, 0, 0, 0], [100, 0, 0, 0, 0.1, -5, 0.2, 7])
    assert layer.weight_mask.int().tolist() == [[1, 0, 1, 1, 0, 0, 0, 1]]
    assert layer.weight.tolist() == [[1.0, 0, 3, 4, 0, 0, 0, 0]]


def test_rigl_grows_by_the_gradients_summed_over_grad_steps():
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = RigL(sparsity=0.5, end=100, every=2, drop_fraction=0.5, decay="constant", grad_steps=2)
    sparsifier = Sparsifier(model, schedule, optimizer=opt)
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2, 3, 4, 0, 0, 0, 0]]))
        layer.weight_mask.copy_(layer.weight != 0)
    for grads in ([0, 0, 0, 0, 0, 3, 0, 3], [0, 0, 0, 0, 4, -1, 0, 0.5]):
        (layer.weight * torch.tensor([grads])).sum().backward()
        opt.step()
        sparsifier.step()
        opt.zero_grad()
    # |sum| = [.., 4, 2, 0, 3.5]: the last step alone would grow index 5, a sum of |grad| index 5 too
    assert layer.weight_mask.int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 1]]


def test_rigl_needs_the_backward_before_its_update():
    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, RigL(sparsity=0.5, end=10, every=1), optimizer=opt)
    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) before sparsifier.step\\(\\)"):
        sparsifier.step()


@pytest.mark.parametrize("schedule", [SET(sparsity=0.7, end=10, every=2), RigL(sparsity=0.7, end=10, every=2)])
def test_drop_and_grow_moves_weights_but_never_the_count(schedule):
    model = mlp()
    opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
    sparsifier = Sparsifier(model, schedule, optimizer=opt, distribution="erk")
    start = sparsifier.masks()
    counts = {k: int(m.sum()) for k, m in start.items()}
    for step in range(6):
        train_step(model, opt, sparsifier, step)
        assert {k: int(m.sum()) for k, m in sparsifier.masks().items()} == counts
    assert any(not torch.equal(start[k], m) for k, m in sparsifier.masks().items())


def test_per_row_drop_and_grow_keeps_every_row_count():
    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, RigL(sparsity=0.5, end=10, every=1), optimizer=opt, pattern="unstructured-row")
    for step in range(4):
        train_step(model, opt, sparsifier, step)
    assert model[0].weight_mask.sum(dim=1).tolist() == [8] * 24


def test_dynamic_methods_refuse_structured_patterns():
    model = mlp()
    with pytest.raises(ValueError, match="moves single weights"):
        Sparsifier(model, RigL(sparsity=0.5, end=10), pattern="block-2x2", optimizer=OPTIMIZERS["adamw"](model.parameters()))


@pytest.mark.parametrize("bad, match", [
    (lambda: RigL(sparsity=0.5, end=0), "end must be"),
    (lambda: RigL(sparsity=0.5, end=10, drop_fraction=1.5), r"drop_fraction must be in \[0, 1\]"),
    (lambda: SET(sparsity=0.5, end=10, decay="linear"), "decay must be one of"),
    (lambda: RigL(sparsity=0.5, end=10, every=5, grad_steps=6), r"grad_steps must be between 1 and every \(5\)"),
    (lambda: RigL(sparsity=0.5, end=10, grad_steps=0), "grad_steps must be"),
])
def test_bad_dynamic_configs_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
