import pytest
import torch
from torch import nn

from sparsetorch.training import OneShot, Sparsifier, average, greedy_soup
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


def scalars(*weights: float) -> list[nn.Linear]:
    """One-weight models, so soups can be checked by hand."""
    models = [nn.Linear(1, 1, bias=False) for _ in weights]
    for model, weight in zip(models, weights):
        nn.init.constant_(model.weight, weight)
    return models


def squared_distance_to(target: float):
    return lambda model: (model.weight.item() - target) ** 2


def test_greedy_soup_adds_models_best_first_when_the_held_out_loss_improves():
    # losses 0.16, 0.25, 5.76; {0, 1} averages to 0.55 (0.0025); adding 2 gives 1.367 (0.588): left out
    soup = greedy_soup(scalars(1.0, 0.1, 3.0), squared_distance_to(0.6))
    assert soup.chosen == (0, 1)
    assert soup.losses == pytest.approx((0.16, 0.25, 5.76))
    assert soup.loss == pytest.approx(0.0025)
    assert soup.model.weight.item() == pytest.approx(0.55)


def test_greedy_soup_skips_a_model_that_does_not_help_and_tries_the_next():
    # ranked 0 (1.0), 1 (1.44), 2 (2.25): 0+1 averages to 1.1 (1.21, worse), 0+2 to -0.25 (0.0625, better)
    models = scalars(1.0, 1.2, -1.5)
    soup = greedy_soup(models, squared_distance_to(0.0))
    assert soup.chosen == (0, 2)
    assert soup.model.weight.item() == pytest.approx(-0.25)
    assert [m.weight.item() for m in models] == pytest.approx([1.0, 1.2, -1.5])  # inputs unchanged


def test_a_greedy_soup_of_one_model_is_a_copy_of_it():
    model = scalars(2.0)[0]
    soup = greedy_soup([model], squared_distance_to(0.0))
    assert soup.chosen == (0,) and soup.loss == pytest.approx(4.0)
    assert soup.model is not model and soup.model.weight.item() == 2.0


def test_greedy_soup_of_sparse_models_keeps_the_shared_mask():
    models = [fine_tuned(0, seed) for seed in (1, 2, 3)]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    soup = greedy_soup(models, lambda model: model(x).pow(2).mean().item())
    assert soup.loss <= min(soup.losses)
    assert torch.equal(soup.model[0].weight_mask, models[0][0].weight_mask)
    assert (soup.model[0].weight[~soup.model[0].weight_mask] == 0).all()


def test_greedy_soup_refuses_models_with_different_masks():
    with pytest.raises(ValueError, match=r"cannot average: 0.weight_mask differs between model 0 and model 1"):
        greedy_soup([fine_tuned(0, 1), fine_tuned(5, 2)], lambda model: 0.0)
