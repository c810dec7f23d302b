"""Recovery of a pruned LLM by sparse distillation from the dense model it was pruned from.

    report = recover(student, teacher, windows, steps=500, lr=1e-4)

The student is a Hugging Face causal LM pruned one-shot; its zero weights are its mask. It
trains to match the dense teacher (Kurtic et al., 2023: KL on the logits plus SquareHead's
per-block normalized MSE, see `distill.py`), not the text: the LM loss is off by default. The
masks are fixed through the `Sparsifier` (`OneShot()` started from the student's own zeros), so
pruned weights, their gradients and their AdamW moments stay exactly zero.

A run is deterministic given its seed: the windows are shuffled per epoch by a seeded generator,
and a checkpoint (student weights, optimizer, scheduler, Sparsifier state, RNG state, step)
written every K steps lets an interrupted run resume to the bit-identical result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsetorch.checks import check_int, check_number
from sparsetorch.families import find_blocks, model_type
from sparsetorch.formats.checkpoint import atomic_directory
from sparsetorch.precision import calibration_precision, full_precision
from sparsetorch.targets import find_targets
from sparsetorch.training.distill import block_outputs, feature_loss, kl_to_teacher, lm_loss
from sparsetorch.training.schedules import OneShot
from sparsetorch.training.sparsifier import DEFAULT_TARGETS, Sparsifier, is_sparse_trainable

__all__ = ["AUTOCAST", "RecoverConfig", "RecoverReport", "StaleRecoveryError", "check_teacher", "recover",
           "warmup_cosine"]

# recover's autocast choice -> precision.py's: 'auto' is bf16 where the hardware multiplies it natively
AUTOCAST: dict[str, str] = {"auto": "auto", "bf16": "bfloat16", "off": "model"}
PARTS: tuple[str, ...] = ("kl", "feature", "lm")
# config keys that change what a model computes without changing any weight's shape
_ARCHITECTURE_KEYS = ("model_type", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                      "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings")
_SAMPLES = 4096  # values hashed per parameter for a model's identity
_WEIGHTS, _STATE, _PROGRESS = "student.safetensors", "state.pt", "progress.json"


@dataclass(frozen=True, kw_only=True)
class RecoverConfig:
    """What a recovery run does; everything that changes its result (so a checkpoint matches only it).

    Args:
        steps: optimizer steps.
        lr: peak AdamW learning rate, reached after `warmup` steps, then cosine decay towards 0.
        batch_size: windows per forward.
        accumulation: forwards whose gradients sum into one optimizer step.
        warmup: steps of linear warmup.
        weight_decay: AdamW's decoupled weight decay (a pruned weight stays 0 under it).
        max_grad_norm: clip the gradient norm to this before each step; None: no clipping.
        kl_weight: weight of KL(teacher || student) on the logits.
        feature_weight: weight of the mean per-block normalized MSE (SquareHead).
        lm_weight: weight of the next-token loss on the text itself.
        temperature: softens both distributions of the KL term.
        autocast: 'auto' (bf16 where the CPU or GPU multiplies it natively), 'bf16' or 'off'.
        seed: seeds the window order and any dropout.
        blocks: dotted path of the decoder blocks, for families sparsetorch does not know.
        targets: layers whose zeros are the mask (default: every Linear and Conv layer).
        ignore: layers that train dense (default: lm_head).

    Raises:
        ValueError: a value out of range, naming it and the allowed range.
    """

    steps: int
    lr: float = 1e-4
    batch_size: int = 4
    accumulation: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    kl_weight: float = 1.0
    feature_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    autocast: str = "auto"
    seed: int = 0
    blocks: str | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.accumulation, "accumulation", 1)
        check_int(self.warmup, "warmup", 0)
        check_int(self.seed, "seed", 0)
        check_number(self.lr, "lr", 0.0, strict=True)
        check_number(self.temperature, "temperature", 0.0, strict=True)
        check_number(self.weight_decay, "weight_decay", 0.0, strict=False)
        if self.max_grad_norm is not None:
            check_number(self.max_grad_norm, "max_grad_norm", 0.0, strict=True)
        for name in ("kl_weight", "feature_weight", "lm_weight"):
            check_number(getattr(self, name), name, 0.0, strict=False)
        if self.kl_weight == self.feature_weight == self.lm_weight == 0:
            raise ValueError("kl_weight, feature_weight and lm_weight are all 0: give at least one loss a weight > 0")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {list(AUTOCAST)}, got {self.autocast!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def loss_weights(self) -> dict[str, float]:
        """{'kl': ..., 'feature': ..., 'lm': ...}: the weight of each loss term."""
        return {"kl": self.kl_weight, "feature": self.feature_weight, "lm": self.lm_weight}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; `RecoverConfig(**data)` reads it back equal."""
        data = dataclasses.asdict(self)
        data["ignore"] = list(self.ignore)
        data["targets"] = None if self.targets is None else list(self.targets)
        return data


