"""Prune a model larger than memory: its weights streamed block by block from and to safetensors files.

The sequential pipeline (`pipeline.py`) needs one decoder block's weights at a time, so here the
model is a skeleton on the meta device, sparsetorch's own Llama-family model (`models/llama.py`,
which the pipeline calibrates those families with in memory too):

1. The weights outside the blocks (embeddings, final norm, output layer) are read to make block
   0's inputs (the token embeddings of the calibration windows), then freed: nothing reads them
   again until the last step (a 7B model's embeddings and output layer are 0.5 GB in bf16).
2. Before block i's turn its weights are read from the source shards by name (`StreamedBlocks.load`);
   once it is pruned (and checkpointed) they are written to the output's dense and compressed
   files and freed (`release`), so the next block's read reuses their memory.
3. After the last block, the weights outside the blocks are read again (and quantized, when the
   run quantizes embeddings), written, and the files completed
   (`formats/pruned_stream.py`), with the configs, tokenizer and `sparsity.json`.

The pruning itself is `pipeline.prune`, the very code of an in-memory run: the weights come out
bit-identical to `prune` + `save_pruned` of the same model in the same dtype, and so do the files.
A resumed run (`resume=`) writes the finished blocks from its checkpoint and never reads them from
the source or runs them again.

Peak memory is about the largest block and the calibration activations (`memory_bound`), whatever
the model's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsetorch.families import FAMILIES, family_of, find_blocks, model_type
from sparsetorch.formats.checkpoint import COMPRESSED_DIR, atomic_directory
from sparsetorch.formats.pruned import structure_name, write_record
from sparsetorch.formats.pruned_stream import StreamedPrunedWriter
from sparsetorch.formats.safetensors_writer import TensorSpec
from sparsetorch.formats.sharded import ShardedWeights
from sparsetorch.malloc import give_back_free_memory
from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.models.packed import PackedWeights
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.pipeline import prune
from sparsetorch.oneshot.report import PruneReport
from sparsetorch.oneshot.resume import ResumeCheckpoint
from sparsetorch.oneshot.stats import Gram
from sparsetorch.targets import find_targets

__all__ = ["MemoryBound", "StreamedBlocks", "memory_bound", "prune_directory", "stored_dtype"]


def prune_directory(
    source: str | Path,
    out: str | Path,
    calibration: Tensor | None = None,
    config: PruneConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    calibration_info: dict | None = None,
    resume: str | Path | None = None,
    codec: str = "zstd",
    overwrite: bool = False,
    progress: bool = True,
    annotate: Callable[[], dict] | None = None,
    **options,
) -> PruneReport:
    """Prune the model in directory `source` into directory `out`, one block in memory at a time.

    `out` is what `save_pruned` writes for the same model pruned in memory (dense weights,
    compressed form, `sparsity.json`), the weights bit-identical when `dtype` matches.

    Args:
        source: a Hugging Face directory of a Llama-family model (llama, mistral, qwen2) with
            safetensors weights, in one file or in shards.
        out: the output directory (written in a staging directory beside it, renamed at the end).
        calibration: (windows, tokens) input ids, as for `prune`.
        config: a PruneConfig; or pass its fields as keyword options instead.
        dtype: the dtype to prune and store the weights in (default: the dtype they are stored in).
        tokenizer: saved with the model, as `save_pruned` does.
        calibration_info: how the calibration windows were made, recorded in `sparsity.json`.
        resume: a checkpoint directory: progress is saved there after every block, and a run
            interrupted earlier with the same settings continues from its last finished block.
            Removed once `out` is written.
        codec, overwrite: as for `save_pruned`.
        progress: show a progress bar.
        annotate: called once the weights are written; its fields are added to `sparsity.json`.

    Returns:
        The PruneReport, without keep masks (they are in the written weights: their nonzeros).

    Raises:
        NotImplementedError: a model family or option streaming does not run yet (prune in memory).
        FileNotFoundError / FileExistsError / ValueError: as for `prune` and `save_pruned`.

    Example:
        >>> report = prune_directory("llama-7b", "llama-7b-wanda", windows, method="wanda", resume="llama.resume")
    """
    if config is None:
        config = PruneConfig(**options)
    elif options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    _check_streamable(config)
    source = Path(source)
    with ShardedWeights(source) as weights:
        dtype = dtype or stored_dtype(weights)
        hf_config = _source_config(source, dtype)
        model = _lean_skeleton(hf_config, weights, dtype, None if calibration is None else calibration.shape[-1])
        store = StreamedBlocks(weights, model, dtype)
        checkpoint = None
        if resume is not None:
            fingerprinted = calibration if calibration is not None else torch.zeros(0, 0, dtype=torch.long)
            checkpoint = ResumeCheckpoint(resume, config, fingerprinted, model, read=store.read)
        with atomic_directory(Path(out), overwrite=overwrite) as staging:
            _write_configs(staging, hf_config)
            report = _prune_into(staging, hf_config, store, calibration, config, checkpoint, codec, progress)
            for directory in (staging, staging / COMPRESSED_DIR):
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
            write_record(staging, report.to_dict(), source=str(source), calibration=calibration_info, codec=codec,
                         grids=report.grids or None, annotate=annotate)
    if checkpoint is not None:
        checkpoint.clear()
    return report


def _prune_into(staging: Path, hf_config, store: StreamedBlocks, calibration: Tensor | None,
                config: PruneConfig, checkpoint: ResumeCheckpoint | None, codec: str, progress: bool) -> PruneReport:
    """Prune `store.model` block by block, writing the weights of both forms into `staging` as they are done."""
    specs, tied = _dense_layout(store.model, store.weights, store.dtype)
    sparse = list(find_targets(store.model, config.targets, config.ignore))
    store.writer = StreamedPrunedWriter(staging, specs, tied, sparse, codec=codec)
    try:
        report = prune(store.model, calibration, config, progress=progress, checkpoint=checkpoint, store=store)
        store.write_outside(specs, report.grids)
        store.writer.finish(hf_config.to_dict(), structure=structure_name(config.pattern), ignore=config.ignore)
    finally:
        store.writer.close()
    return report


def _check_streamable(config: PruneConfig) -> None:
    if config.blocks is not None:
        raise NotImplementedError("streaming runs the families sparsetorch's own model implements; an explicit "
                                  "blocks path needs the in-memory pipeline")


def stored_dtype(weights: ShardedWeights) -> torch.dtype:
    """The dtype of the first floating-point tensor stored: what the model's weights are kept in."""
    for name in weights.keys():
        spec = weights.spec(name)
        if spec.dtype.is_floating_point:
            return spec.dtype
    raise ValueError(f"{weights.directory} stores no floating-point weights")


