"""OWL's statistic: each decoder block's outlier ratio of Wanda scores, from a dense pass of the model.

The OWL paper measures it on the dense model, block after block, each block fed the dense outputs
of the block before; so this pass runs before any pruning, and costs one dense forward per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from sparsetorch.allocate import outlier_ratio
from sparsetorch.oneshot.calibrate import input_of, pre_hooks
from sparsetorch.oneshot.capture import BlockBatches
from sparsetorch.oneshot.stats import InputSqNorms
from sparsetorch.scores import wanda_scores
from sparsetorch.targets import weight_matrix

if TYPE_CHECKING:
    from sparsetorch.oneshot.pipeline import BlockStore

__all__ = ["block_outlier_ratios"]


def block_outlier_ratios(batches: BlockBatches, blocks: nn.ModuleList, targets: set[nn.Module], m: float,
                         store: BlockStore | None = None) -> list[float]:
    """Per block, the fraction of its target layers' |W|·‖X‖ above `m` times their mean (blocks without
    targets: 0). With `store` (a streamed model) each block is loaded for its turn and unloaded after."""
    hidden: list[Tensor] = batches.hidden
    ratios = []
    for index, block in enumerate(blocks):
        if store is not None:
            store.load(index, block)
        inside = [module for module in block.modules() if module in targets]
        norms = {module: InputSqNorms(weight_matrix(module).shape[1]) for module in inside}

        def add(module: nn.Module, args: tuple, kwargs: dict, norms: dict = norms) -> None:
            norms[module].add_batch(input_of(args, kwargs))

        with pre_hooks(set(inside), add):
            hidden = [forward() for forward in batches.forwards(block, hidden)]
        scores = [wanda_scores(weight_matrix(module), norms[module].value) for module in inside]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        del scores
        if store is not None:
            store.unload(index, block)
    return ratios
