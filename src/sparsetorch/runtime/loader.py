"""Build a pruned model straight from its compressed directory, sparse layers never dense.

The model skeleton is created on the meta device (no memory, no values); each stored sparse-bitmask weight
is read, checked, and turned into the SparseLinear that `decide_layer` picks, or (where dense
measured faster, or the layer is too dense) into that one layer's dense weight. A quantized
weight becomes a SparseLinear holding its codes (its kernels are chosen by structure and value
type, `QuantizedTensor.kernel_format`; a 4-bit bitmask weight whose mask is 2:4 moves to the 2:4
structure, whose kernels are faster at the same bytes), or its dequantized weight where it is no
Linear (an embedding) or other parameters are tied to it. Tensors are
read and decoded one at a time, so peak memory is the sparse model plus one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.bitmask import BITMASK_KEYS, BitmaskTensor
from sparsetorch.formats.checkpoint import COMPRESSED_DIR, CompressedReader, CorruptFileError, open_compressed
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.formats.quantized_layers import record_dtype
from sparsetorch.malloc import give_back_free_memory
from sparsetorch.nn import SparseLinear
from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.decide import DENSE, LayerDecision, TimingCache, decide_layer
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import MedianTimer, Timer
from sparsetorch.targets import is_conv1d

__all__ = ["assign_weights", "load_sparse_model"]


def _skeleton(directory: Path) -> nn.Module:
    """The model of `directory/config.json`, every tensor on the meta device (no memory, no values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _computed_buffers(model: nn.Module) -> None:
    """Give real values to buffers no file stores (rotary frequencies, Gemma's embedding scale), as
    transformers does: an empty CPU tensor, then the model's own `_init_weights` on the module owning it.
    Run before any weight is assigned: `_init_weights` then initializes only meta parameters, a no-op."""
    owners = {}
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if not hasattr(model, "_init_weights") or any(not p.is_meta for p in owner.parameters(recurse=False)):
                raise NotImplementedError(f"sparsetorch cannot compute buffer {name}; load this model with load_pruned")
            setattr(owner, leaf, torch.empty_like(buffer, device="cpu"))
            owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)


def _read_bitmask(reader: CompressedReader, prefix: str) -> BitmaskTensor:
    parts = {key: reader.tensor(f"{prefix}.{key}") for key in BITMASK_KEYS}
    try:
        return BitmaskTensor.from_parts(parts, prefix)
    except CorruptTensorError as err:
        raise CorruptFileError(f"{reader.path}: {err}") from None


def _as_out_in(module: nn.Module, stored: BitmaskTensor) -> tuple[Tensor, Tensor]:
    """The stored weight's keep-mask and kept values as an (out, in) matrix's, as SparseLinear takes them;
    GPT-2's Conv1D stores its weight transposed."""
    if not is_conv1d(module):
        return stored.mask(), stored.values
    dense = stored.to_dense().t().contiguous()
    mask = stored.mask().t().contiguous()
    return mask, dense[mask]


def assign_weights(model: nn.Module, state: dict[str, Tensor], tied: dict[str, str], directory: Path) -> None:
    """Fill a meta-device skeleton with `state` (tensors taken as they are, no copy), tie its weights
    (`tied`: alias -> stored name) and compute the buffers no file stores.

    Raises:
        CorruptFileError: a parameter got no weight: the file does not match config.json.
    """
    _computed_buffers(model)  # first, while the parameters are still on the meta device
    for alias, name in tied.items():
        if name in state:
            state.setdefault(alias, state[name])
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise CorruptFileError(f"{directory}: no weights stored for {empty[:5]}; the file does not match config.json")


def load_sparse_model(directory: str | Path, config: RuntimeConfig | None = None, timer: Timer | None = None,
                      skeleton: Callable[[Path], nn.Module] = _skeleton) -> tuple[nn.Module, CompileReport]:
    """A pruned model from `directory` (a `sparsetorch prune` output or its `compressed/`), with
    its sparse layers as SparseLinear built from the stored bitmasks, no dense copy on the way.

    Args:
        config: as for `runtime.compile`; policy 'always' turns every stored sparse layer into a
            SparseLinear; 'measure' (default) keeps a layer dense where dense measured faster.
        timer: as for `runtime.compile`.
        skeleton: builds the model of a directory's config.json on the meta device; the default is
            transformers' (`AutoModelForCausalLM`), `runtime.lean.lean_skeleton` (sparsetorch.models.llama) needs no transformers.

    Returns:
        (the model in eval mode, the CompileReport of its layers).

    Raises:
        FileNotFoundError: no compressed weights in `directory`.
        CorruptFileError: checksums, tensors or config do not agree.

    Example:
        >>> model, report = load_sparse_model("pruned/smollm2-70")
    """
    directory = Path(directory)
    inner = directory / COMPRESSED_DIR if (directory / COMPRESSED_DIR).is_dir() else directory
    config = config or RuntimeConfig()
    with open_compressed(inner) as reader:
        model = skeleton(inner)
        decisions, state, used = _sparse_layers(model, reader, config, timer)
        state.update({key: reader.tensor(key) for key in reader.keys() if key not in used})
        assign_weights(model, state, reader.tied, inner)
        decisions += _quantized_aliases(model, reader, config)
    return model.eval(), CompileReport(tuple(decisions), config)