@dataclass
class RecoverReport:
    """What `recover` did.

    Attributes:
        config: the run's settings.
        steps: optimizer steps done in all, those before a resume included.
        resumed_from: the step this call started from (0: a fresh run).
        seconds: wall time of this call's steps.
        tokens: student tokens this call trained on.
        losses: the total loss of every step, before a resume included.
        parts: each loss term ('kl', 'feature', 'lm') of every step, unweighted.
    """

    config: RecoverConfig
    steps: int
    resumed_from: int
    seconds: float
    tokens: int
    losses: list[float]
    parts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Student tokens per second of this call's steps (teacher forward included)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return {"config": self.config.to_dict(), "steps": self.steps, "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 3), "tokens": self.tokens,
                "tokens_per_second": round(self.tokens_per_second, 2), "losses": self.losses, "parts": self.parts}


class StaleRecoveryError(ValueError):
    """A checkpoint directory that holds a run of other settings, windows or models."""


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor of update `step` (0-based): linear warmup to 1 over `warmup` updates,
    then cosine decay towards 0 at `steps`.

    Example:
        >>> [round(warmup_cosine(s, 6, 2), 2) for s in range(6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher that is not the dense model of the student's architecture.

    Raises:
        ValueError: the parameters differ in name or shape, or an architecture setting differs
            (attention heads, activation, rotary settings, tied embeddings), naming the first difference.
    """
    ours = {name: tuple(p.shape) for name, p in student.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in teacher.named_parameters()}
    for name in [*ours, *(name for name in theirs if name not in ours)]:  # the first difference in model order
        if ours.get(name) != theirs.get(name):
            raise ValueError(f"student and teacher do not match: {name} is {ours.get(name, 'missing')} in the student "
                             f"and {theirs.get(name, 'missing')} in the teacher; the teacher must be the dense model "
                             "the student was pruned from")
    configs = [getattr(getattr(m, "config", None), "to_dict", dict)() for m in (student, teacher)]
    for key in _ARCHITECTURE_KEYS:
        if configs[0].get(key) != configs[1].get(key):
            raise ValueError(f"student and teacher configs differ in {key}: {configs[0].get(key)!r} vs "
                             f"{configs[1].get(key)!r}; the teacher must be the dense model the student was pruned from")


def _check_windows(windows: Tensor, student: nn.Module, config: RecoverConfig) -> None:
    if not torch.is_tensor(windows) or windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be an (n, tokens >= 2) LongTensor of token ids, got "
                         f"{getattr(windows, 'dtype', type(windows).__name__)} of shape {tuple(getattr(windows, 'shape', ()))}")
    if windows.shape[0] < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} needs at least that many windows, got {windows.shape[0]}")
    vocab = student.get_input_embeddings().num_embeddings
    if windows.min() < 0 or windows.max() >= vocab:
        raise ValueError(f"windows hold token ids outside [0, {vocab}): was the text tokenized for another model?")


def _identity(model: nn.Module) -> str:
    """A hash of every parameter's name, shape and dtype and of evenly spaced values of it."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        flat = param.detach().reshape(-1)
        count = min(_SAMPLES, flat.numel())
        picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(flat[picks].float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _WindowOrder:
    """The window of each position of the training stream: a seeded shuffle per epoch."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.generator, self.epochs = count, torch.Generator().manual_seed(seed), []

    def batch(self, start: int, size: int) -> Tensor:
        """Indices of stream positions start .. start + size - 1."""
        return torch.tensor([self._at(position) for position in range(start, start + size)])

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        while len(self.epochs) <= epoch:
            self.epochs.append(torch.randperm(self.count, generator=self.generator).tolist())
        return self.epochs[epoch][offset]


class _Trainer:
    """One recovery run: the optimizer, schedule, fixed masks and the step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, windows: Tensor, config: RecoverConfig) -> None:
        self.student, self.teacher, self.windows, self.config = student, teacher, windows, config
        self.device = next(student.parameters()).device
        self.order = _WindowOrder(windows.shape[0], config.seed)
        self.blocks = self._blocks()
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup))
        targets = DEFAULT_TARGETS if config.targets is None else config.targets
        layers = find_targets(student, targets, config.ignore, prunable=is_sparse_trainable)
        masks = {name: module.weight != 0 for name, module in layers.items()}
        self.sparsifier = Sparsifier(student, OneShot(), targets=targets, ignore=config.ignore,
                                     optimizer=self.optimizer, masks=masks, seed=config.seed)
        self.losses: list[float] = []
        self.parts: dict[str, list[float]] = {part: [] for part in PARTS}

    def _blocks(self) -> tuple[nn.ModuleList, nn.ModuleList] | None:
        if self.config.feature_weight == 0:
            return None
        student = find_blocks(self.student, self.config.blocks)
        if student is None:
            raise ValueError(f"no block layout known for model type {model_type(self.student)!r}, so the feature loss "
                             "has no blocks to match: pass blocks='path.to.layers' or feature_weight=0")
        return student, find_blocks(self.teacher, self.config.blocks)

    def _precision(self):
        return calibration_precision(self.student, AUTOCAST[self.config.autocast])

    def _hidden(self, index: int):
        return nullcontext([]) if self.blocks is None else block_outputs(self.blocks[index])

    def _loss(self, ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The weighted loss of one batch of windows (B, T) and its unweighted terms."""
        config = self.config
        with self._precision():
            with torch.no_grad(), self._hidden(1) as teacher_hidden:
                teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, vocab)
            with self._hidden(0) as student_hidden:
                student_logits = self.student(input_ids=ids, use_cache=False).logits
        terms: dict[str, Tensor] = {}
        with full_precision(ids.device):
            if config.kl_weight:
                terms["kl"] = kl_to_teacher(student_logits, teacher_logits, config.temperature)
            if config.feature_weight:
                terms["feature"] = feature_loss(student_hidden, teacher_hidden)
            if config.lm_weight:
                terms["lm"] = lm_loss(student_logits, ids)
            total = sum(config.loss_weights[name] * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def step(self, step: int) -> float:
        """One optimizer step of `accumulation` forwards; returns its loss."""
        config = self.config
        total, parts = 0.0, dict.fromkeys(PARTS, 0.0)
        for micro in range(config.accumulation):
            start = (step * config.accumulation + micro) * config.batch_size
            ids = self.windows[self.order.batch(start, config.batch_size)].to(self.device)
            loss, terms = self._loss(ids)
            (loss / config.accumulation).backward()
            total += float(loss.detach()) / config.accumulation
            for name, value in terms.items():
                parts[name] += value / config.accumulation
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], config.max_grad_norm)
        self.optimizer.step()
        self.sparsifier.step()  # after the optimizer: pruned weights back to exact zeros
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(total)
        for name in PARTS:
            self.parts[name].append(parts[name])
        return total

    # ---- checkpoints -------------------------------------------------------------------

    def save(self, directory: Path, step: int, fingerprint: dict) -> None:
        """Everything a resumed run needs, written to a fresh directory renamed into place."""
        with atomic_directory(directory, overwrite=True) as staging:
            save_model(self.student, str(staging / _WEIGHTS))  # weights and mask buffers
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "sparsifier": self.sparsifier.state_dict(), "rng": _rng_state(self.device),
                        "losses": self.losses, "parts": self.parts}, staging / _STATE)
            (staging / _PROGRESS).write_text(json.dumps({"step": step, "fingerprint": fingerprint}, indent=2))

    def load(self, directory: Path, fingerprint: dict) -> int:
        """Restore a checkpoint of this very run; return the steps it had done."""
        try:
            progress = json.loads((directory / _PROGRESS).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StaleRecoveryError(f"recovery checkpoint {directory} cannot be read ({err}); delete it to "
                                     "start afresh") from None
        differ = [key for key in fingerprint if progress.get("fingerprint", {}).get(key) != fingerprint[key]]
        if differ:
            raise StaleRecoveryError(f"recovery checkpoint {directory} was written by a run with other {', '.join(differ)}; "
                                     "delete it to start afresh, or use the settings, windows and models it was made with")
        load_model(self.student, directory / _WEIGHTS, strict=True, device=str(self.device))
        state = torch.load(directory / _STATE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sparsifier.load_state_dict(state["sparsifier"])
        _set_rng_state(state["rng"], self.device)
        self.losses, self.parts = list(state["losses"]), {k: list(v) for k, v in state["parts"].items()}
        return int(progress["step"])


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """The random state dropout draws from: the CPU generator's, and the GPU's when training there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _fingerprint(student: nn.Module, teacher: nn.Module, windows: Tensor, config: RecoverConfig) -> dict:
    windows_hash = hashlib.sha256(windows.contiguous().cpu().numpy().tobytes()).hexdigest()
    return {"config": config.to_dict(), "windows": f"{tuple(windows.shape)} {windows_hash}",
            "student": _identity(student), "teacher": _identity(teacher)}


@contextmanager
def _training(student: nn.Module, teacher: nn.Module) -> Iterator[None]:
    """Student in train mode, teacher in eval mode with no gradients; both modes restored after."""
    modes = student.training, teacher.training
    grads = [p.requires_grad for p in teacher.parameters()]
    student.train()
    teacher.eval().requires_grad_(False)
    try:
        yield
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
        for param, flag in zip(teacher.parameters(), grads):
            param.requires_grad_(flag)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    config: RecoverConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    **options: Any,
) -> RecoverReport:
    """Train a pruned `student` in place to match its dense `teacher`, keeping every pruned weight zero.

    Args:
        student: a pruned Hugging Face causal LM; its zero weights in the target layers are the mask.
        teacher: the dense model it was pruned from (left unchanged).
        windows: (n, tokens) token ids to train on, e.g. consecutive windows of calibration text.
        config: a RecoverConfig; or pass its fields as keyword options instead (`steps=...`).
        checkpoint: a directory to save progress in every `checkpoint_every` steps; a checkpoint
            of the same run found there is resumed, to the bit-identical result.
        checkpoint_every: steps between checkpoints.
        progress: show a progress bar with the loss.

    Returns:
        RecoverReport: steps, seconds, tokens/s and the loss curve.

    Raises:
        ValueError: bad options, windows or a teacher that does not match the student.
        StaleRecoveryError: `checkpoint` holds a run of other settings, windows or models.
        TypeError: both `config` and keyword options.

    Example:
        >>> report = recover(pruned, dense, windows, steps=200, lr=1e-4, batch_size=2)
        >>> report.losses[0] > report.losses[-1]
        True
    """
    if config is None:
        config = RecoverConfig(**options)
    elif options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    check_int(checkpoint_every, "checkpoint_every", 1)
    check_teacher(student, teacher)
    _check_windows(windows, student, config)
    fingerprint = _fingerprint(student, teacher, windows, config) if checkpoint is not None else {}
    device = next(student.parameters()).device
    devices = [device] if device.type == "cuda" else []  # fork_rng forks the CPU generator always
    with torch.random.fork_rng(devices=devices), _training(student, teacher):
        torch.manual_seed(config.seed)
        trainer = _Trainer(student, teacher, windows, config)
        try:
            return _run(trainer, checkpoint, checkpoint_every, fingerprint, progress)
        finally:
            trainer.sparsifier.finalize()  # plain weights with exact zeros; hooks and mask buffers go


def _run(trainer: _Trainer, checkpoint: str | Path | None, every: int, fingerprint: dict, progress: bool) -> RecoverReport:
    config = trainer.config
    directory = None if checkpoint is None else Path(checkpoint)
    start = trainer.load(directory, fingerprint) if directory is not None and (directory / _PROGRESS).exists() else 0
    started = time.perf_counter()
    with tqdm(total=config.steps, initial=start, desc="recover", disable=not progress) as bar:
        for step in range(start, config.steps):
            loss = trainer.step(step)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            if directory is not None and (step + 1) % every == 0:
                trainer.save(directory, step + 1, fingerprint)
    seconds = time.perf_counter() - started
    tokens = (config.steps - start) * config.accumulation * config.batch_size * trainer.windows.shape[1]
    parts = {name: values for name, values in trainer.parts.items() if config.loss_weights[name]}
    return RecoverReport(config=config, steps=config.steps, resumed_from=start, seconds=seconds, tokens=tokens,
                         losses=trainer.losses, parts=parts)
