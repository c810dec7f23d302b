"""The precision of calibration: optionally, statistics forwards in bfloat16 where the hardware is fast at it.

The calibration forwards of the block pipeline are almost all of one-shot pruning's
time, and almost all of that is matmuls. On a CPU with bf16 dot-product instructions
(and on CUDA) a bf16 matmul runs about twice as fast as an fp32 one. With
`calib_dtype='bfloat16'` (or 'auto' on such hardware) the forwards of the still-dense
block, which only gather statistics, run under bf16 autocast: matmuls and attention in
bf16; norms, residual sums and the statistics' sums in fp32.

Only those. The forward of the pruned block, which makes the next block's inputs, stays
in the model's dtype, and so do the solvers (`full_precision`). Measured on SmolLM2-135M
(benchmarks/RESULTS.md): with bf16 statistics, Wanda and SparseGPT at 50% and 2:4 all
stayed within +1% of llm-compressor's perplexity (against our own fp32 runs: -0.9% to
+4.1%, the most for SparseGPT 2:4, which rounding-level changes alone move that much);
bf16 also in the forwards that feed the next block cost Wanda 2:4 4.6%, since that
rounding compounds over 30 blocks.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["CALIB_DTYPES", "calibration_dtype", "calibration_precision", "full_precision"]

# 'model': the model's own dtype (the default); 'bfloat16': bf16 autocast whatever the
# hardware; 'auto': bf16 only where the hardware multiplies it natively.
CALIB_DTYPES: tuple[str, ...] = ("model", "bfloat16", "auto")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def calibration_dtype(model: nn.Module, choice: str = "model") -> torch.dtype:
    """The dtype the calibration matmuls of `model` will run in for `choice`.

    Example:
        >>> calibration_dtype(model, "auto")  # fp32 model on a Zen 4 CPU
        torch.bfloat16
    """
    if choice not in CALIB_DTYPES:
        raise ValueError(f"calib_dtype must be one of {list(CALIB_DTYPES)}, got {choice!r}")
    device, dtype = _device_and_dtype(model)
    if dtype != torch.float32 or choice == "model":
        return dtype
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else dtype
    from sparsetorch.kernels.cpu_features import has_native_bf16  # here: the kernels package imports oneshot

    return torch.bfloat16 if device.type == "cpu" and has_native_bf16() else dtype


def calibration_precision(model: nn.Module, choice: str = "model"):
    """A context for the statistics forwards of `model`: bf16 autocast, or nothing."""
    device, dtype = _device_and_dtype(model)
    target = calibration_dtype(model, choice)
    if target == dtype:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=target)


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: solvers run in the weights' own dtype even inside a calibration forward."""
    return torch.autocast(device_type=device.type, enabled=False)
