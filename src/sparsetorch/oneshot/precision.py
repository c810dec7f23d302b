"""The precision of calibration: optionally, statistics forwards in bfloat16 where the hardware is fast at it.

The calibration forwards of the block pipeline are almost all of one-shot pruning's
time, and almost all of that is matmuls. On a CPU with bf16 dot-product instructions
(and on CUDA) a bf16 matmul runs about twice as fast as an fp32 one. With
`calib_dtype='bfloat16'` (or 'auto' on such hardware) the forwards of the still-dense
block, which only gather statistics, run under bf16 autocast: matmuls and attention in
bf16; norms, residual sums and the statistics' sums in fp32.

Only those. The forward of the pruned block, which makes the next block's inputs, stays
in the model's dtype, and so do the solvers (`full_precision`). bf16 statistics make the
result fragile, though. Measured on SmolLM2-135M, Wanda 2:4 with layer_inputs='mixed'
(benchmarks/RESULTS.md): with fp32 statistics 142.277 perplexity, and 142.202 both after
the calibration attention changed to sparsetorch's kernel (a float32-rounding change) and
with the calibration windows in another order; with bf16 statistics 142.466 before that
change, 141.801 after it, and 145.021 with a third attention (chunked SDPA). A 1e-7 change
of a block's inputs flips some bf16 roundings of the activations, hence some near-tied 2:4
choices, and that compounds over 30 blocks. On this 2-core CPU, once calibration attention
skips its masked half, bf16 statistics no longer save time either ('mixed': 65.8 s against
66.5 s in fp32), so the default stays 'model'; bf16 is for hardware where its matmuls are
far faster than fp32 ones (AMX, GPUs).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

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


def plain_fp32_cpu(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors outside CPU autocast: what the calibration forwards' C++ kernels take
    (each kernel adds its own layout conditions)."""
    return not torch.is_autocast_enabled("cpu") and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors
    )
