"""Saving and loading pruned models: a dense HF directory plus its compressed form.

    out/
      config.json, model.safetensors, tokenizer files   plain `transformers` loads this (dense)
      sparsity.json                                      per-layer sparsity, method, calibration
      compressed/
        config.json        with compressed-tensors' `quantization_config.sparsity_config` (and its
                           `config_groups` when layers are quantized)
        model.safetensors  sparse-bitmask layout, quantized layers as `formats.quantized` lays them
                           out; with codec 'zstd' each tensor is also losslessly entropy-coded
                           (`sparsetorch.formats.codec`)
        sparsetorch.json   codec, tied weights, quantized layers and the SHA-256 of each file

With `codec='none'` the compressed directory is exactly what compressed-tensors 0.14
reads (for quantized layers: the combinations `formats.quantized_layers` lists).
Everything is written to a temporary directory beside `out` and renamed into place at
the end, so an interrupted save never leaves a half-written `out`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsetorch.formats import codec as codecs
from sparsetorch.formats.bitmask import BitmaskTensor, CorruptTensorError
from sparsetorch.formats.quantized_layers import (
    ct_quantization_config,
    part_keys,
    quantize_layers,
    read_quantized,
    record_dtype,
    records_from_config,
)
from sparsetorch.formats.safetensors_writer import SpooledFile
from sparsetorch.formats.tensorfile import TensorFile, TensorFileError
from sparsetorch.quantize import QuantGrid

__all__ = [
    "COMPRESSED_DIR",
    "CompressedReader",
    "CompressedTensors",
    "CompressedWriter",
    "CorruptFileError",
    "atomic_directory",
    "check_codec",
    "codec_entry",
    "codec_metadata",
    "compress_tensors",
    "finish_compressed",
    "load_compressed_model",
    "open_compressed",
    "read_compressed_state_dict",
    "read_grids",
    "remove_stale_staging",
    "sha256_file",
    "stored_bytes",
    "write_compressed",
]

COMPRESSED_DIR = "compressed"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "sparsetorch.json"
_CODEC_KEY = "sparsetorch.codec"


class CorruptFileError(ValueError):
    """A compressed file that is truncated, damaged or inconsistent."""


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `target` only if the block succeeds.

    Raises:
        FileExistsError: `target` exists and `overwrite` is False (checked before any work).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the user's usual mode
        if target.exists() and not overwrite:  # appeared while this run worked
            raise FileExistsError(f"output directory {target} appeared during this run; pass --overwrite to replace it")
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / "old")
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging directories that runs killed while writing `target` left beside it
    (`.NAME.partial-PID-*` of a process that no longer exists); return them."""
    removed = []
    for staging in Path(target).parent.glob(f".{Path(target).name}.partial-*"):
        pid = staging.name.rpartition(".partial-")[2].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    if removed:
        warnings.warn(f"removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'} of interrupted "
                      f"runs beside {target}: {', '.join(p.name for p in removed)}", RuntimeWarning, stacklevel=3)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_state(model: nn.Module, keep: set[str] = frozenset()) -> tuple[dict[str, Tensor], dict[str, str]]:
    """State dict without tied duplicates, and the alias -> kept name map. Of names that share one
    tensor, the one in `keep` (a sparse layer's weight: it is stored as a bitmask) is kept, else the first."""
    groups: dict[tuple, list[str]] = {}
    tensors = model.state_dict()
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else (name,)
        groups.setdefault(key, []).append(name)
    state, tied = {}, {}
    for names in groups.values():
        kept = next((name for name in names if name in keep), names[0])
        state[kept] = tensors[kept].detach().contiguous()
        tied.update({alias: kept for alias in names if alias != kept})
    return {name: state[name] for name in tensors if name in state}, tied


