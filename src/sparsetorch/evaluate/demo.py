"""`sparsetorch demo`: the whole pipeline on the bundled model, with a report.

Dense perplexity and decode speed, one-shot pruning, sparse perplexity, a short recovery
by distillation from the dense model (`sparsetorch.recover`), sparse decode speed (with
dense kernels, and on a copy whose linears `sparsetorch.runtime.compile` swapped for sparse
kernels where they measure faster), saving in dense and compressed form, then `report.md`,
`report.png` and `sparsity.png` in the output directory.

`run_demo` takes its settings as a `DemoOptions`, not the command line's namespace, so the
library does not depend on how `sparsetorch.cli` spells its flags.
"""

from __future__ import annotations

import copy
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetorch.checks import check_int
from sparsetorch.data import calibration_windows, demo_text, evaluation_windows
from sparsetorch.evaluate.inspect import layer_sparsity, plot_sparsity
from sparsetorch.evaluate.perplexity import perplexity
from sparsetorch.evaluate.report import ModelMeasure, file_size, markdown_table, plot_comparison
from sparsetorch.evaluate.speed import measure_decode
from sparsetorch.formats.codec import CODECS
from sparsetorch.formats.pruned import save_pruned
from sparsetorch.models import load_model
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.pipeline import prune
from sparsetorch.runtime.compile import compile as runtime_compile
from sparsetorch.training.recover import recover

__all__ = ["DemoOptions", "run_demo"]

DECODE_REPEATS = 2  # after one warm-up; `sparsetorch bench` takes more for tighter medians
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
RECOVER_BATCH = 2  # windows per recovery step: a short run takes many small steps


@dataclass(frozen=True)
class DemoOptions:
    """How much data the demo uses and how it writes its output; defaults are the CLI's.

    Attributes:
        calib_samples: calibration windows drawn from the calibration plays.
        seqlen: tokens per window, for calibration and evaluation alike (at least 2).
        eval_tokens: held-out tokens for perplexity; at least one window of `seqlen`.
        decode_tokens: greedy tokens per decode-speed run (at least 2: the first one is the
            prompt's, only the steps after it are timed).
        seed: seed for the calibration window offsets.
        recover_steps: steps of recovery by distillation after pruning, on the calibration
            windows (0: none); the saved model is the recovered one.
        codec: lossless coding of the compressed weights, one of `formats.codec.CODECS`.
        overwrite: replace an existing output directory instead of refusing it.
        quiet: no progress bars.

    Raises:
        ValueError: a count out of range or an unknown codec, named in the message.
    """

    calib_samples: int = 64
    seqlen: int = 512
    eval_tokens: int = 16384
    decode_tokens: int = 128
    seed: int = 0
    recover_steps: int = 24
    codec: str = "zstd"
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        minimum = {"calib_samples": 1, "seqlen": 2, "eval_tokens": 1, "decode_tokens": 2, "recover_steps": 0}
        for name, least in minimum.items():
            check_int(getattr(self, name), name, least)
        check_int(self.seed, "seed", 0)
        if self.eval_tokens < self.seqlen:
            raise ValueError(f"eval_tokens must hold at least one window of seqlen={self.seqlen} tokens, "
                             f"got {self.eval_tokens}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {self.codec!r}")


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def run_demo(options: DemoOptions, config: PruneConfig, out: Path) -> dict:
    """Run the demo into `out` and return the numbers it reports.

    Args:
        options: data sizes, seed and output settings (`DemoOptions()` is the CLI's default run).
        config: how to prune the bundled model.
        out: the output directory: the pruned model plus report.md, report.png, sparsity.png.

    Raises:
        TypeError: `options` is not a `DemoOptions` (e.g. the CLI's parsed arguments).
        FileExistsError: `out` exists and `options.overwrite` is False.
    """
    if not isinstance(options, DemoOptions):
        raise TypeError(f"run_demo takes a DemoOptions, not a {type(options).__name__}")
    progress = not options.quiet
    _step("loading the bundled model and text")
    model, tokenizer, path = load_model(None, progress=progress)
    split = demo_text()
    calib = calibration_windows(tokenizer, split.calibration, options.calib_samples, options.seqlen, seed=options.seed)
    windows = evaluation_windows(tokenizer, split.evaluation, options.eval_tokens, options.seqlen)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]

    _step(f"dense perplexity on {windows.numel()} held-out tokens ({', '.join(split.evaluation_parts)})")
    dense_ppl = perplexity(model, windows, progress=progress)
    _step(f"dense decode speed ({options.decode_tokens} greedy tokens)")
    dense_speed = measure_decode(model, prompt, options.decode_tokens, repeats=DECODE_REPEATS)

    _step(f"pruning with {config.method} ({config.pattern}, sparsity {config.sparsity:.0%}) "
          f"on {calib.shape[0]} windows of {calib.shape[1]} tokens")
    teacher = copy.deepcopy(model) if options.recover_steps else None
    report = prune(model, calib, config, progress=progress)
    _step("sparse perplexity")
    sparse_ppl = perplexity(model, windows, progress=progress)
    record = report.to_dict()
    final_ppl, name = sparse_ppl, _stack_name(config)
    if teacher is not None:
        _step(f"recovery by distillation from the dense model ({options.recover_steps} steps of {RECOVER_BATCH} "
              "calibration windows)")
        recovery = recover(model, teacher, calib, steps=options.recover_steps, batch_size=RECOVER_BATCH,
                           progress=progress)
        del teacher
        final_ppl = perplexity(model, windows, progress=progress)
        record["recovery"] = {**recovery.to_dict(), "perplexity": {"before": sparse_ppl, "after": final_ppl}}
        print(f"    {recovery.steps} steps in {recovery.seconds:.0f} s; perplexity {sparse_ppl:.2f} -> {final_ppl:.2f}")
    _step("sparse decode speed (dense kernels: sparsetorch.runtime swaps in sparse ones)")
    sparse_speed = measure_decode(model, prompt, options.decode_tokens, repeats=DECODE_REPEATS)
    _step("sparse decode speed with sparse kernels (sparsetorch.runtime.compile, on a copy)")
    runtime_speed = _runtime_decode(model, prompt, options.decode_tokens)

    _step(f"saving to {out}")
    calibration = {"source": split.source, "parts": list(split.calibration_parts),
                   "samples": options.calib_samples, "seqlen": options.seqlen, "seed": options.seed}
    dense_bytes = file_size(Path(path) / "model.safetensors")
    results: dict = {}

    def write_report(staging: Path) -> None:
        sparse_bytes = file_size(staging / "compressed" / "model.safetensors")  # one file, both kernel kinds
        rows = [
            ModelMeasure("dense", dense_ppl, dense_bytes, dense_speed.tokens_per_second, 0.0),
            ModelMeasure(f"{name}, one-shot", sparse_ppl, sparse_bytes, sparse_speed.tokens_per_second,
                         report.sparsity),
        ]
        if "recovery" in record:
            rows.append(ModelMeasure(f"{name} + {options.recover_steps} recovery steps", final_ppl, sparse_bytes,
                                     sparse_speed.tokens_per_second, report.sparsity))
        rows.append(ModelMeasure(f"{rows[-1].label} + sparse kernels", final_ppl, sparse_bytes,
                                 runtime_speed.tokens_per_second, report.sparsity))
        results["table"] = markdown_table(rows, rows[0])
        plot_comparison(rows, staging / "report.png", title=f"SmolLM2-135M, {config.method} {config.pattern}")
        plot_sparsity(layer_sparsity(staging), staging / "sparsity.png", title="per-layer sparsity")
        _write_report(staging, results["table"], report, split.source)

    save_pruned(model, out, record, tokenizer=tokenizer, calibration=calibration, source=str(path),
                codec=options.codec, overwrite=options.overwrite, finish=write_report)
    print()
    print(results["table"])
    print()
    print(f"prune time {report.seconds:.1f} s; output: {out} (report.md, report.png, sparsity.png)")
    return {"dense_perplexity": dense_ppl, "sparse_perplexity": sparse_ppl, "final_perplexity": final_ppl}


