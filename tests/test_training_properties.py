"""Properties every sparse-training method keeps, checked by hypothesis on tiny MLPs:
exact sparsity after every step, pruned weights that stay zero under momentum and weight
decay, and a state_dict round trip that resumes bit-identically."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsetorch.patterns import prune_count
from sparsetorch.training import SET, SRSTE, Gradual, Iterative, OneShot, ProgressiveNM, RigL, Sparsifier, SRigL
from training_helpers import OPTIMIZERS, expected_pruned, mlp, train_step

# name -> (schedule builder from sparsity, Sparsifier keyword arguments)
METHODS = {
    "oneshot": (lambda s: OneShot(sparsity=s), {}),
    "oneshot-random-late": (lambda s: OneShot(sparsity=s, at=2, score="random"), {"distribution": "erk"}),
    "gradual": (lambda s: Gradual(sparsity=s, start=1, end=7, every=2), {}),
    "gradual-block": (lambda s: Gradual(sparsity=s, start=0, end=4, every=1), {"pattern": "block-2x2"}),
    "iterative": (lambda s: Iterative(sparsity=s, rounds=2, round_steps=3, rewind=1), {}),
    "set": (lambda s: SET(sparsity=s, end=9, every=2), {"distribution": "er"}),
    "rigl": (lambda s: RigL(sparsity=s, end=9, every=2), {"distribution": "erk"}),
    "rigl-summed-grads": (lambda s: RigL(sparsity=s, end=9, every=3, grad_steps=2), {"distribution": "erk"}),
    "rigl-row": (lambda s: RigL(sparsity=s, end=9, every=2), {"pattern": "unstructured-row"}),
    "srigl": (lambda s: SRigL(sparsity=s, end=9, every=2, gamma=0.6), {}),
    "srste": (lambda s: SRSTE(), {"pattern": "2:4"}),
    "progressive-nm": (lambda s: ProgressiveNM(end=5), {"pattern": "1:4"}),
}

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sparsities = st.floats(0.05, 0.95)
optimizers = st.sampled_from(sorted(OPTIMIZERS))


def build(method: str, sparsity: float, optimizer: str, seed: int = 0):
    model = mlp(seed)
    opt = OPTIMIZERS[optimizer](model.parameters())
    schedule, kwargs = METHODS[method]
    return model, opt, Sparsifier(model, schedule(sparsity), optimizer=opt, seed=seed, **kwargs)


def check_exact(sparsifier: Sparsifier) -> None:
    scheduled = sparsifier.scheduled_sparsity()
    for layer in sparsifier.layers:
        pruned = int((~layer.mask).sum())
        if type(sparsifier.schedule) is SRigL:  # constant fan-in per neuron: count per row of the (out, fan-in) view
            rows, cols = layer.mask.shape[0], layer.mask[0].numel()
            assert pruned == rows * prune_count(cols, layer.final)
        else:
            assert pruned == expected_pruned(sparsifier.pattern, tuple(layer.mask.shape), scheduled[layer.name]), layer.name


def check_pruned_are_zero(sparsifier: Sparsifier, optimizer) -> None:
    for layer in sparsifier.layers:
        pruned = ~layer.mask
        effective = layer.module.weight
        if sparsifier.method.soft:
            scale = float(layer.module.weight_mask_scale[0])
            assert torch.equal(effective[pruned], scale * layer.weight.detach()[pruned])
            continue
        assert (effective[pruned] == 0).all() and not torch.signbit(effective[pruned]).any()
        for value in optimizer.state.get(layer.weight, {}).values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert (value[pruned] == 0).all(), "optimizer state of a pruned weight survived"


@pytest.mark.parametrize("method", sorted(METHODS))
@SETTINGS
@given(sparsity=sparsities, optimizer=optimizers, steps=st.integers(1, 11))
def test_every_step_keeps_the_exact_scheduled_sparsity_and_pruned_weights_at_zero(method, sparsity, optimizer, steps):
    model, opt, sparsifier = build(method, sparsity, optimizer)
    check_exact(sparsifier)
    for step in range(steps):
        train_step(model, opt, sparsifier, step)
        check_exact(sparsifier)
        check_pruned_are_zero(sparsifier, opt)


@pytest.mark.parametrize("method", sorted(METHODS))
@SETTINGS
@given(sparsity=sparsities, optimizer=optimizers, before=st.integers(0, 6), after=st.integers(1, 5))
def test_state_dict_round_trip_resumes_bit_identically(method, sparsity, optimizer, before, after):
    model, opt, sparsifier = build(method, sparsity, optimizer)
    for step in range(before):
        train_step(model, opt, sparsifier, step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sparsifier.state_dict()))
    for step in range(before, before + after):
        train_step(model, opt, sparsifier, step)

    model2, opt2, sparsifier2 = build(method, sparsity, optimizer, seed=1)  # other initial weights and masks
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sparsifier2.load_state_dict(saved[2])
    for step in range(before, before + after):
        train_step(model2, opt2, sparsifier2, step)

    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), key
    assert sparsifier2.step_count == sparsifier.step_count


@pytest.mark.parametrize("method", sorted(METHODS))
def test_masks_are_module_buffers_saved_in_the_state_dict(method):
    model, _, sparsifier = build(method, 0.5, "adamw")
    state = model.state_dict()
    for layer in sparsifier.layers:
        assert torch.equal(state[f"{layer.name}.weight_mask"], layer.mask)