def _compressed_tensors_config(config: dict, structure: str, ignore: Iterable[str], sparsity: float,
                               quantized: dict[str, dict[str, str]], has_sparse: bool = True) -> dict:
    """`config` (the model's config.json dict) with compressed-tensors' `quantization_config`."""
    config = dict(config)
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.14.0",
        "transform_config": {},
        "sparsity_config": {
            "format": "sparse-bitmask",
            "global_sparsity": round(sparsity, 6),
            "registry_requires_subclass": False,
            "sparsity_structure": structure,
            "targets": ["Linear"],
            "ignore": list(ignore),
        },
    }
    if not has_sparse:  # compressed-tensors reads {} as "no sparsity" and skips its sparse decompressor
        config["quantization_config"]["sparsity_config"] = {}
    if quantized:
        config["quantization_config"].update(ct_quantization_config(quantized))
    return config


@dataclass
class CompressedTensors:
    """What the compressed form stores for some of a model's tensors, before any codec: the stored
    tensors, the zeros and weights counted in its sparse layers, and its quantized layers' records."""

    tensors: dict[str, Tensor]
    zeros: int = 0
    total: int = 0
    quantized: dict[str, dict[str, str]] = field(default_factory=dict)


def compress_tensors(state: dict[str, Tensor], sparse_layers: Iterable[str],
                     grids: Mapping[str, QuantGrid]) -> CompressedTensors:
    """The stored form of `state` (tied duplicates already removed; emptied by the call): each sparse layer's
    weight as a bitmask, each gridded weight as integer codes, the rest as they are. Any part of a model's
    state can go alone (one block at a time), and the parts together store what the whole would.

    Raises:
        ValueError: a gridded weight not exactly on its grid.
    """
    sparse_layers = [name for name in sparse_layers if f"{name}.weight" in state]  # others: in another part
    grids = {name: grid for name, grid in grids.items() if f"{name}.weight" in state}
    part = CompressedTensors({})
    for name in sparse_layers:
        if name in grids:
            weight = state[f"{name}.weight"]
            part.zeros, part.total = part.zeros + int((weight == 0).sum()), part.total + weight.numel()
    part.tensors, part.quantized = quantize_layers(state, grids, set(sparse_layers))
    for name in sparse_layers:
        if f"{name}.weight" not in state:  # quantized above
            continue
        weight = state.pop(f"{name}.weight")
        packed = BitmaskTensor.from_dense(weight)
        part.tensors.update(packed.state_dict(name))
        part.zeros += weight.numel() - packed.values.numel()
        part.total += weight.numel()
    part.tensors.update(state)
    state.clear()
    return part


def codec_entry(tensor: Tensor) -> dict:
    """The codec layout entry of an encoded tensor: what decoding gives back."""
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def codec_metadata(codec: str, layout: Mapping[str, dict]) -> dict[str, str]:
    """The safetensors metadata of a compressed weights file (the codec's layout by tensor name, sorted)."""
    metadata = {"format": "pt"}
    if codec == "zstd":
        metadata[_CODEC_KEY] = json.dumps({"codec": "zstd-byteplanes", "tensors": dict(sorted(layout.items()))})
    return metadata


