"""Train small models sparse on bundled data: sklearn's digits, and Shakespeare by character.

Used by `sparsetorch train-demo`, the examples and `benchmarks/sparse_training.py`. One
loop serves every method: forward, backward, clip, `optimizer.step()`, then the
stepper's `step()` (a Sparsifier, or any object with `step()`), then `zero_grad()`. The
learning rate warms up linearly for 5% of the run and follows a cosine down to 10%; for
iterative pruning it restarts with every round, as weight rewinding requires.

Every run counts its training FLOPs (`FlopMeter`): the Linear and convolution layers'
forward and backward passes at their density, so that methods can be compared at equal
compute as well as at equal steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetorch.checks import check_int
from sparsetorch.data import demo_text
from sparsetorch.patterns import check_sparsity
from sparsetorch.training.method import MASK
from sparsetorch.training.recipes import Recipe, recipe
from sparsetorch.training.schedules import Iterative, OneShot
from sparsetorch.training.sparsifier import CONVOLUTIONS, INITS, Sparsifier
from sparsetorch.training.toys import DigitsCNN, DigitsMLP, TinyGPT

__all__ = [
    "CharCorpus",
    "FlopMeter",
    "GPTShape",
    "RunResult",
    "TrainConfig",
    "char_corpus",
    "digits_data",
    "gpt_loss",
    "layer_rows",
    "plot_curves",
    "retrain_gpt",
    "run_digits",
    "run_gpt",
    "train_loop",
]

DIGITS_MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": DigitsCNN, "mlp": DigitsMLP}


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        method: a recipe name ('dense', 'static', 'gmp', 'set', 'rigl', 'srigl', 'srste', ...).
        sparsity: global sparsity for the methods that take one (N:M recipes imply theirs).
        steps: optimizer steps.
        seed: seeds the model, the batches and the masks.
        batch_size: examples (digits) or windows (GPT) per step.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        eval_every: steps between evaluations for the curve.
        bf16: run training forward passes under `torch.autocast` in bfloat16 (evaluation
            stays float32).
        init: the Sparsifier's initialization: 'sparse' rescales random initial masks to
            each unit's fan-in, 'keep' leaves the dense initialization as it is.
    """

    method: str = "rigl"
    sparsity: float = 0.9
    steps: int = 300
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    eval_every: int = 50
    bf16: bool = False
    init: str = "sparse"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("steps", "batch_size", "eval_every"):
            check_int(getattr(self, name), name, 1)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        recipe(self.method, max(self.steps, 2), self.sparsity)


