"""Which layers of a compressed directory are quantized, how, and what compressed-tensors is told.

`write_compressed` stores each module named in its `grids` as a `QuantizedTensor`: a pruned
layer in the bitmask structure, any other (an embedding, an unpruned Linear) in the dense one.
Each gets a record, kept in `sparsetorch.json` under "quantized":

    {"model.layers.0.mlp.down_proj": {"structure": "bitmask", "scheme": "int8", "dtype": "float32"}}

("dtype": the weight's dtype before storing, which loading gives back) and a group in
compressed-tensors' `quantization_config.config_groups`, so its `ModelCompressor` can read the
combinations it knows: dense int8 ('int-quantized'), dense 4-bit ('pack-quantized'), and
bitmask-structured symmetric int8 ('sparse-bitmask' over 'int-quantized'). A combination it
does not know gets a format name of ours, which compressed-tensors refuses by name instead of
misreading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError
from sparsetorch.formats.codec import dtype_from_name
from sparsetorch.formats.quantized import QuantizedTensor, check_on_grid, quantized_part_names
from sparsetorch.quantize import QuantGrid, QuantScheme, parse_scheme

__all__ = ["ct_format", "ct_quantization_config", "part_keys", "quantize_layers", "read_quantized", "record_dtype",
           "records_from_config"]

QuantRecords = dict[str, dict[str, str]]


def ct_format(structure: str, scheme: QuantScheme) -> str:
    """compressed-tensors' quantization format for a structure and scheme, or ours where it has none.

    Example:
        >>> ct_format("dense", QuantScheme(4, 128))
        'pack-quantized'
    """
    if structure == "dense":
        return "int-quantized" if scheme.bits == 8 else "pack-quantized"
    if structure == "bitmask" and scheme.bits == 8 and scheme.symmetric:
        return "int-quantized"  # its sparse-bitmask compressor restores the int8 codes, zeros where pruned
    return f"sparsetorch-{structure}-{scheme.name}"


def quantize_layers(state: dict[str, Tensor], grids: Mapping[str, QuantGrid],
                    sparse: set[str]) -> tuple[dict[str, Tensor], QuantRecords]:
    """Pop each gridded module's `.weight` from `state` and return its quantized tensors and records.

    A module whose weight `state` does not hold is tied to one stored under another name and is skipped.

    Raises:
        ValueError: a weight that is not on its grid (naming the layer and the fix), or not 2-D.
    """
    tensors: dict[str, Tensor] = {}
    records: QuantRecords = {}
    for name, grid in grids.items():
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if weight.dim() != 2:
            raise ValueError(f"{name}: only 2-D weights can be stored quantized, got shape {tuple(weight.shape)}")
        check_on_grid(weight, grid, name)
        structure = "bitmask" if name in sparse else "dense"
        stored = QuantizedTensor.from_dense(weight, grid, structure)
        tensors.update(stored.state_dict(name))
        records[name] = {"structure": structure, "scheme": grid.scheme.name,
                         "dtype": str(weight.dtype).removeprefix("torch.")}
        del state[f"{name}.weight"]
    return tensors, records


def _ct_weights(scheme: QuantScheme) -> dict:
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": "channel" if scheme.group_size is None else "group", "group_size": scheme.group_size,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def ct_quantization_config(records: QuantRecords) -> dict:
    """The quantization fields of compressed-tensors' `quantization_config` for `records`:
    one config group per (format, scheme), targeting its modules by exact name."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, record in records.items():
        scheme = parse_scheme(record["scheme"])
        groups.setdefault((ct_format(record["structure"], scheme), scheme.name), []).append(name)
    config_groups = {
        f"group_{i}": {"targets": names, "weights": _ct_weights(parse_scheme(scheme)), "input_activations": None,
                       "output_activations": None, "format": fmt}
        for i, ((fmt, scheme), names) in enumerate(groups.items())
    }
    formats = {fmt for fmt, _ in groups}
    return {"config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None}


def _scheme_of(weights: Mapping) -> QuantScheme:
    group = weights.get("group_size") if weights.get("strategy") == "group" else None
    return QuantScheme(bits=int(weights["num_bits"]), group_size=group, symmetric=bool(weights.get("symmetric", True)))


def _targets(target: str, name: str) -> bool:
    """compressed-tensors' target matching, by name: exact, 're:' pattern, or a class name (any module)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or ("." not in target and target[:1].isupper())


def _structure_of(prefix: str, keys: set[str]) -> str:
    for part, structure in (("bitmask", "bitmask"), ("indices", "nm"), ("row_ptr", "csr16")):
        if f"{prefix}.{part}" in keys:
            return structure
    return "dense"


def records_from_config(config: Mapping, keys: Iterable[str]) -> QuantRecords:
    """Quantization records rebuilt from a compressed `config.json` (ours, or compressed-tensors' for the
    combinations it writes) and the tensor names of its weights file: what loading needs when the
    directory has no `sparsetorch.json`. Every module with a `weight_scale` is quantized; its
    config group gives the scheme, the tensors beside it the structure.

    Raises:
        CorruptTensorError: a module with scales that no config group targets, or an unreadable group.
    """
    keys = set(keys)
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    records: QuantRecords = {}
    for prefix in sorted(key.removesuffix(".weight_scale") for key in keys if key.endswith(".weight_scale")):
        group = next((g for g in groups.values() if any(_targets(t, prefix) for t in g.get("targets", []))), None)
        if group is None or not group.get("weights"):
            raise CorruptTensorError(f"{prefix}: has weight scales, but no quantization config group targets it")
        try:
            scheme = _scheme_of(group["weights"])
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptTensorError(f"{prefix}: unreadable quantization config {group['weights']} ({err})") from None
        records[prefix] = {"structure": _structure_of(prefix, keys), "scheme": scheme.name}
    return records


def read_quantized(tensors: Mapping[str, Tensor], prefix: str, record: Mapping[str, str]) -> QuantizedTensor:
    """The quantized weight stored under `prefix`, as its record describes, checked.

    Raises:
        CorruptTensorError: a part is missing, the parts disagree, or the record is malformed.
    """
    try:
        scheme, structure = parse_scheme(record["scheme"]), record["structure"]
    except (KeyError, ValueError) as err:
        raise CorruptTensorError(f"{prefix}: malformed quantization record {dict(record)} ({err})") from None
    return QuantizedTensor.from_state_dict(tensors, prefix, scheme=scheme, structure=structure)


def part_keys(prefix: str, record: Mapping[str, str]) -> list[str]:
    """The tensor names a quantized layer's record says it stores."""
    names = quantized_part_names(parse_scheme(record["scheme"]), record["structure"])
    return [f"{prefix}.{name}" for name in names]


def record_dtype(record: Mapping[str, str]) -> torch.dtype:
    """The dtype the layer had before it was stored (float32 for records that do not say)."""
    return dtype_from_name(record.get("dtype", "float32"))
