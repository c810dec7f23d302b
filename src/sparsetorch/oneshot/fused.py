"""Fused elementwise steps of Llama-style blocks for calibration forwards.

Between a Llama block's matmuls, eager PyTorch makes several passes over activations too
big for cache: RMSNorm is five ops, the rotary embedding eight for q and k, the SiLU-gated
MLP a SiLU and a multiply. In a calibration forward of SmolLM2 they took about a tenth of
the time; sparsetorch's C++ kernels (`kernels/csrc/fused.h`) do each in one pass with the
same arithmetic (equal to float32 rounding, tested against transformers' own code).

Inside `fused_elementwise(model)`, for the Llama, Mistral and Qwen2 families only (whose
code these steps copy exactly): the RMSNorm and MLP modules run a fused forward (set on the
instance, so hooks on their linears still fire), and the family's `apply_rotary_pos_emb`
is swapped in its modeling module, as Liger Kernel does. Each falls back to the original
code for anything but contiguous float32 CPU tensors outside autocast. Everything is put
back on exit, even on error. Without the C++ kernels nothing changes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from torch import Tensor, nn

from sparsetorch.oneshot.overrides import instance_forward, module_global
from sparsetorch.oneshot.precision import plain_fp32_cpu

__all__ = ["FAMILIES", "fused_elementwise", "fused_ops"]

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")  # model_type: the code below copies theirs
_SILU = ("SiLU", "SiLUActivation")


def fused_ops():
    """The C++ kernels of the best ISA this CPU runs, or None without a compiler."""
    from sparsetorch.kernels.build import best_ops  # here: the kernels package imports oneshot

    return best_ops()


def _plain(*tensors: Tensor) -> bool:
    """Contiguous float32 CPU tensors, outside autocast: what the norm and gating kernels take."""
    return plain_fp32_cpu(*tensors) and all(t.is_contiguous() for t in tensors)


def _rms_norm_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    original = module.forward

    def forward(hidden_states: Tensor) -> Tensor:
        if _plain(hidden_states, module.weight):
            return fused_ops().rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return original(hidden_states)

    return forward


def _gated_mlp_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        gate, up = module.gate_proj(x), module.up_proj(x)  # the original's order: hooks see the same sequence
        hidden = fused_ops().silu_mul(gate, up) if _plain(gate, up) else module.act_fn(gate) * up
        del gate, up  # free before down_proj: a calibration batch paused at its hook would hold them
        return module.down_proj(hidden)

    return forward


def _rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
        if (
            unsqueeze_dim == 1
            and q.dim() == k.dim() == 4
            and cos.dim() == 3
            and cos.shape == sin.shape
            and cos.stride() == sin.stride()
            and cos.shape[0] in (1, q.shape[0])
            and cos.shape[1:] == q.shape[2:] == k.shape[2:]
            and q.shape[-1] % 2 == 0
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
            and plain_fp32_cpu(q, k, cos, sin)
        ):
            return fused_ops().rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


@contextmanager
def fused_elementwise(model: nn.Module) -> Iterator[None]:
    """Run `model`'s RMSNorm, rotary embedding and SiLU-gated MLP through fused kernels
    inside the context, if it is a Llama, Mistral or Qwen2 model; otherwise do nothing."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES or fused_ops() is None:
        yield
        return
    prefix = family.capitalize()  # LlamaRMSNorm, MistralMLP, Qwen2RMSNorm, ...
    with ExitStack() as stack:
        for module in model.modules():
            kind = type(module).__name__
            if kind == f"{prefix}RMSNorm" and hasattr(module, "variance_epsilon"):
                stack.enter_context(instance_forward(module, _rms_norm_forward(module)))
            elif kind == f"{prefix}MLP" and type(getattr(module, "act_fn", None)).__name__ in _SILU:
                stack.enter_context(instance_forward(module, _gated_mlp_forward(module)))
        modeling = sys.modules.get(f"transformers.models.{family}.modeling_{family}")
        if modeling is not None and hasattr(modeling, "apply_rotary_pos_emb"):
            stack.enter_context(
                module_global(modeling, "apply_rotary_pos_emb", _rotary(modeling.apply_rotary_pos_emb))
            )
        yield
