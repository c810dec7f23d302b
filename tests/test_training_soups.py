import pytest
import torch

from sparsetorch.training import OneShot, Sparsifier, average
from training_helpers import OPTIMIZERS, mlp, train_step


def fine_tuned(masks_from: int, seed: int, finalize: bool = False):
    """A model pruned from `mlp(masks_from)`, then trained a few steps with its own seed."""
    model = mlp(masks_from)
    opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
    sparsifier = Sparsifier(model, OneShot(sparsity=0.6), optimizer=opt)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))  # as if seeds differed
    sparsifier.step()
    for step in range(2):
        train_step(model, opt, sparsifier, step + seed)
    if finalize:
        sparsifier.finalize()
    return model


def test_a_soup_is_the_mean_and_keeps_the_shared_mask():
    models = [fine_tuned(0, seed) for seed in (1, 2, 3)]
    soup = average(models)
    for key, value in soup.state_dict().items():
        if value.dtype == torch.bool:
            assert torch.equal(value, models[0].state_dict()[key])
        else:
            assert torch.allclose(value, sum(m.state_dict()[key] for m in models) / 3)
    assert (soup[0].weight[~soup[0].weight_mask] == 0).all()
    assert soup is not models[0] and not torch.equal(soup[0].weight, models[0][0].weight)


def test_finalized_models_are_compared_by_their_zeros():
    soup = average([fine_tuned(0, seed, finalize=True) for seed in (1, 2)])
    assert "0.weight_mask" not in soup.state_dict()


@pytest.mark.parametrize("finalize", [False, True])
def test_models_with_different_masks_are_refused(finalize):
    with pytest.raises(ValueError, match=r"cannot average: 0.weight(_mask)? differs between model 0 and model 1 \(\d+ entries\)"):
        average([fine_tuned(0, 1, finalize), fine_tuned(5, 2, finalize)])


def test_an_empty_soup_is_refused():
    with pytest.raises(ValueError, match="at least one model"):
        average([])