_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers older checkpoints stored, which transformers ignores too


def _source_config(source: Path, dtype: torch.dtype):
    """transformers' config of `source` as the in-memory path saves it: the causal-LM class in
    `architectures`, the run's dtype. Only the config: the model classes are not imported, which
    keeps their memory out of a streamed prune's peak.

    Raises:
        NotImplementedError: a model type transformers has no causal-LM class for.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(source)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotImplementedError(f"streaming prunes causal language models; model type {config.model_type!r} is "
                                  "not one: prune it in memory (without --stream)")
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    return config


def _write_configs(directory: Path, hf_config) -> None:
    """config.json and generation_config.json, the files `save_pretrained` of the model writes."""
    from transformers import GenerationConfig

    hf_config.save_pretrained(directory)
    GenerationConfig.from_model_config(hf_config).save_pretrained(directory)


def _lean_skeleton(hf_config, weights: ShardedWeights, dtype: torch.dtype, tokens: int | None) -> LeanLlama:
    """sparsetorch's own model of the config's shape on the meta device, whose parameters are exactly
    the tensors `weights` stores (an alias of a tied weight aside).

    Raises:
        NotImplementedError: a family (or configuration) it does not compute.
    """
    family = FAMILIES.get(hf_config.model_type)
    try:
        if family is None or family.own_model is None:
            raise NotImplementedError(f"model type {hf_config.model_type!r}")
        shape = LeanConfig.from_dict(hf_config.to_dict())
    except (NotImplementedError, ValueError) as err:
        raise NotImplementedError(f"streaming prunes the Llama-family models sparsetorch's own model computes, "
                                  f"not this one ({err}); prune it in memory (without --stream)") from None
    with torch.device("meta"):
        model = LeanLlama(shape, PackedWeights()).to(dtype)
    ours = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    stored = {name for name in weights.keys() if not name.endswith(_IGNORED_SUFFIXES)}
    if stored - ours:
        raise NotImplementedError(f"streaming: stored tensors {sorted(stored - ours)[:3]} are not computed by "
                                  "sparsetorch's own model; prune this model in memory")
    if tokens is not None and (shape.sliding_window or tokens) < tokens:
        raise NotImplementedError(f"streaming: calibration windows of {tokens} tokens exceed the sliding window "
                                  f"({shape.sliding_window}); use shorter windows or prune in memory")
    return model.eval()


def _dense_layout(model: nn.Module, weights: ShardedWeights, dtype: torch.dtype
                  ) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The dense file's tensors (what `save_pretrained` stores: the state dict, tied duplicates once)
    and the tied aliases, each checked against the source's shapes.

    Raises:
        ValueError: the source lacks a tensor the config implies, or holds it in another shape.
    """
    specs, tied, first = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        if name not in weights:
            raise ValueError(f"{weights.directory} stores no {name}, which its config.json implies")
        stored = weights.spec(name)
        if stored.shape != tuple(tensor.shape):
            raise ValueError(f"{weights.directory}: {name} is stored as {stored.shape}, config.json implies "
                             f"{tuple(tensor.shape)}")
        specs[name] = TensorSpec(dtype if stored.dtype.is_floating_point else stored.dtype, stored.shape)
    return specs, tied


