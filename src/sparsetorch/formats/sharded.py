"""A model directory's weights, read one tensor at a time by name, across all its safetensors shards.

A Hugging Face directory keeps its weights in `model.safetensors`, or in several shards that
`model.safetensors.index.json` maps tensor names to. Streaming a model larger than memory reads
each tensor only when it is needed, with plain reads (`TensorFile`): nothing else of the files
stays resident.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from sparsetorch.formats.safetensors_writer import TensorSpec
from sparsetorch.formats.tensorfile import TensorFile, TensorFileError

__all__ = ["ShardedWeights"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ShardedWeights:
    """The safetensors weights of a model directory: `keys()`, `spec(name)`, `tensor(name)`.

    Raises:
        FileNotFoundError: the directory holds no safetensors weights (or the index names a missing shard).
        ValueError: an index that is not JSON, or a shard that is not a safetensors file.

    Example:
        >>> with ShardedWeights("models/llama-7b") as weights:
        ...     embed = weights.tensor("model.embed_tokens.weight")
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._handles, self._files = [], {}
        try:
            for shard in self._shards():
                handle = open(shard, "rb")
                self._handles.append(handle)
                try:
                    file = TensorFile(handle)
                except TensorFileError as err:
                    raise ValueError(f"{shard} is not a safetensors file ({err})") from None
                self._files.update({name: file for name in file.keys()})
        except BaseException:
            self.close()
            raise

    def _shards(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a weights index ({type(err).__name__}: {err})") from None
            missing = [name for name in names if not (self.directory / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that do not exist: {missing[:3]}")
            return [self.directory / name for name in names]
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        raise FileNotFoundError(f"{self.directory} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                                "streaming reads safetensors only: convert the model with save_pretrained first")

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def spec(self, name: str) -> TensorSpec:
        """The stored dtype and shape of `name`, from the header alone."""
        return TensorSpec(*self._file(name).describe(name))

    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return sum(self.spec(name).nbytes for name in self._files)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh tensor of `name`'s values, in `dtype` if given."""
        tensor = self._file(name).tensor(name)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def _file(self, name: str) -> TensorFile:
        file = self._files.get(name)
        if file is None:
            raise KeyError(f"{self.directory} stores no tensor {name!r}")
        return file

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    def __enter__(self) -> ShardedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
