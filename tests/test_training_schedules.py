import pytest
import torch

from sparsetorch.training import Gradual, Iterative, OneShot, Sparsifier
from sparsetorch.training.schedules import cubic_sparsity
from training_helpers import OPTIMIZERS, mlp, train_step


def test_cubic_schedule_by_hand():
    # s_t = 0.8 + (0 - 0.8) * (1 - t/100)^3 at the last pruning step t <= step (every 25)
    at = [cubic_sparsity(step, 0.8, start=0, end=100, every=25) for step in (0, 24, 25, 50, 99, 100, 500)]
    assert at == pytest.approx([0.0, 0.0, 0.8 - 0.8 * 0.75**3, 0.7, 0.8 - 0.8 * 0.25**3, 0.8, 0.8])


def test_cubic_schedule_starts_from_initial_and_waits_for_start():
    assert cubic_sparsity(5, 0.9, start=10, end=20, every=5, initial=0.5) == 0.5
    assert cubic_sparsity(10, 0.9, start=10, end=20, every=5, initial=0.5) == 0.5
    assert cubic_sparsity(15, 0.9, start=10, end=20, every=5, initial=0.5) == pytest.approx(0.9 - 0.4 * 0.125)


def test_gradual_masks_only_grow_and_hit_the_target_at_end():
    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    sparsifier = Sparsifier(model, Gradual(sparsity=0.75, start=2, end=8, every=2), optimizer=opt)
    previous = sparsifier.masks()
    changed_at = []
    for step in range(10):
        train_step(model, opt, sparsifier, step)
        masks = sparsifier.masks()
        if any(not torch.equal(masks[k], previous[k]) for k in masks):
            changed_at.append(step + 1)
        assert all((masks[k] <= previous[k]).all() for k in masks), "a pruned weight came back"
        previous = masks
    assert changed_at == [4, 6, 8]  # at step 2 the cubic is still at its initial 0
    assert sparsifier.sparsity()["0"] == pytest.approx(0.75, abs=1 / 384)


def test_oneshot_waits_for_its_step():
    model = mlp()
    opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
    sparsifier = Sparsifier(model, OneShot(sparsity=0.5, at=3), optimizer=opt)
    seen = []
    for step in range(5):
        train_step(model, opt, sparsifier, step)
        seen.append(sparsifier.sparsity()["0"])
    assert seen == [0.0, 0.0, 0.5, 0.5, 0.5]


def test_oneshot_magnitude_keeps_the_largest_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 2.0]]))
    Sparsifier(model, OneShot(sparsity=0.5))
    assert model[0].weight.tolist() == [[0.0, -3.0, 0.0, 2.0]]


def test_iterative_sparsity_per_round():
    config = Iterative(sparsity=0.875, rounds=3, round_steps=10)
    assert [config.sparsity_at(step, 0.875) for step in (0, 9, 10, 20, 30, 99)] == pytest.approx(
        [0.0, 0.0, 0.5, 0.75, 0.875, 0.875])


def test_iterative_rewinds_every_parameter_and_clears_the_optimizer():
    model = mlp()
    opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
    sparsifier = Sparsifier(model, Iterative(sparsity=0.5, rounds=1, round_steps=3, rewind=1), optimizer=opt)
    train_step(model, opt, sparsifier, 0)
    rewind_point = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (1, 2):
        train_step(model, opt, sparsifier, step)
    assert sparsifier.sparsity()["0"] == 0.5
    assert not opt.state, "optimizer state survived the rewind"
    for name, param in model.named_parameters():
        layer, kind = name.split(".")
        expected = rewind_point[name] * model[int(layer)].weight_mask if kind == "weight" else rewind_point[name]
        assert torch.equal(param, expected), name


@pytest.mark.parametrize("bad, match", [
    (lambda: Gradual(sparsity=0.5, start=5, end=5), "end must be a whole number of steps >= 6"),
    (lambda: Gradual(sparsity=0.5, end=10, every=0), "every must be"),
    (lambda: Gradual(sparsity=1.2, end=10), r"sparsity must be in \[0, 1\)"),
    (lambda: Gradual(sparsity=0.5, end=10, initial=-0.1), r"initial must be in \[0, 1\]"),
    (lambda: OneShot(sparsity=0.5, score="taylor"), "score must be one of"),
    (lambda: Iterative(sparsity=0.5, rounds=0, round_steps=3), "rounds must be"),
    (lambda: Iterative(sparsity=0.5, rounds=2, round_steps=3, rewind=3), r"rewind must be a step inside the first round"),
])
def test_bad_schedules_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
