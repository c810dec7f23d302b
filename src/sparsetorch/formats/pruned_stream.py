"""`save_pruned`'s output written piece by piece, for a model that is never whole in memory.

A streamed prune (`sparsetorch.oneshot.streaming`) holds one decoder block at a time, so it hands
each finished block's tensors here and frees them: the dense weights go straight to their places
in `model.safetensors` (its header is planned from the tensors' shapes before any is written), the
compressed form's tensors go through `write_compressed`'s own `CompressedWriter`. The files are laid out as `save_file`
lays them out, so the directory is byte for byte what `save_pruned` writes for the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import Tensor

from sparsetorch.formats.checkpoint import COMPRESSED_DIR, WEIGHTS_FILE, CompressedWriter
from sparsetorch.formats.safetensors_writer import PlannedFile, TensorSpec
from sparsetorch.quantize import QuantGrid

__all__ = ["StreamedPrunedWriter"]


class StreamedPrunedWriter:
    """The weights of a pruned directory (`staging`), written a few tensors at a time.

    Args:
        staging: the output's staging directory (config and tokenizer files are the caller's).
        dense: every tensor of the dense weights file: name -> dtype and shape (tied duplicates left out).
        tied: alias -> stored name of tied weights (as `write_compressed` records them).
        sparse_layers: module names whose weight the compressed form stores as a bitmask.
        codec: 'zstd' or 'none', as for `write_compressed`.

    Example:
        >>> writer = StreamedPrunedWriter(staging, specs, {}, pruned_layers, codec="zstd")
        >>> writer.write(block_state)              # once per block, and once for the rest
        >>> writer.finish(config_dict, structure="unstructured", ignore=["lm_head"])
    """

    def __init__(self, staging: Path, dense: Mapping[str, TensorSpec], tied: Mapping[str, str],
                 sparse_layers: Iterable[str], *, codec: str = "zstd") -> None:
        self.staging, self.tied = Path(staging), dict(tied)
        self.sparse_layers = list(sparse_layers)
        self.compressed = CompressedWriter(self.staging / COMPRESSED_DIR, codec)
        self.dense = PlannedFile(self.staging / WEIGHTS_FILE, dense, {"format": "pt"})
        self._finished = False

    @property
    def bytes_written(self) -> int:
        """Bytes of dense and compressed tensors written so far."""
        return self.dense.bytes_written + self.compressed.bytes_written

    def write(self, state: Mapping[str, Tensor], grids: Mapping[str, QuantGrid] | None = None) -> None:
        """Write some of the model's tensors (names as in the dense file: one pruned block, say) to both forms;
        `grids`: the value grids of quantized modules among them.

        Raises:
            KeyError / ValueError: a tensor the dense file has no place for, or of another dtype or shape.
        """
        for name, tensor in state.items():  # one at a time: a block's stored forms are never all in memory
            self.dense.write(name, tensor)
            self.compressed.add({name: tensor}, self.sparse_layers, grids or {})

    def finish(self, config: dict, *, structure: str, ignore: Iterable[str]) -> None:
        """Complete both weights files and write the compressed form's config.json and manifest.

        Args:
            config: the model's config.json as a dict.
            structure, ignore: as for `write_compressed`.

        Raises:
            RuntimeError: a tensor of the dense file was never written.
        """
        self.dense.close()
        self.compressed.finish(config, self.tied, structure=structure, ignore=ignore,
                               has_sparse=bool(self.sparse_layers))
        self._finished = True

    def close(self) -> None:
        """Release the open files of an unfinished write (after an error); a no-op once `finish` ran."""
        if not self._finished:
            self.dense.abort()
            self.compressed.abort()