def finish_compressed(directory: Path, config: dict, part: CompressedTensors, tied: dict[str, str], *,
                      structure: str, ignore: Iterable[str], codec: str, has_sparse: bool) -> None:
    """Write the compressed directory's config.json and manifest once its weights file is complete
    (quantized layers listed by name, so the order they were written in does not show)."""
    sparsity = part.zeros / part.total if part.total else 0.0
    quantized = dict(sorted(part.quantized.items()))
    full = _compressed_tensors_config(config, structure, ignore, sparsity, quantized, has_sparse=has_sparse)
    (directory / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    manifest = {"codec": codec, "tied": tied, "files": {WEIGHTS_FILE: sha256_file(directory / WEIGHTS_FILE)}}
    if quantized:
        manifest["quantized"] = quantized
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def check_codec(codec: str) -> None:
    """Raise ValueError naming the codecs there are, unless `codec` is one."""
    if codec not in codecs.CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {list(codecs.CODECS)}")


class CompressedWriter:
    """A compressed directory written a few tensors at a time: `add` converts them (`compress_tensors`),
    codes them and spools them to disk, so only those few are in memory as stored tensors; `finish`
    completes the weights file (the same bytes whatever the order they came in) and writes the config
    and manifest.

    Example:
        >>> writer = CompressedWriter(directory, codec="zstd")
        >>> writer.add({"model.layers.0.mlp.up_proj.weight": weight}, sparse_layers, grids)
        >>> writer.finish(model.config.to_dict(), tied={}, structure="2:4", ignore=["lm_head"], has_sparse=True)
    """

    def __init__(self, directory: Path, codec: str = "zstd") -> None:
        check_codec(codec)
        self.directory, self.codec = Path(directory), codec
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = SpooledFile(self.directory / WEIGHTS_FILE)
        self.totals = CompressedTensors({})
        self.layout: dict[str, dict] = {}
        self.bytes_written = 0

    def add(self, state: Mapping[str, Tensor], sparse_layers: Iterable[str], grids: Mapping[str, QuantGrid]) -> None:
        """Store some of the model's tensors (tied duplicates left out); see `compress_tensors`."""
        part = compress_tensors(dict(state), sparse_layers, grids)
        for name, tensor in part.tensors.items():
            if self.codec == "none":
                self.file.add(name, tensor)
                self.bytes_written += tensor.numel() * tensor.element_size()
                continue
            self.bytes_written += self.file.add_bytes(name, partial(codecs.encode_into, tensor))
            self.layout[name] = codec_entry(tensor)
        self.totals.zeros += part.zeros
        self.totals.total += part.total
        self.totals.quantized.update(part.quantized)

    def finish(self, config: dict, tied: dict[str, str], *, structure: str, ignore: Iterable[str],
               has_sparse: bool) -> None:
        """Write the weights file, then config.json and the manifest (see `finish_compressed`)."""
        self.file.metadata = codec_metadata(self.codec, self.layout)
        self.file.close()
        finish_compressed(self.directory, config, self.totals, tied, structure=structure, ignore=ignore,
                          codec=self.codec, has_sparse=has_sparse)

    def abort(self) -> None:
        """Give up an unfinished write: close and remove the spool."""
        self.file.abort()


def write_compressed(
    model: nn.Module,
    directory: Path,
    sparse_layers: Iterable[str],
    *,
    structure: str = "unstructured",
    ignore: Iterable[str] = ("lm_head",),
    codec: str = "zstd",
    grids: Mapping[str, QuantGrid] | None = None,
) -> Path:
    """Write `model` to `directory` in sparse-bitmask layout; return the weights file.

    One tensor is converted and coded at a time (`CompressedWriter`), so the write holds little
    beyond the model itself.

    Args:
        sparse_layers: module names whose `.weight` is stored as a bitmask; the rest stay dense.
        structure: compressed-tensors' `sparsity_structure` ('unstructured' or 'N:M').
        codec: 'zstd' (smaller, sparsetorch reads it) or 'none' (compressed-tensors reads it).
        grids: module name -> the `QuantGrid` its weight lies on: that weight is stored as integer
            codes (`formats.quantized`), in the bitmask structure if it is a sparse layer, else dense.

    Raises:
        ValueError: unknown codec, or a gridded weight not exactly on its grid (quantize it first).
    """
    check_codec(codec)
    sparse_layers, grids = list(sparse_layers), dict(grids or {})
    state, tied = _unique_state(model, keep={f"{name}.weight" for name in [*grids, *sparse_layers]})
    unknown = [name for name in grids if f"{name}.weight" not in state and f"{name}.weight" not in tied]
    if unknown:
        raise ValueError(f"grids name modules without a weight in this model: {unknown[:5]}; "
                         "use module names such as 'model.layers.0.mlp.down_proj'")
    writer = CompressedWriter(directory, codec)
    try:
        for name in list(state):
            writer.add({name: state.pop(name)}, sparse_layers, grids)
        config = model.config.to_dict() if hasattr(model, "config") else {}
        writer.finish(config, tied, structure=structure, ignore=ignore, has_sparse=bool(sparse_layers))
    except BaseException:
        writer.abort()
        raise
    return writer.directory / WEIGHTS_FILE


def _verify_checksums(directory: Path) -> dict:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        return {}
    manifest = json.loads(manifest_path.read_text())
    for file, expected in manifest.get("files", {}).items():
        path = directory / file
        if not path.exists():
            raise CorruptFileError(f"{path} is missing (listed in {MANIFEST_FILE})")
        if sha256_file(path) != expected:
            raise CorruptFileError(f"{path} is damaged: its SHA-256 does not match {MANIFEST_FILE}")
    return manifest


class CompressedReader:
    """The tensors of a compressed weights file, read and decoded one at a time (see `open_compressed`)."""

    def __init__(self, file: TensorFile, path: Path, layout: dict | None, tied: dict[str, str],
                 quantized: dict[str, dict[str, str]] | None = None) -> None:
        self._file, self.path, self._layout, self.tied = file, path, layout, tied
        self.quantized = quantized or {}  # module name -> {"structure", "scheme", "dtype"}

    def quantized_weight(self, prefix: str):
        """The `QuantizedTensor` stored under `prefix`, read and checked.

        Raises:
            CorruptFileError: its tensors are missing, damaged or disagree.
        """
        record = self.quantized[prefix]
        tensors = {key: self.tensor(key) for key in part_keys(prefix, record) if key in self.keys()}
        try:
            return read_quantized(tensors, prefix, record)
        except CorruptTensorError as err:
            raise CorruptFileError(f"{self.path}: {err}") from None

    def quantized_keys(self) -> set[str]:
        """Every tensor name that belongs to a quantized layer."""
        return {key for prefix, record in self.quantized.items() for key in part_keys(prefix, record)}

    def keys(self) -> list[str]:
        return self._file.keys()

    def nbytes(self, key: str) -> int:
        """Bytes `key` occupies in the file (coded, with codec 'zstd')."""
        return self._file.nbytes(key)

    def tensor(self, key: str) -> Tensor:
        """The tensor `key`, decoded. Read with plain file reads, and decoded as it streams in, so
        nothing else of the file stays in memory.

        Raises:
            CorruptFileError: it cannot be read or decoded.
        """
        info = None if self._layout is None else self._layout.get(key)
        if self._layout is not None and info is None:
            raise CorruptFileError(f"{self.path}: tensor {key} has no codec layout entry")
        try:
            if info is None:
                return self._file.tensor(key)
            return codecs.decode_stream(self._file.open_bytes(key), codecs.dtype_from_name(info["dtype"]),
                                        tuple(info["shape"]))
        except (TensorFileError, OSError) as err:
            raise CorruptFileError(f"{self.path}: tensor {key} is truncated or damaged ({err})") from None
        except ValueError as err:
            raise CorruptFileError(f"{self.path}: tensor {key}: {err}") from None


@contextmanager
def open_compressed(directory: Path) -> Iterator[CompressedReader]:
    """Verify a compressed directory's checksums, then read its tensors lazily.

    Raises:
        FileNotFoundError: no weights file.
        CorruptFileError: checksum mismatch or a file that is not safetensors.

    Example:
        >>> with open_compressed("pruned/x/compressed") as reader:
        ...     values = reader.tensor("model.layers.0.mlp.up_proj.compressed")
    """
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}")
    manifest = _verify_checksums(directory)
    with open(path, "rb") as handle:
        try:
            file = TensorFile(handle)
        except TensorFileError as err:
            raise CorruptFileError(f"{path} is truncated or not a safetensors file ({err})") from None
        layout = json.loads(file.metadata[_CODEC_KEY])["tensors"] if _CODEC_KEY in file.metadata else None
        quantized = manifest.get("quantized") or _quantized_from_config(directory, file.keys())
        yield CompressedReader(file, path, layout, manifest.get("tied", {}), quantized)