class StreamedBlocks:
    """The pipeline's `BlockStore` for a model on the meta device: blocks read from `weights` before their
    turn, written to `writer` and freed after (see the module docstring).

    Args:
        weights: the source model's stored tensors.
        model: the meta-device skeleton the pipeline prunes.
        dtype: the dtype the weights are pruned and stored in.
    """

    def __init__(self, weights: ShardedWeights, model: LeanLlama, dtype: torch.dtype) -> None:
        self.weights, self.model, self.dtype = weights, model, dtype
        self.blocks = find_blocks(model)
        self.path = family_of(model).blocks
        self.writer: StreamedPrunedWriter | None = None  # set once the output's staging directory exists

    def read(self, name: str) -> Tensor:
        """A stored tensor by name, floating-point ones in the run's dtype."""
        tensor = self.weights.tensor(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _prefix(self, index: int) -> str:
        return f"{self.path}.{index}."

    def load_outside(self) -> None:
        """Read every parameter outside the blocks (embeddings, final norm, output layer)."""
        inside = self.path + "."
        state = {name: self.read(name) for name, _ in self.model.named_parameters() if not name.startswith(inside)}
        self.model.load_state_dict(state, strict=False, assign=True)
        self.model.tie_weights()

    def unload_outside(self) -> None:
        """Free the parameters outside the blocks: block 0's inputs are made, and nothing else reads them
        until the run's last step."""
        inside = self.path + "."
        for name, module in self.model.named_modules():
            owns_parameters = next(module.parameters(recurse=False), None) is not None
            if name and not name.startswith(inside) and owns_parameters:
                module.to("meta")
        self.model.tie_weights()  # moved one by one, tied weights came apart
        give_back_free_memory()

    def load(self, index: int, block: nn.Module) -> None:
        prefix = self._prefix(index)
        block.load_state_dict({name: self.read(prefix + name) for name, _ in block.named_parameters()}, assign=True)

    def release(self, index: int, block: nn.Module, pruner) -> None:
        prefix = self._prefix(index)
        state = {prefix + name: tensor.detach() for name, tensor in block.state_dict().items()}
        self.writer.write(state, {name: grid for name, grid in pruner.grids.items() if name.startswith(prefix)})
        for module in block.modules():
            pruner.masks.pop(pruner.names.get(module), None)
        self.unload(index, block)

    def unload(self, index: int, block: nn.Module) -> None:
        """Free block `index`'s weights, and their packed copies, without writing them."""
        modules = set(block.modules())
        for module in modules:
            packed = getattr(module, "packed", None)
            if packed is not None:
                packed.forget(modules)
                break
        block.to("meta")
        give_back_free_memory()  # else the heap keeps each block's freed temporaries and grows block by block

    def resume(self, checkpoint: ResumeCheckpoint, pruner) -> tuple[int, list[Tensor] | None]:
        """Write the blocks a checkpoint holds from it (the source's copies are never read) and restore
        the run's per-layer reports and grids; return (next block, its inputs)."""
        start, hidden = checkpoint.resume_point(pruner.layers)
        modules = dict(self.model.named_modules())
        for index in range(start):
            prefix = self._prefix(index)
            pruned, grids = checkpoint.block(index, modules)
            names = [prefix + name for name, _ in self.blocks[index].named_parameters()]
            self.writer.write({name: pruned[name] if name in pruned else self.read(name) for name in names}, grids)
            pruner.grids.update(grids)
        return start, hidden

    def write_outside(self, specs: dict[str, TensorSpec], grids: dict) -> None:
        """Write every tensor outside the blocks: the model's (pruned or quantized as the run left them),
        the rest as stored."""
        inside = self.path + "."
        params = dict(self.model.named_parameters())
        outside = {name: params[name].detach() if name in params else self.read(name)
                   for name in specs if not name.startswith(inside)}
        self.writer.write(outside, {name: grid for name, grid in grids.items() if f"{name}.weight" in outside})


@dataclass(frozen=True)
class MemoryBound:
    """What a streamed prune holds at once, in bytes: the calibration activations (a block's inputs and
    outputs for all windows) throughout; beside them, while a block is pruned, the largest block and
    the layer statistics of one block (Gram matrices for SparseGPT and the refitting steps), or, before
    the first block and after the last, the weights outside the blocks (embeddings, output layer)."""

    block: int
    outside: int
    activations: int
    statistics: int

    @property
    def total(self) -> int:
        return max(self.block + self.statistics, self.outside) + self.activations

    def to_dict(self) -> dict:
        return {"block": self.block, "outside_blocks": self.outside, "activations": self.activations,
                "statistics": self.statistics, "total": self.total}


def memory_bound(source: str | Path, config: PruneConfig, calibration_shape: tuple[int, int] | None,
                 dtype: torch.dtype | None = None) -> MemoryBound:
    """The memory a streamed prune of `source` should need (see `MemoryBound`), from the weights' headers.

    Raises:
        ValueError: a model family with no known block layout.

    Example:
        >>> memory_bound("llama-7b", PruneConfig(method="wanda"), (64, 512)).total / 1e9
    """
    with ShardedWeights(source) as weights:
        dtype = dtype or stored_dtype(weights)
        model = _skeleton(Path(source), weights, dtype)
        blocks, size = find_blocks(model), dtype.itemsize
        if blocks is None:
            raise ValueError(f"sparsetorch knows no block layout for model type {model_type(model)!r}")
        path = family_of(model).blocks + "."
        per_block = [sum(p.numel() for p in block.parameters()) * size for block in blocks]
        outside = sum(weights.spec(name).numel * size for name in weights.keys() if not name.startswith(path))
    windows, tokens = calibration_shape or (0, 0)
    activations = 2 * windows * tokens * model.config.hidden_size * size
    statistics = 0
    if config.statistic is Gram:
        targets = find_targets(blocks[0], config.targets, config.ignore).values()
        statistics = sum(m.weight.shape[1] ** 2 * 4 for m in targets)  # fp32, one per layer at most
    return MemoryBound(max(per_block), outside, activations, statistics)


def _skeleton(source: Path, weights: ShardedWeights, dtype: torch.dtype) -> nn.Module:
    """The model of `source` on the meta device: sparsetorch's own where it computes the family (no
    transformers model class imported), else transformers'.

    Raises:
        ValueError: `source` is not a causal language model.
    """
    try:
        hf_config = _source_config(source, dtype)
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    try:
        return _lean_skeleton(hf_config, weights, dtype, None)
    except NotImplementedError:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
