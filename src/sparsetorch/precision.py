"""Precision choices: bf16 statistics forwards where asked, full precision for solvers, and the
float32-CPU test that the C++ fast paths share.

The calibration forwards of the block pipeline are almost all of one-shot pruning's time, and
almost all of that is matmuls, which run about twice as fast in bf16 as in fp32 on CPUs with
bf16 dot-product instructions (and on CUDA). With `calib_dtype='bfloat16'` (or 'auto' on such
hardware) the forwards of the still-dense block, which only gather statistics, run under bf16
autocast: matmuls and attention in bf16; norms, residual sums and the statistics' sums in fp32.

Only those. The forward of the pruned block, which makes the next block's inputs, stays in the
model's dtype, and so do the solvers (`full_precision`). bf16 statistics make the result fragile:
a float32-rounding change of a block's inputs flips some bf16 roundings of its activations, hence
some near-tied 2:4 choices, and that compounds over the blocks (measured in
benchmarks/RESULTS.md). So the default is 'model'; bf16 is for hardware whose bf16 matmuls are
far faster than its fp32 ones (AMX, GPUs).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from sparsetorch.kernels.cpu_features import has_native_bf16

__all__ = ["CALIB_DTYPES", "calibration_dtype", "calibration_precision", "full_precision", "plain_fp32_cpu"]

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


def plain_fp32_cpu(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors outside CPU autocast: what the C++ fast paths take (each adds its own
    layout conditions)."""
    return not torch.is_autocast_enabled("cpu") and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors
    )