@dataclass(frozen=True)
class GPTShape:
    """Size of the tiny GPT: width, blocks, heads and context length (characters)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 64


@dataclass
class RunResult:
    """What one run measured. `curve` holds (step, metric) pairs; the metric is validation
    loss for the GPT and test loss for digits. `flops` holds the training FLOPs spent by
    each point of the curve (empty where the stepper cannot count them)."""

    label: str
    curve: list[tuple[int, float]]
    final: float
    sparsity: float
    seconds: float
    accuracy: float | None = None
    info: dict = field(default_factory=dict)
    flops: list[int] = field(default_factory=list)

    def flops_curve(self) -> list[tuple[int, float]]:
        """(training FLOPs, metric) pairs, for plotting against compute."""
        return [(flops, value) for flops, (_, value) in zip(self.flops, self.curve)]


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of `steps`, then a cosine from `peak` down to 10% of it."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_at: Callable[[int], Tensor],
    config: TrainConfig,
    evaluate: Callable[[], float],
    stepper: object | None = None,
    period: int | None = None,
) -> list[tuple[int, float]]:
    """Train for `config.steps` steps and return the evaluation curve.

    Args:
        model: the model (put in train mode for steps, eval mode to evaluate).
        optimizer: its optimizer; the learning rate is set every step.
        loss_at: step -> the training loss of that step's batch.
        config: steps, lr and evaluation interval.
        evaluate: () -> the metric for the curve.
        stepper: called with `.step()` after `optimizer.step()` (a Sparsifier).
        period: restart the learning-rate schedule every `period` steps (IMP rounds).
    """
    curve = [(0, evaluate())]
    period = period or config.steps
    for step in range(config.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step % period, period, config.lr)
        loss_at(step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if stepper is not None:
            stepper.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curve.append((step + 1, evaluate()))
    return curve


def make_sparsifier(model: nn.Module, optimizer: torch.optim.Optimizer, plan: Recipe, seed: int,
                    ignore: Sequence[str] | None = None, init: str = "sparse") -> Sparsifier | None:
    """The Sparsifier for a recipe (None for dense)."""
    if plan.schedule is None:
        return None
    return Sparsifier(model, plan.schedule, pattern=plan.pattern, distribution=plan.distribution,
                      ignore=ignore, optimizer=optimizer, seed=seed, init=init)


@contextmanager
def _recording_rows(model: nn.Module) -> Iterator[dict[str, int]]:
    """Forward hooks that record, per Linear or convolution, the rows of its output
    (all output elements over output features or channels); always removed."""
    rows: dict[str, int] = {}

    def hook(name: str, width: int) -> Callable:
        return lambda module, args, output: rows.__setitem__(name, output.numel() // width)

    handles = [module.register_forward_hook(hook(name, module.weight.shape[0]))
               for name, module in model.named_modules() if isinstance(module, (nn.Linear, *CONVOLUTIONS))]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_rows(model: nn.Module, example: Tensor) -> dict[str, int]:
    """{layer name: rows it computes for the batch `example`} for every Linear and
    convolution: tokens (batch x sequence) for a Linear, batch x output positions for a
    convolution, as `Sparsifier.step(tokens=...)` takes them.

    Example:
        >>> layer_rows(DigitsCNN(), torch.zeros(64, 64))
        {'conv1': 4096, 'conv2': 4096, 'fc': 64, 'head': 64}
    """
    with _recording_rows(model) as rows:
        model(example)
    return dict(rows)


class FlopMeter:
    """Steps a run's Sparsifier with the batch's rows and adds up training FLOPs: the
    Sparsifier's count for its target layers, dense forward and backward (3 x 2 x weights
    per row) for the layers it leaves dense, so dense and sparse runs count the same layers.

    Args:
        model: the model being trained.
        sparsifier: its Sparsifier, or None for a dense run.
        rows: `layer_rows` of one training batch.
    """

    def __init__(self, model: nn.Module, sparsifier: Sparsifier | None, rows: dict[str, int]) -> None:
        self.sparsifier = sparsifier
        targets = set() if sparsifier is None else {layer.name for layer in sparsifier.layers}
        self.tokens = {name: count for name, count in rows.items() if name in targets}
        modules = dict(model.named_modules())
        self.dense_per_step = sum(6 * modules[name].weight.numel() * count for name, count in rows.items()
                                  if name not in targets)
        self.steps = 0

    def step(self) -> bool:
        """One training step: the Sparsifier's `step`, counted."""
        self.steps += 1
        return False if self.sparsifier is None else self.sparsifier.step(tokens=self.tokens)

    @property
    def total(self) -> int:
        """Training FLOPs so far."""
        sparse = 0 if self.sparsifier is None else self.sparsifier.training_flops
        return sparse + self.steps * self.dense_per_step


def _period(plan: Recipe) -> int | None:
    return plan.schedule.round_steps if isinstance(plan.schedule, Iterative) else None


def _sparsity(sparsifier: Sparsifier | None) -> float:
    if sparsifier is None:
        return 0.0
    pruned = sum(int((~layer.mask).sum()) for layer in sparsifier.layers)
    return pruned / sum(layer.mask.numel() for layer in sparsifier.layers)


# ---- digits ------------------------------------------------------------------------------


def digits_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits scaled to [0, 1], split 80/20 by a fixed permutation.

    Returns:
        x_train (n, 64), y_train (n,), x_test, y_test.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = len(y) * 4 // 5
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def run_digits(config: TrainConfig, model_kind: str = "cnn") -> RunResult:
    """Train a digits CNN or MLP with SGD (momentum 0.9, Nesterov) under `config.method`.

    Raises:
        ValueError: unknown model kind or method.
    """
    if model_kind not in DIGITS_MODELS:
        raise ValueError(f"unknown digits model {model_kind!r}; choose from {sorted(DIGITS_MODELS)}")
    x_train, y_train, x_test, y_test = digits_data()
    torch.manual_seed(config.seed)
    model = DIGITS_MODELS[model_kind]()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    plan = recipe(config.method, config.steps, config.sparsity)
    ignore = ["conv1"] if plan.pattern and ":" in plan.pattern else None  # 1 input channel cannot hold N:M
    sparsifier = make_sparsifier(model, optimizer, plan, config.seed, ignore, config.init)
    meter = FlopMeter(model, sparsifier, layer_rows(model, x_train[: config.batch_size]))
    flops: list[int] = []
    batches = torch.Generator().manual_seed(config.seed)

    def loss_at(step: int) -> Tensor:
        index = torch.randint(0, len(y_train), (config.batch_size,), generator=batches)
        return F.cross_entropy(model(x_train[index]), y_train[index])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        flops.append(meter.total)
        return F.cross_entropy(model(x_test), y_test).item()

    started = time.perf_counter()
    curve = train_loop(model, optimizer, loss_at, config, evaluate, meter, _period(plan))
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return RunResult(config.method, curve, curve[-1][1], _sparsity(sparsifier), time.perf_counter() - started, accuracy,
                     flops=flops)


