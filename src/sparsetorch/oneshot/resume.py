"""Resuming an interrupted pruning run, block by block.

After each block the pipeline saves that block's pruned weights and keep masks (and, when the
run quantizes, their value grids: SparseGPT's joint grids are found during its sweep and cannot
be rebuilt from the weights), the per-layer report so far, and the block's outputs (the next
block's inputs). A later
run with the same configuration and calibration data restores them and continues with
the next block, giving the same result as an uninterrupted run. A checkpoint made for
other settings, other calibration data or another model is never used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.report import LayerReport
from sparsetorch.quantize import QuantGrid
from sparsetorch.targets import find_targets, weight_matrix

__all__ = ["DamagedCheckpointError", "ResumeCheckpoint", "StaleCheckpointError", "model_identity"]

_PROGRESS = "progress.json"
_ALLOCATION = "allocation.json"  # the per-block sparsities an allocation measured (OWL), once per run
_LEGACY_HIDDEN = "hidden.pt"  # checkpoints written before the hidden states were named per block


def _hidden_name(blocks_done: int) -> str:
    """The file of the inputs of block `blocks_done` (the outputs of the block before it)."""
    return f"hidden-{blocks_done:04d}.pt"


class StaleCheckpointError(ValueError):
    """A resume checkpoint written for a different configuration, calibration set or model."""


class DamagedCheckpointError(StaleCheckpointError):
    """A resume checkpoint whose files cannot be read back."""


SAMPLES = 4096  # values hashed per parameter: enough to tell models apart, cheap for any size


def model_identity(model: nn.Module, config: PruneConfig, read: Callable[[str], Tensor] | None = None) -> dict:
    """What a resumed run must share with the interrupted one's model: every parameter's name, shape and
    dtype, and a hash of evenly spaced values of the parameters pruning never writes (embeddings, norms,
    biases, layers left dense), so the identity is the same before and after some blocks were pruned.
    `read(name)`: the values of a parameter still on the meta device (a model streamed from its files)."""
    pruned = {f"{name}.weight" for name in find_targets(model, config.targets, config.ignore)}
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        if name not in pruned and param.numel():
            flat = (read(name) if param.is_meta and read is not None else param.detach()).reshape(-1)
            count = min(SAMPLES, flat.numel())
            picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # exact in int64
            digest.update(flat[picks].float().cpu().numpy().tobytes())
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return {"type": kind, "parameters": sum(p.numel() for p in model.parameters()), "sha256": digest.hexdigest()}


def _fingerprint(config: PruneConfig, calibration: Tensor) -> dict:
    digest = hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()
    return {"config": config.to_dict(), "calibration_sha256": digest, "shape": list(calibration.shape)}


def _describe(identity: dict) -> str:
    return f"a {identity['type']} model of {identity['parameters']:,} parameters, weights {identity['sha256'][:12]}"


def _replace(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResumeCheckpoint:
    """Per-block progress of one pruning run in `directory`.

    Example:
        >>> prune(model, windows, config, checkpoint=ResumeCheckpoint("run.resume", config, windows))
    """

    def __init__(self, directory: str | Path, config: PruneConfig, calibration: Tensor,
                 model: nn.Module | None = None, read: Callable[[str], Tensor] | None = None) -> None:
        """`model`, before it is pruned: a checkpoint of another model is then refused (see `model_identity`,
        and for `read`, a streamed model's)."""
        self.directory = Path(directory)
        self.fingerprint = _fingerprint(config, calibration)
        self.model = None if model is None else model_identity(model, config, read)
        self.scheme = config.scheme

    def _progress(self) -> dict | None:
        path = self.directory / _PROGRESS
        if not path.exists():
            return None
        try:
            progress = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._damaged(path, err) from None
        theirs = progress.get("model")
        if self.model is not None and theirs is not None and theirs != self.model:
            raise StaleCheckpointError(
                f"{self.directory} holds a checkpoint of another model ({_describe(theirs)}; this run prunes "
                f"{_describe(self.model)}); delete it (CLI: --restart) or choose another output"
            )
        if progress.get("fingerprint") != self.fingerprint:
            raise StaleCheckpointError(
                f"{self.directory} holds a checkpoint of a run with other settings or calibration data; "
                "delete it (CLI: --restart) to start afresh"
            )
        return progress

    def restore(self, modules: dict[str, nn.Module], layers: dict, masks: dict,
                grids: dict | None = None) -> tuple[int, list[Tensor] | None]:
        """Load saved blocks into `modules`, `layers`, `masks` (and `grids`, when the run quantizes);
        return (next block, its inputs)."""
        progress = self._progress()
        if progress is None:
            return 0, None
        blocks, hidden = self._read(progress)  # all of it first: a damaged file changes nothing
        restored = [self._grids(tensors, modules) for tensors in blocks]
        for tensors in blocks:
            for key, tensor in tensors.items():
                name, kind = key.rsplit(".", 1)
                if kind == "weight":
                    modules[name].weight.detach().copy_(tensor)  # bumps the version: see set_weight_matrix
                elif kind == "mask":
                    masks[name] = tensor.bool()
        if grids is not None:
            for block_grids in restored:
                grids.update(block_grids)
        for name, record in progress["layers"].items():
            layers[name] = LayerReport(**{**record, "shape": tuple(record["shape"])})
        return progress["blocks_done"], hidden

    def _read(self, progress: dict) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
        """The finished blocks' tensors and the next block's inputs, or DamagedCheckpointError."""
        blocks = [self._load(self.directory / f"block-{index:04d}.safetensors", load_file)
                  for index in range(progress["blocks_done"])]
        return blocks, self._hidden(progress)

    def _hidden(self, progress: dict) -> list[Tensor]:
        return self._load(self.directory / progress.get("hidden", _LEGACY_HIDDEN),
                          partial(torch.load, weights_only=True))

    def _load(self, path: Path, read: Callable[[Path], object]):
        try:
            return read(path)
        except Exception as err:  # safetensors, pickle and zip raise many kinds for a damaged file
            raise self._damaged(path, err) from None

    def resume_point(self, layers: dict) -> tuple[int, list[Tensor] | None]:
        """For a run that reads finished blocks back one at a time (`block`): fill `layers` with the saved
        per-layer reports; return (next block, its inputs), (0, None) when there is nothing to resume."""
        progress = self._progress()
        if progress is None:
            return 0, None
        hidden = self._hidden(progress)
        for name, record in progress["layers"].items():
            layers[name] = LayerReport(**{**record, "shape": tuple(record["shape"])})
        return progress["blocks_done"], hidden

    def block(self, index: int, modules: dict[str, nn.Module]) -> tuple[dict[str, Tensor], dict[str, QuantGrid]]:
        """Finished block `index`'s pruned weights (by parameter name, e.g. 'model.layers.0.mlp.up_proj.weight')
        and, when the run quantizes, their value grids (`modules`: the model's, by name, for their shapes)."""
        tensors = self._load(self.directory / f"block-{index:04d}.safetensors", load_file)
        weights = {key: tensor for key, tensor in tensors.items() if key.endswith(".weight")}
        return weights, self._grids(tensors, modules)

    def _grids(self, tensors: dict[str, Tensor], modules: dict[str, nn.Module]) -> dict[str, QuantGrid]:
        """The value grids of one saved block's layers (none when the run does not quantize)."""
        if self.scheme is None:
            return {}
        grids = {}
        for key in tensors:
            name, kind = key.rsplit(".", 1)
            if kind != "mask":
                continue
            if f"{name}.scale" not in tensors:
                raise DamagedCheckpointError(f"the resume checkpoint {self.directory} holds no value grid for {name} "
                                             "although this run quantizes; rerun with --restart")
            cols = weight_matrix(modules[name]).shape[1]
            grids[name] = QuantGrid(self.scheme, tensors[f"{name}.scale"], tensors.get(f"{name}.zero_point"), cols)
        return grids

    def _damaged(self, path: Path, err: Exception) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"the resume checkpoint {path} is damaged ({type(err).__name__}: "
                                      f"{str(err)[:200]}); rerun with --restart (API: checkpoint.clear())")

    def save(self, index: int, names: list[str], modules: dict[str, nn.Module], layers: dict, masks: dict,
             hidden: list[Tensor], grids: dict[str, QuantGrid] | None = None) -> None:
        """Record that block `index` (holding layers `names`) is done and its outputs are `hidden`;
        `grids`: the value grids of a quantizing run's layers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name in names:
            tensors[f"{name}.weight"] = modules[name].weight.detach().contiguous()
            tensors[f"{name}.mask"] = masks[name].to(torch.uint8).contiguous()
            grid = (grids or {}).get(name)
            if grid is not None:
                tensors[f"{name}.scale"] = grid.scale.contiguous()
                if grid.zero_point is not None:
                    tensors[f"{name}.zero_point"] = grid.zero_point.contiguous()
        _replace(self.directory / f"block-{index:04d}.safetensors", lambda p: save_file(tensors, p))
        # the new outputs get a file of their own, and progress.json names it last: a crash at any
        # point leaves progress.json naming the inputs of the block it says comes next
        hidden_name = _hidden_name(index + 1)
        _replace(self.directory / hidden_name, lambda p: torch.save(hidden, p))
        progress = {
            "fingerprint": self.fingerprint,
            "model": self.model,
            "blocks_done": index + 1,
            "hidden": hidden_name,
            "layers": {name: asdict(layer) for name, layer in layers.items()},
        }
        _replace(self.directory / _PROGRESS, lambda p: p.write_text(json.dumps(progress)))
        for stale in self.directory.glob("hidden*.pt"):
            if stale.name != hidden_name:
                stale.unlink()

    def block_sparsities(self) -> list[float] | None:
        """The per-block sparsities this run's allocation chose (`save_block_sparsities`), or None when
        there is no valid checkpoint to resume."""
        path = self.directory / _ALLOCATION
        if not path.exists() or self._progress() is None:
            return None
        try:
            return [float(value) for value in json.loads(path.read_text())]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
            raise self._damaged(path, err) from None

    def save_block_sparsities(self, sparsities: list[float]) -> None:
        """Keep the per-block sparsities an allocation measured (OWL's), for a resumed run."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace(self.directory / _ALLOCATION, lambda p: p.write_text(json.dumps(sparsities)))

    def clear(self) -> None:
        """Remove the checkpoint once the run's output is safely written."""
        shutil.rmtree(self.directory, ignore_errors=True)