def _quantized_aliases(model: nn.Module, reader: CompressedReader, config: RuntimeConfig) -> list[LayerDecision]:
    """Bias-free Linears tied to a stored quantized weight (a tied lm_head over the int8 input embedding)
    run on its codes too. The weight itself stays dense for its own module (an embedding looks rows up);
    the Linear reads the whole matrix every step, which in a small model is a large share of all weight
    traffic. Run after the weights are tied: the alias gets its own module, no parameter is shared."""
    decisions = []
    for alias, name in reader.tied.items():
        prefix, alias_prefix = name.removesuffix(".weight"), alias.removesuffix(".weight")
        if prefix not in reader.quantized or alias == alias_prefix:
            continue
        module = model.get_submodule(alias_prefix)
        if type(module) is not nn.Linear or module.bias is not None:
            continue
        stored = reader.quantized_weight(prefix)
        model.set_submodule(alias_prefix, SparseLinear(stored, None, config.backend))
        decisions.append(LayerDecision(alias_prefix, stored.shape, stored.density, stored.kernel_format,
                                       reason=f"tied to {prefix}: runs on its codes"))
    return decisions


def _sparse_layers(model: nn.Module, reader: CompressedReader, config: RuntimeConfig,
                   timer: Timer | None) -> tuple[list, dict[str, Tensor], set[str]]:
    """Decide and build every stored sparse layer (quantized ones first: they run on their codes),
    while the dense tensors are not yet read (so the timer's cache-flush buffer never adds to the
    peak memory of the loaded model).

    Returns:
        (decisions, dense weights of the layers that stay dense, the keys consumed).
    """
    cache = TimingCache(timer or MedianTimer()) if config.policy == "measure" else None
    keys = reader.keys()
    decisions, state, used = _quantized_layers(model, reader, config)
    prefixes = [key.removesuffix(".bitmask") for key in keys if key.endswith(".bitmask")
                and key.removesuffix(".bitmask") not in reader.quantized]
    used |= {f"{prefix}.{part}" for prefix in prefixes for part in BITMASK_KEYS}
    shared = set(reader.tied.values())  # weights other parameters are tied to stay tensors
    for prefix in prefixes:
        stored = _read_bitmask(reader, prefix)
        if f"{prefix}.weight" in shared:
            mask = stored.mask()
            decision, weight = LayerDecision(prefix, tuple(mask.shape), float(mask.float().mean()), DENSE,
                                             reason="tied to another parameter"), None
        else:
            mask, values = _as_out_in(model.get_submodule(prefix), stored)
            decision, weight = decide_layer(prefix, mask, values, config, cache)
        if weight is None:
            state[f"{prefix}.weight"] = stored.to_dense()
        else:
            bias_key = f"{prefix}.bias"
            bias = reader.tensor(bias_key) if bias_key in keys else None
            used.add(bias_key)
            model.set_submodule(prefix, SparseLinear(weight, bias, config.backend))
        decisions.append(decision)
        give_back_free_memory()  # a layer's decoding temporaries: several times the model's size over a load
    return decisions, state, used


def _quantized_layers(model: nn.Module, reader: CompressedReader,
                      config: RuntimeConfig) -> tuple[list, dict[str, Tensor], set[str]]:
    """Every stored quantized weight as a SparseLinear over its codes, or as its dequantized weight
    where that module is no plain Linear or other parameters share it.

    Returns:
        (decisions, dequantized weights, the keys consumed).
    """
    decisions, state, used = [], {}, reader.quantized_keys()
    shared = set(reader.tied.values())
    for prefix, record in reader.quantized.items():
        stored = reader.quantized_weight(prefix)
        module = model.get_submodule(prefix)
        as_linear = isinstance(module, nn.Linear) and f"{prefix}.weight" not in shared
        if as_linear:
            bias_key = f"{prefix}.bias"
            bias = reader.tensor(bias_key) if bias_key in reader.keys() else None
            used.add(bias_key)
            stored, reason = _as_2_4(stored)
            model.set_submodule(prefix, SparseLinear(stored, bias, config.backend))
        else:
            state[f"{prefix}.weight"] = stored.to_dense().to(record_dtype(record))
            reason = "tied to another parameter" if isinstance(module, nn.Linear) else "not a Linear"
        chosen = stored.kernel_format if as_linear else DENSE
        decisions.append(LayerDecision(prefix, stored.shape, stored.density, chosen, reason=reason))
    return decisions, state, used


def _as_2_4(stored: QuantizedTensor) -> tuple[QuantizedTensor, str]:
    """A 4-bit weight stored as a bitmask whose mask is 2:4 (what `sparsetorch prune --pattern 2:4`
    writes) in the 2:4 structure, whose kernel selects columns by 2-bit indices instead of expanding
    codes by mask bits: the same bytes per weight, less work per call (benchmarks/RESULTS.md, CPU decode).
    Returns the weight to run and the reason for the report."""
    if stored.structure != "bitmask" or stored.scheme.bits != 4:
        return stored, "quantized weights run quantized"
    try:
        return stored.restructured("nm", 2, 4), "quantized weights run quantized (2:4 mask: the 2:4 kernels)"
    except ValueError:  # not 2:4, or a grid with zero points
        return stored, "quantized weights run quantized"