# ---- Shakespeare by character ------------------------------------------------------------


@dataclass(frozen=True)
class CharCorpus:
    """Character ids of the training plays and the held-out plays."""

    vocab: str
    train: Tensor
    val: Tensor
    source: str


def _encode(text: str, vocab: str) -> Tensor:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


def char_corpus() -> CharCorpus:
    """The bundled split of `sparsetorch.data.demo_text()` as character ids: the plays
    held out there (Hamlet, Macbeth, Othello) are the validation text."""
    split = demo_text()
    vocab = "".join(sorted(set(split.calibration) | set(split.evaluation)))
    return CharCorpus(vocab, _encode(split.calibration, vocab), _encode(split.evaluation, vocab), split.source)


def _windows(ids: Tensor, count: int, length: int) -> Tensor:
    """`count` evenly spaced windows of `length` + 1 ids: (count, length + 1)."""
    starts = torch.linspace(0, ids.numel() - length - 2, count).long()
    return torch.stack([ids[s : s + length + 1] for s in starts.tolist()])


@torch.no_grad()
def gpt_loss(model: nn.Module, ids: Tensor, windows: int = 64) -> float:
    """Mean next-character cross-entropy of a tiny GPT over `windows` evenly spaced windows
    of `ids`, each `model.context` characters long, in float32 and eval mode.

    Example:
        >>> gpt_loss(model, char_corpus().val)   # the benchmark's validation loss
    """
    model.eval()
    val = _windows(ids, windows, model.context)  # (windows, context + 1)
    losses = [F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()).item() for w in val.split(16)]
    return float(np.mean(losses))


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)


def run_gpt(config: TrainConfig, shape: GPTShape = GPTShape(), corpus: CharCorpus | None = None,
            eval_windows: int = 64, stepper_factory: Callable | None = None) -> RunResult:
    """Train the tiny GPT on the training plays with AdamW; validation loss on held-out plays.

    Args:
        config: method, steps, seed, batch size, lr, weight decay.
        shape: model size.
        corpus: the encoded text (default: `char_corpus()`).
        eval_windows: held-out windows of `shape.context` characters for the validation loss.
        stepper_factory: (model, optimizer) -> an object with `step()`, replacing the
            recipe's Sparsifier (the benchmark's torch.ao peer uses this).

    Returns:
        The run's result; `info["stepper"]` holds the Sparsifier (None for dense), whose
        `model` is the trained model.
    """
    corpus = corpus or char_corpus()
    torch.manual_seed(config.seed)
    model = TinyGPT(len(corpus.vocab), shape.width, shape.layers, shape.heads, shape.context)
    optimizer = _adamw(model, config)
    plan = recipe(config.method, config.steps, config.sparsity)
    if stepper_factory:
        stepper = stepper_factory(model, optimizer)
    else:
        stepper = make_sparsifier(model, optimizer, plan, config.seed, init=config.init)
    return _fit_gpt(model, optimizer, stepper, config, corpus, eval_windows, _period(plan),
                    counted=stepper_factory is None)


def retrain_gpt(start: Mapping[str, Tensor], masks: Mapping[str, Tensor], config: TrainConfig, shape: GPTShape = GPTShape(),
                corpus: CharCorpus | None = None, eval_windows: int = 64) -> RunResult:
    """Train a pruned tiny GPT further with its masks fixed (a sparse model soup's ingredient).

    Args:
        start: the pruned model's state dict, for a TinyGPT of `shape` over `corpus.vocab`;
            mask buffers in it (`<layer>.weight_mask`) are ignored, `masks` sets them.
        masks: {layer name: boolean keep-mask} of every sparse layer, e.g. the pruning
            run's `Sparsifier.masks()`; they stay fixed.
        config: steps, seed (of the batch order), lr, weight decay; its method and
            sparsity are not used.
        shape: model size.
        corpus: the encoded text (default: `char_corpus()`).
        eval_windows: held-out windows for the validation loss.

    Returns:
        The run's result, labelled 'retrain'; `info["stepper"].model` is the trained model.

    Raises:
        ValueError: masks that miss a sparse layer or do not fit its weight.

    Example:
        >>> pruned = run_gpt(TrainConfig(method="gmp", lr=2e-3)).info["stepper"]
        >>> retrain_gpt(pruned.model.state_dict(), pruned.masks(), TrainConfig(method="dense", seed=1, lr=2e-3))
    """
    corpus = corpus or char_corpus()
    torch.manual_seed(config.seed)
    model = TinyGPT(len(corpus.vocab), shape.width, shape.layers, shape.heads, shape.context)
    model.load_state_dict({key: value for key, value in start.items() if key.rsplit(".", 1)[-1] != MASK})
    optimizer = _adamw(model, config)
    sparsifier = Sparsifier(model, OneShot(), masks=masks, optimizer=optimizer, seed=config.seed)
    result = _fit_gpt(model, optimizer, sparsifier, config, corpus, eval_windows)
    result.label = "retrain"
    return result