def _stack_name(config: PruneConfig) -> str:
    """The pruning steps in a row label: method, pattern, and the steps after it."""
    steps = [config.method, config.pattern if ":" in config.pattern else f"{config.sparsity:.0%}"]
    if config.allocation != "uniform":
        steps.append(f"+ {config.allocation}")
    if config.refine:
        steps.append(f"+ {config.refine}")
    if config.reconstruct:
        steps.append(f"+ {config.reconstruct} reconstruction")
    return " ".join(steps)


def _runtime_decode(model, prompt, tokens: int):
    """Decode speed of a copy of `model` with its linears swapped for sparse kernels where
    those measure faster (`sparsetorch.runtime.compile`); `model` itself stays as saved."""
    compiled = copy.deepcopy(model)
    print(f"    {runtime_compile(compiled).summary()}", flush=True)
    return measure_decode(compiled, prompt, tokens, repeats=DECODE_REPEATS)


def _write_report(out: Path, table: str, report, source: str) -> None:
    lines = [
        "# sparsetorch demo",
        "",
        f"SmolLM2-135M-Instruct pruned one-shot with **{report.config.method}** "
        f"({report.config.pattern}, {report.sparsity:.2%} of linear weights zero), calibrated and "
        f"evaluated on {source} text (held-out plays for perplexity).",
        "",
        table,
        "",
        "File size: dense `model.safetensors` vs `compressed/model.safetensors` (sparse-bitmask layout, "
        "lossless zstd byte-plane coding). Decode speed: the same greedy KV-cache loop for all; the pruned "
        "model runs dense kernels as saved, and sparse ones where `sparsetorch.runtime.compile` swapped "
        "them in (last row; same weights, same perplexity).",
        "",
        f"Prune wall time: {report.seconds:.1f} s. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "![comparison](report.png)",
        "",
        "![per-layer sparsity](sparsity.png)",
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(report.config.to_dict(), indent=2),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
