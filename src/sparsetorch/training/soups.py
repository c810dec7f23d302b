"""Sparse model soups: average models that share one mask (Zimmer et al., 2024).

Models fine-tuned from the same sparse model (different seeds, data orders or
hyperparameters) keep its mask, so their uniform average is exactly as sparse. Models
with different masks would average into a denser model, so they are refused.

`average` is the uniform soup; `greedy_soup` adds models best first while a held-out loss
improves (Wortsman et al., 2022), which Zimmer et al. find the stronger of the two.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsetorch.training.method import MASK
from sparsetorch.training.sparsifier import is_sparse_trainable

__all__ = ["GreedySoup", "average", "greedy_soup", "shared_masks"]


def _masks(model: nn.Module) -> dict[str, Tensor]:
    """Mask buffers where the model has them, else the nonzero pattern of sparse-trainable weights."""
    buffers = {name: buffer for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] == MASK}
    if buffers:
        return buffers
    return {f"{name}.weight": module.weight != 0 for name, module in model.named_modules() if is_sparse_trainable(module)}


def shared_masks(models: Sequence[nn.Module]) -> dict[str, Tensor]:
    """The one mask set all `models` share.

    Masks are the `weight_mask` buffers a Sparsifier leaves, or (after `finalize()`) the
    nonzero patterns of the Linear / Conv weights.

    Raises:
        ValueError: fewer than one model, or two models whose masks differ (naming the layer).
    """
    if not models:
        raise ValueError("average needs at least one model")
    first = _masks(models[0])
    for index, model in enumerate(models[1:], start=1):
        other = _masks(model)
        if other.keys() != first.keys():
            raise ValueError(f"model {index} has masks for other layers than model 0; soups need models of one architecture")
        for name, mask in first.items():
            if other[name].shape != mask.shape or not torch.equal(other[name], mask):
                differ = int((other[name] != mask).sum()) if other[name].shape == mask.shape else "all"
                raise ValueError(
                    f"cannot average: {name} differs between model 0 and model {index} ({differ} entries); "
                    "a sparse soup needs models fine-tuned from one shared mask"
                )
    return first


def average(models: Sequence[nn.Module]) -> nn.Module:
    """Uniform soup: a copy of the first model holding the mean of every floating-point
    parameter and buffer of `models` (integer and boolean ones, such as masks and step
    counters, come from the first model).

    Args:
        models: models of one architecture sharing one mask.

    Returns:
        A new model; the inputs are not changed.

    Raises:
        ValueError: the models do not share their masks, or their state dicts differ in keys.

    Example:
        >>> soup = average([model_a, model_b, model_c])
    """
    shared_masks(models)
    states = [model.state_dict() for model in models]
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != states[0].keys():
            raise ValueError(f"model {index} has other state-dict keys than model 0; soups need one architecture")
    averaged = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            averaged[key] = torch.stack([state[key].float() for state in states]).mean(dim=0).to(value.dtype)
        else:
            averaged[key] = value.clone()
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(averaged)
    return soup


@dataclass(frozen=True)
class GreedySoup:
    """What `greedy_soup` chose.

    Attributes:
        model: the soup, a new model.
        chosen: indices into the given models, in the order they were added.
        losses: each given model's held-out loss.
        loss: the soup's held-out loss.
    """

    model: nn.Module
    chosen: tuple[int, ...]
    losses: tuple[float, ...]
    loss: float


def greedy_soup(models: Sequence[nn.Module], held_out_loss: Callable[[nn.Module], float]) -> GreedySoup:
    """Greedy soup: rank the models by held-out loss, start from the best, and add each next
    one if the average with it has a strictly lower held-out loss than the soup so far.

    The held-out data must not be the data the soup is tested on: it picks the models.

    Args:
        models: models of one architecture sharing one mask.
        held_out_loss: model -> its loss on the held-out (validation) data.

    Returns:
        The soup, the chosen indices, every model's loss and the soup's loss.

    Raises:
        ValueError: no models, or models that do not share their masks.

    Example:
        >>> soup = greedy_soup([model_a, model_b, model_c], lambda m: loss_fn(m, val_x, val_y))
        >>> soup.chosen, soup.loss
        ((1, 0), 0.412)
    """
    shared_masks(models)
    losses = tuple(held_out_loss(model) for model in models)
    first, *rest = sorted(range(len(models)), key=losses.__getitem__)
    chosen, soup, best = [first], average([models[first]]), losses[first]
    for index in rest:
        candidate = average([models[i] for i in (*chosen, index)])
        loss = held_out_loss(candidate)
        if loss < best:
            chosen, soup, best = [*chosen, index], candidate, loss
    return GreedySoup(soup, tuple(chosen), losses, best)
