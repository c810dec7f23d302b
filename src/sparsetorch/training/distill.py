"""The losses of sparse distillation: a pruned student matched to its dense teacher.

Kurtic et al. ("Sparse Fine-tuning for Inference Acceleration of LLMs", 2023) recover a pruned
LLM with two terms that plain fine-tuning lacks:
- logit distillation, KL(teacher || student) on the next-token distributions;
- SquareHead feature distillation: each decoder block's output matched to the teacher's under a
  normalized MSE, ||s - t||^2 / ||t||^2, so every block gets a loss of the same scale whatever
  the size of its activations (deep blocks of LLMs carry far larger hidden states).

Each loss is a pure function of tensors; `block_outputs` is the one place that hooks into a
model, and it always removes its hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["block_outputs", "feature_loss", "kl_to_teacher", "lm_loss", "normalized_mse"]


def kl_to_teacher(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softened next-token distributions, mean over tokens, times T².

    The T² factor (Hinton et al., 2015) keeps the gradient's scale independent of the temperature.

    Args:
        student: logits (..., vocab).
        teacher: logits of the same shape.
        temperature: T > 0; both logits are divided by it before the softmax.

    Returns:
        A scalar in fp32; 0 exactly when the logits agree up to a per-token shift.

    Example:
        >>> kl_to_teacher(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(0.)
    """
    vocab = student.shape[-1]
    log_student = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)  # (tokens, vocab)
    log_teacher = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def normalized_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """SquareHead's ||s - t||² / ||t||², over the whole tensor, in fp32.

    Example:
        >>> normalized_mse(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]))
        tensor(0.5000)
    """
    student, teacher = student.float(), teacher.float()
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def feature_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """The mean over blocks of `normalized_mse` between matching block outputs.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the outputs of the same blocks of both models, got {len(student)} and {len(teacher)}")
    return torch.stack([normalized_mse(s, t) for s, t in zip(student, teacher)]).mean()


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of logits (B, T, vocab) on the ids (B, T) they were computed from."""
    predicted = logits[:, :-1].float()  # (B, T-1, vocab): position t predicts token t+1
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids[:, 1:].reshape(-1))


class _Recorder:
    """Forward hook: append the block's hidden-state output (the first item of a tuple output)."""

    def __init__(self, into: list[Tensor]) -> None:
        self.into = into

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        self.into.append(output[0] if isinstance(output, (tuple, list)) else output)


@contextmanager
def block_outputs(blocks: nn.ModuleList) -> Iterator[list[Tensor]]:
    """Record every block's output during the forwards run inside the context.

    Yields a list that each forward fills with one (B, T, hidden) tensor per block, in block
    order; clear it between forwards. The hooks are removed when the context ends, on error too.

    Example:
        >>> with block_outputs(find_blocks(model)) as hidden:
        ...     model(input_ids=ids)
        >>> len(hidden) == len(find_blocks(model))
        True
    """
    recorded: list[Tensor] = []
    handles = [block.register_forward_hook(_Recorder(recorded)) for block in blocks]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
