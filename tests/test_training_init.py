"""Sparse-aware initialization and the training-FLOPs counter of the Sparsifier."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparsetorch.cli import main
from sparsetorch.training import SET, SRSTE, Gradual, Iterative, OneShot, ProgressiveNM, RigL, Sparsifier, SRigL
from sparsetorch.training.demo import layer_rows
from sparsetorch.training.sparsifier import fan_in_scales
from sparsetorch.training.toys import DigitsCNN
from training_helpers import OPTIMIZERS, Conv1D, batch, mlp, train_step

FROM_SCRATCH = {
    "static": (OneShot(sparsity=0.75, score="random"), {"distribution": "erk"}),
    "set": (SET(sparsity=0.75, end=10, every=2), {"distribution": "erk"}),
    "rigl": (RigL(sparsity=0.75, end=10, every=2), {"distribution": "erk"}),
    "srigl": (SRigL(sparsity=0.75, end=10, every=2), {}),
}
STARTS_DENSE_OR_BY_MAGNITUDE = {
    "oneshot-magnitude": (OneShot(sparsity=0.75), {}),
    "oneshot-random-later": (OneShot(sparsity=0.75, score="random", at=2), {}),
    "gradual": (Gradual(sparsity=0.75, start=0, end=4, every=1, initial=0.5), {}),
    "iterative": (Iterative(sparsity=0.75, rounds=2, round_steps=3), {}),
    "srste": (SRSTE(), {"pattern": "2:4"}),
    "progressive-nm": (ProgressiveNM(end=4), {"pattern": "2:4"}),
}


def build(schedule, model=None, **kwargs):
    model = model or mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    return model, opt, Sparsifier(model, schedule, optimizer=opt, **kwargs)


def dense_weights(model):
    return {name: module.weight.detach().clone() for name, module in model.named_modules() if hasattr(module, "weight")}


# ---- sparse-aware initialization -----------------------------------------------------------


def test_fan_in_scales_by_hand():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert fan_in_scales(mask).tolist() == pytest.approx([2.0, 1.0, 1.0, math.sqrt(2)])


@pytest.mark.parametrize("method", sorted(FROM_SCRATCH))
def test_each_units_kept_weights_are_scaled_to_its_fan_in(method):
    schedule, kwargs = FROM_SCRATCH[method]
    before = dense_weights(mlp())
    _, _, sparsifier = build(schedule, **kwargs)
    assert sparsifier.rescaled
    for layer in sparsifier.layers:
        kept = layer.mask.sum(dim=1, keepdim=True).float()
        expected = before[layer.name] * layer.mask * torch.sqrt(layer.mask.shape[1] / kept.clamp(min=1))
        assert torch.allclose(layer.weight, expected), layer.name


def test_convolutions_scale_by_in_channels_times_kernel_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = model[0].weight.detach().clone()
    Sparsifier(model, OneShot(sparsity=0.7, score="random"))
    mask = model[0].weight_mask
    kept = mask.flatten(1).sum(dim=1).float()  # (out,)
    factor = torch.sqrt(3 * 3 * 3 / kept).view(4, 1, 1, 1)
    assert torch.allclose(model[0].weight, before * mask * factor)


def test_gpt2_conv1d_scales_each_output_column():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 3))
    before = model[0].weight.detach().clone()
    Sparsifier(model, OneShot(sparsity=0.75, score="random"))
    mask = model[0].weight_mask  # (in, out)
    assert torch.allclose(model[0].weight, before * mask * torch.sqrt(16 / mask.sum(dim=0).float()))


def random_sparse_mlp(widths, density, seed, init):
    """Bias-free Linear layers with Kaiming normal init (gain 1 on the raw input, sqrt(2)
    after each ReLU), masked by static random masks keeping `density` of each layer."""
    torch.manual_seed(seed)
    layers = [nn.Linear(fan_in, fan_out, bias=False) for fan_in, fan_out in itertools.pairwise(widths)]
    for index, layer in enumerate(layers):
        nn.init.normal_(layer.weight, std=(1.0 if index == 0 else math.sqrt(2.0)) / math.sqrt(layer.in_features))
    model = nn.Sequential(*layers)
    Sparsifier(model, OneShot(sparsity=1.0 - density, score="random"), seed=seed, init=init)
    return model


def preactivation_second_moments(model, inputs):
    """E[z^2] of each layer's preactivations over the batch and the units that keep an input."""
    moments, z = [], inputs
    for index, layer in enumerate(model):
        z = layer(z if index == 0 else torch.relu(z))
        live = layer.weight_mask.any(dim=1)
        moments.append(z[:, live].pow(2).mean().item())
    return moments


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(density=st.floats(0.05, 0.5), widths=st.lists(st.sampled_from([256, 512, 1024]), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_rescaled_random_sparse_mlp_has_unit_variance_preactivations(density, widths, seed):
    inputs = torch.randn(2048, widths[0], generator=torch.Generator().manual_seed(seed + 1))  # not the weights' stream
    with torch.no_grad():
        rescaled = preactivation_second_moments(random_sparse_mlp(widths, density, seed, "sparse"), inputs)
        kept = preactivation_second_moments(random_sparse_mlp(widths, density, seed, "keep"), inputs)
    # the spread comes from the random weights (a unit keeps >= 12 of them here), not from the batch
    assert rescaled == pytest.approx([1.0] * 3, rel=0.25)
    assert kept[0] == pytest.approx(density, rel=0.25)  # what the dense init gives: variance shrunk by the density
    assert kept[-1] < 0.6  # and again at every layer


@pytest.mark.parametrize("method", sorted(FROM_SCRATCH))
def test_init_keep_leaves_the_weights_untouched(method):
    schedule, kwargs = FROM_SCRATCH[method]
    before = dense_weights(mlp())
    _, _, sparsifier = build(schedule, init="keep", **kwargs)
    assert not sparsifier.rescaled
    for layer in sparsifier.layers:
        assert torch.equal(layer.weight, before[layer.name] * layer.mask)


@pytest.mark.parametrize("method", sorted(STARTS_DENSE_OR_BY_MAGNITUDE))
def test_runs_that_start_dense_or_by_magnitude_are_not_rescaled(method):
    schedule, kwargs = STARTS_DENSE_OR_BY_MAGNITUDE[method]
    before = dense_weights(mlp())
    _, _, sparsifier = build(schedule, **kwargs)
    assert not sparsifier.rescaled
    for layer in sparsifier.layers:
        if sparsifier.method.soft:  # the latent weight is the trained one
            assert torch.equal(layer.weight, before[layer.name])
        else:
            assert torch.equal(layer.weight, before[layer.name] * layer.mask)


@pytest.mark.parametrize("schedule", [OneShot(), OneShot(sparsity=0.5, score="random"), RigL(sparsity=0.5, end=10)],
                         ids=["recovery", "static", "rigl"])
def test_given_masks_keep_the_trained_weights(schedule):
    model = mlp()
    with torch.no_grad():
        for module in (model[0], model[2]):
            module.weight.masked_fill_(torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5, 0)
    before = dense_weights(model)
    masks = {name: weight != 0 for name, weight in before.items()}
    _, _, sparsifier = build(schedule, model, masks=masks)
    assert not sparsifier.rescaled
    assert all(torch.equal(layer.weight, before[layer.name]) for layer in sparsifier.layers)


def test_a_resumed_run_is_not_rescaled_again_and_its_state_round_trips():
    model, opt, sparsifier = build(RigL(sparsity=0.75, end=10, every=2), distribution="erk")
    for step in range(3):
        train_step(model, opt, sparsifier, step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sparsifier.state_dict()))
    assert saved[2]["init"] == {"mode": "sparse", "rescaled": True}

    model2, opt2, sparsifier2 = build(RigL(sparsity=0.75, end=10, every=2), mlp(seed=1), distribution="erk", seed=1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sparsifier2.load_state_dict(saved[2])
    for (key, a), b in zip(saved[0].items(), model2.state_dict().values()):
        assert torch.equal(a, b), key  # the saved weights, not rescaled once more
    assert sparsifier2.rescaled and sparsifier2.state_dict()["init"] == saved[2]["init"]
    train_step(model, opt, sparsifier, 3)
    train_step(model2, opt2, sparsifier2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_the_state_tells_whether_the_saved_run_was_rescaled():
    _, _, kept = build(RigL(sparsity=0.75, end=10), init="keep")
    _, _, resumed = build(RigL(sparsity=0.75, end=10))
    resumed.load_state_dict(kept.state_dict())
    assert not resumed.rescaled


def test_an_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match=r"init must be one of \('sparse', 'keep'\)"):
        Sparsifier(mlp(), OneShot(sparsity=0.5), init="kaiming")


# ---- training FLOPs ---------------------------------------------------------------------------

# a Linear(8 -> 4) and a Linear(4 -> 2): 32 + 8 weights; 10 rows (tokens) per step
TOKENS = 10


def two_layers():
    return mlp(widths=(8, 4, 2))


def counted_steps(schedule, steps, **kwargs):
    model, opt, sparsifier = build(schedule, two_layers(), **kwargs)
    totals = []
    for step in range(steps):
        x, y = batch(step, 8, 2, size=TOKENS)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparsifier.step(tokens=TOKENS)
        opt.zero_grad()
        totals.append(sparsifier.training_flops)
    return totals, sparsifier


def test_flops_of_a_dense_step_by_hand():
    totals, _ = counted_steps(Gradual(sparsity=0.5, start=10, end=20), 2)  # dense until step 10
    per_step = TOKENS * (2 + 2 + 2) * (32 + 8)  # forward, input gradient, weight gradient
    assert totals == [per_step, 2 * per_step]


def test_flops_of_a_static_sparse_step_by_hand():
    totals, _ = counted_steps(OneShot(sparsity=0.5, score="random"), 2)  # keeps 16 + 4 weights
    assert totals == [TOKENS * 6 * (16 + 4), 2 * TOKENS * 6 * (16 + 4)]


def test_rigl_counts_the_weight_gradient_dense_at_its_update_steps():
    totals, _ = counted_steps(RigL(sparsity=0.5, end=100, every=2), 3)  # keeps 16 + 4; updates after step 2
    sparse = TOKENS * 6 * (16 + 4)
    dense_grad = TOKENS * ((2 + 2) * (16 + 4) + 2 * (32 + 8))
    assert totals == [sparse, sparse + dense_grad, 2 * sparse + dense_grad]


def test_soft_methods_count_the_latent_weight_gradient_dense():
    totals, _ = counted_steps(SRSTE(), 1, pattern="2:4")  # the forward keeps 16 + 4; straight-through is dense
    assert totals == [TOKENS * ((2 + 2) * (16 + 4) + 2 * (32 + 8))]
    totals, _ = counted_steps(ProgressiveNM(start=5, end=10), 1, pattern="2:4")  # pruned weights still weigh 1
    assert totals == [TOKENS * 6 * (32 + 8)]


def test_steps_without_tokens_count_nothing_and_the_count_is_saved():
    _, _, sparsifier = build(OneShot(sparsity=0.5, score="random"), two_layers())
    sparsifier.step()
    assert sparsifier.training_flops == 0
    sparsifier.step(tokens={"0": 1, "2": 2})
    assert sparsifier.training_flops == 6 * 16 + 2 * 6 * 4
    _, _, resumed = build(OneShot(sparsity=0.5, score="random"), two_layers())
    resumed.load_state_dict(sparsifier.state_dict())
    assert resumed.training_flops == sparsifier.training_flops


@pytest.mark.parametrize("tokens, match", [
    ({"0": 4}, r"no row count for target layers \['2'\]"),
    (-1, "must be a whole number >= 0"),
    ({"0": 1, "2": 1.5}, "tokens for layer '2' must be a whole number"),
])
def test_bad_token_counts_say_what_is_wrong(tokens, match):
    _, _, sparsifier = build(OneShot(sparsity=0.5), two_layers())
    with pytest.raises(ValueError, match=match):
        sparsifier.step(tokens=tokens)


def test_convolutions_need_their_rows_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    _, _, sparsifier = build(OneShot(sparsity=0.5), model)
    with pytest.raises(ValueError, match=r"layers \['0'\] are convolutions, whose rows are batch x output positions"):
        sparsifier.step(tokens=8)
    rows = layer_rows(model, torch.zeros(8, 1, 6, 6))
    assert rows == {"0": 8 * 16, "2": 8}
    sparsifier.step(tokens=rows)
    assert sparsifier.training_flops == 6 * (9 * 8 * 16 + 48 * 8)


def test_digits_cnn_rows_per_batch():
    assert layer_rows(DigitsCNN(), torch.zeros(64, 64)) == {"conv1": 4096, "conv2": 4096, "fc": 64, "head": 64}


def test_cli_train_demo_prints_flops_and_plots_against_them(tmp_path, capsys):
    plot = tmp_path / "flops.png"
    assert main(["train-demo", "--model", "mlp", "--methods", "dense", "static", "--steps", "4", "--init", "keep",
                 "--plot", str(plot), "--x", "flops"]) == 0
    out = capsys.readouterr().out
    dense = 4 * 64 * 6 * (64 * 256 + 256 * 256 + 256 * 10)  # every layer dense: 4 steps of 64 examples
    assert "| train FLOPs |" in out and f"| {dense:.3g} |" in out
    assert plot.stat().st_size > 1000