def _fit_gpt(model: TinyGPT, optimizer: torch.optim.Optimizer, stepper: object | None, config: TrainConfig,
             corpus: CharCorpus, eval_windows: int, period: int | None = None, counted: bool = True) -> RunResult:
    """The GPT training loop of `run_gpt` and `retrain_gpt`: batches seeded by `config.seed`,
    FLOPs counted where `stepper` is a Sparsifier or None (`counted`)."""
    meter = None
    if counted:
        example = torch.zeros(config.batch_size, model.context, dtype=torch.long)
        meter = FlopMeter(model, stepper, layer_rows(model, example))
    flops: list[int] = []
    batches = torch.Generator().manual_seed(config.seed)

    def loss_at(step: int) -> Tensor:
        starts = torch.randint(0, corpus.train.numel() - model.context - 1, (config.batch_size,), generator=batches)
        chunk = torch.stack([corpus.train[s : s + model.context + 1] for s in starts.tolist()])  # (B, T + 1)
        with torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(chunk[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())

    def evaluate() -> float:
        if meter is not None:
            flops.append(meter.total)
        return gpt_loss(model, corpus.val, eval_windows)

    started = time.perf_counter()
    curve = train_loop(model, optimizer, loss_at, config, evaluate, meter or stepper, period)
    sparsity = _sparsity(stepper) if stepper is None or isinstance(stepper, Sparsifier) else float("nan")
    return RunResult(config.method, curve, curve[-1][1], sparsity, time.perf_counter() - started,
                     info={"stepper": stepper}, flops=flops)


def plot_curves(runs: dict[str, list[list[tuple[int, float]]]], path: str | Path, ylabel: str, title: str = "",
                xlabel: str = "step") -> Path:
    """One line per label (the mean over its runs, with a min-max band), saved as PNG.
    The curves' x values are steps, or training FLOPs (`RunResult.flops_curve`) with
    `xlabel` saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, curves in runs.items():
        steps = [step for step, _ in curves[0]]
        values = np.array([[value for _, value in curve] for curve in curves])
        ax.plot(steps, values.mean(axis=0), label=label)
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the train-demo command --------------------------------------------------------------

TASK_DEFAULTS: dict[str, dict] = {
    "digits": {"steps": 300, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, "eval_every": 50},
    "gpt": {"steps": 200, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05, "eval_every": 50},
}


def train_demo(task: str, methods: Sequence[str], *, sparsity: float = 0.9, steps: int | None = None, seed: int = 0,
               model: str = "cnn", shape: GPTShape = GPTShape(width=128), init: str = "sparse") -> list[RunResult]:
    """Train one model per method on the task's bundled data, same seed and batches for all.

    Args:
        task: 'digits' (sklearn digits, CNN or MLP) or 'gpt' (Shakespeare characters).
        methods: recipe names, e.g. ['dense', 'rigl', 'srste'].
        sparsity: global sparsity of the unstructured methods.
        steps: optimizer steps (default: 300 for digits, 200 for gpt).
        seed: one seed for every run.
        model: 'cnn' or 'mlp' (digits).
        shape: GPT size (gpt).
        init: 'sparse' (rescale random initial masks to each unit's fan-in) or 'keep'.

    Raises:
        ValueError: unknown task, model, method or init, or bad numbers.

    Example:
        >>> [r.accuracy for r in train_demo("digits", ["dense", "rigl"], steps=100)]
    """
    if task not in TASK_DEFAULTS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_DEFAULTS)}")
    settings = dict(TASK_DEFAULTS[task], seed=seed, sparsity=sparsity, init=init)
    if steps is not None:
        settings["steps"] = steps
    configs = [TrainConfig(method=method, **settings) for method in methods]  # validate every method first
    corpus = char_corpus() if task == "gpt" else None
    return [run_digits(config, model) if task == "digits" else run_gpt(config, shape, corpus) for config in configs]


def results_table(results: Sequence[RunResult], metric: str) -> str:
    """A markdown table: method, measured sparsity, final metric (and ratio to the first row),
    accuracy, training FLOPs of the Linear and convolution layers."""
    base = results[0].final
    lines = [f"| method | sparsity | {metric} | vs {results[0].label} | accuracy | train FLOPs | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        accuracy = "–" if r.accuracy is None else f"{r.accuracy:.3f}"
        flops = f"{r.flops[-1]:.3g}" if r.flops else "–"
        lines.append(f"| {r.label} | {r.sparsity:.1%} | {r.final:.4f} | {r.final / base:.3f}× | {accuracy} | {flops} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines)
