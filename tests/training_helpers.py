"""Shared pieces of the sparse-training tests: tiny models, batches, one training step."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from sparsetorch.patterns import NM, Block, Pattern, Unstructured, prune_count

OPTIMIZERS = {
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


class Conv1D(nn.Module):
    """GPT-2's layer: weight stored as (in, out), so a unit's fan-in is a column."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def mlp(seed: int = 0, widths: tuple[int, ...] = (16, 24, 8)) -> nn.Sequential:
    """Linear layers with ReLUs between; input width widths[0], `widths[-1]` outputs."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(step: int, inputs: int = 16, classes: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch per step index, the same in every run."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, inputs, generator=generator), torch.randint(0, classes, (size,), generator=generator)


def train_step(model: nn.Module, optimizer, sparsifier, step: int) -> float:
    """backward, optimizer.step, sparsifier.step, zero_grad: the documented order."""
    x, y = batch(step, model[0].in_features, model[-1].out_features)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    sparsifier.step()
    optimizer.zero_grad()
    return loss.item()


def expected_pruned(pattern: Pattern, shape: tuple[int, ...], sparsity: float) -> int:
    """The count a pattern promises for an (out, in, ...) weight, worked out here independently."""
    numel = torch.Size(shape).numel()
    if isinstance(pattern, NM):
        return numel // pattern.m * (pattern.m - pattern.n)
    if isinstance(pattern, Block):
        return prune_count(numel // (pattern.height * pattern.width), sparsity) * pattern.height * pattern.width
    if isinstance(pattern, Unstructured) and pattern.per_row:
        return numel // shape[1] * prune_count(shape[1], sparsity)
    return prune_count(numel, sparsity)
