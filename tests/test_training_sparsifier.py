import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch.training import SRSTE, Gradual, OneShot, RigL, Sparsifier
from training_helpers import OPTIMIZERS, Conv1D, batch, mlp, train_step


def sparsifier_for(schedule, model=None, **kwargs):
    model = model or mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    return model, opt, Sparsifier(model, schedule, optimizer=opt, **kwargs)


def test_step_reports_when_masks_change():
    model, opt, sparsifier = sparsifier_for(Gradual(sparsity=0.5, start=0, end=4, every=2))
    changed = []
    for step in range(5):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        changed.append(sparsifier.step())
        opt.zero_grad()
    assert changed == [False, True, False, True, False]
    assert sparsifier.scheduled_sparsity() == {"0": 0.5, "2": 0.5}
    assert sparsifier.sparsity() == {"0": 0.5, "2": 0.5}


def test_gpt2_conv1d_weights_group_n_m_along_their_input_rows():
    model = nn.Sequential(Conv1D(8, 3))
    Sparsifier(model, OneShot(), pattern="2:4")
    groups = model[0].weight_mask.t().reshape(3, 2, 4)  # (out, groups, m) in (out, in) order
    assert (groups.sum(dim=2) == 2).all()


def test_convolutions_are_targets_for_training():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 2))
    _, _, sparsifier = sparsifier_for(RigL(sparsity=0.8, end=10), model, distribution="erk")
    assert [layer.name for layer in sparsifier.layers] == ["0", "2"]
    assert model[0].weight_mask.shape == (8, 4, 3, 3)


def test_finalize_leaves_a_plain_model_with_exact_zeros():
    for schedule in (OneShot(sparsity=0.5), SRSTE()):
        model, opt, sparsifier = sparsifier_for(schedule, pattern="2:4")
        train_step(model, opt, sparsifier, 0)
        masks = sparsifier.finalize()
        assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert all((model[int(name)].weight[~mask] == 0).all() for name, mask in masks.items())
        with pytest.raises(RuntimeError, match="finalized"):
            sparsifier.step()


def test_a_schedule_that_is_not_a_config_is_a_type_error():
    with pytest.raises(TypeError, match="schedule must be a method config"):
        Sparsifier(mlp(), "rigl")


def test_masks_that_change_need_the_optimizer():
    with pytest.raises(ValueError, match="pass optimizer="):
        Sparsifier(mlp(), RigL(sparsity=0.5, end=10))


def test_an_optimizer_of_another_model_is_refused():
    with pytest.raises(ValueError, match="does not train the weights"):
        Sparsifier(mlp(), RigL(sparsity=0.5, end=10), optimizer=OPTIMIZERS["adamw"](mlp().parameters()))


def test_targets_that_match_nothing_list_the_candidates():
    with pytest.raises(ValueError, match="match no prunable layer; prunable layers are: 0, 2"):
        Sparsifier(mlp(), OneShot(sparsity=0.5), targets=["re:.*attn.*"])


def test_nm_with_a_non_uniform_distribution_is_refused():
    with pytest.raises(ValueError, match="distribution='uniform'"):
        Sparsifier(mlp(), SRSTE(), pattern="2:4", distribution="erk")


def test_a_missing_sparsity_is_asked_for():
    with pytest.raises(ValueError, match="needs a global sparsity"):
        Sparsifier(mlp(), OneShot(), distribution="erk")


def test_state_of_another_schedule_is_refused():
    _, _, a = sparsifier_for(Gradual(sparsity=0.5, end=4))
    _, _, b = sparsifier_for(Gradual(sparsity=0.6, end=4))
    with pytest.raises(ValueError, match="was saved for"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("schedule", [RigL(sparsity=0.75, end=10, every=2), SRSTE()])
def test_training_under_bfloat16_autocast(schedule):
    model, opt, sparsifier = sparsifier_for(schedule, pattern="2:4" if isinstance(schedule, SRSTE) else None)
    for step in range(4):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sparsifier.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    expected = 0.75 if isinstance(schedule, RigL) else 0.5
    assert sparsifier.sparsity() == {"0": expected, "2": expected}
    assert all((layer.module.weight[~layer.mask] == 0).all() for layer in sparsifier.layers)


@pytest.mark.parametrize("schedule", [RigL(sparsity=0.75, end=10, every=2), SRSTE()], ids=["rigl", "srste"])
def test_a_compiled_model_trains_with_the_sparsifier(schedule):
    torch._dynamo.reset()
    model, opt, sparsifier = sparsifier_for(schedule, pattern="2:4" if isinstance(schedule, SRSTE) else None)
    compiled = torch.compile(model)
    for step in range(5):
        x, y = batch(step)
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        sparsifier.step()
        opt.zero_grad()
    for layer in sparsifier.layers:
        assert (layer.module.weight[~layer.mask] == 0).all()
        if not sparsifier.method.soft:
            assert (layer.weight.grad is None) or (layer.weight.grad[~layer.mask] == 0).all()
    eager = model(batch(9)[0])
    assert torch.allclose(compiled(batch(9)[0]), eager, atol=1e-5)