def _quantized_from_config(directory: Path, keys: list[str]) -> dict[str, dict[str, str]]:
    """The quantized layers a directory without `sparsetorch.json` has, from its config.json."""
    config_path = directory / "config.json"
    if not any(key.endswith(".weight_scale") for key in keys):
        return {}
    try:
        return records_from_config(json.loads(config_path.read_text()) if config_path.exists() else {}, keys)
    except CorruptTensorError as err:
        raise CorruptFileError(f"{directory}: {err}") from None


def read_compressed_state_dict(directory: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Dense state dict from a compressed directory (ours or compressed-tensors'), checked.

    Returns:
        (state dict with every sparse-bitmask weight expanded and every quantized one dequantized
        to the dtype it was stored from, tied alias -> name map).

    Raises:
        FileNotFoundError: no weights file.
        CorruptFileError: checksum mismatch, truncated file, or inconsistent tensors.
    """
    state = {}
    with open_compressed(directory) as reader:
        for prefix, record in reader.quantized.items():
            state[f"{prefix}.weight"] = reader.quantized_weight(prefix).to_dense().to(record_dtype(record))
        used = reader.quantized_keys()
        tensors = {key: reader.tensor(key) for key in reader.keys() if key not in used}
        path, tied = reader.path, reader.tied
    prefixes = [key.removesuffix(".bitmask") for key in tensors if key.endswith(".bitmask")]
    try:
        for prefix in prefixes:
            state[f"{prefix}.weight"] = BitmaskTensor.from_state_dict(tensors, prefix).to_dense()
    except CorruptTensorError as err:
        raise CorruptFileError(f"{path}: {err}") from None
    packed = {f"{p}.{k}" for p in prefixes for k in ("shape", "compressed", "bitmask", "row_offsets")}
    state.update({key: value for key, value in tensors.items() if key not in packed})
    return state, tied


def read_grids(directory: Path) -> dict[str, QuantGrid]:
    """The grid of every quantized layer of a compressed directory: what `write_compressed(grids=...)`
    needs to write its model again (e.g. with another codec) without losing the quantization.

    Raises:
        FileNotFoundError / CorruptFileError: see `read_compressed_state_dict`.
    """
    with open_compressed(directory) as reader:
        return {prefix: reader.quantized_weight(prefix).grid for prefix in reader.quantized}


def stored_bytes(directory: Path) -> dict[str, int]:
    """Bytes each module's tensors occupy in a compressed directory's weights file, by module name
    (`model.layers.0.mlp.up_proj`: its bitmask, values, offsets, scales ...), read from the header only.

    Raises:
        FileNotFoundError / CorruptFileError: see `open_compressed`.
    """
    sizes: dict[str, int] = {}
    with open_compressed(directory) as reader:
        for key in reader.keys():
            module = key.rpartition(".")[0]
            sizes[module] = sizes.get(module, 0) + reader.nbytes(key)
    return sizes


def load_compressed_model(directory: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A Hugging Face model built from a compressed directory's config and weights (dense).

    Raises:
        FileNotFoundError / CorruptFileError: see `read_compressed_state_dict`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    state, tied = read_compressed_state_dict(directory)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or next(iter(state.values())).dtype)
    for alias, name in tied.items():
        state.setdefault(alias, state[name])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in _tied_keys(model)]
    if missing or unexpected:
        raise CorruptFileError(
            f"{directory}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    return model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another one (filled by tie_weights)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(tensor.data_ptr(), name)
    return tied
