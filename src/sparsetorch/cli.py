"""The `sparsetorch` command line: prune, eval, bench, inspect and demo.

Every command works offline on the bundled SmolLM2-135M and Shakespeare text by
default, and on any local Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from sparsetorch import __version__

__all__ = ["main"]

EXAMPLES = """examples:
  sparsetorch prune --method sparsegpt --pattern 2:4 --out smollm2-24
  sparsetorch prune ./my-llama --method wanda --sparsity 0.6 --out my-llama-60
  sparsetorch recover smollm2-24 --steps 200 --out smollm2-24-rec   # distill from the dense model
  sparsetorch eval smollm2-24 --compare
  sparsetorch eval smollm2-24 --sparse-runtime
  sparsetorch bench smollm2-24
  sparsetorch inspect smollm2-24
  sparsetorch export smollm2-24 --out smollm2-24-ct    # compressed-tensors 0.14 layout
  sparsetorch demo
  sparsetorch train-demo --task digits --methods dense static rigl gmp
"""


STREAM_FRACTION = 0.5  # of the available memory: larger models are pruned streaming


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


def _add_data_options(parser: argparse.ArgumentParser, calibration: bool, evaluation: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    if calibration:
        group.add_argument("--calib-samples", type=int, default=64,
                           help="calibration windows drawn from the calibration plays (default: 64)")
        group.add_argument("--calib-text", type=Path, help="a UTF-8 text file to calibrate on instead of the bundled text")
        group.add_argument("--seed", type=int, default=0, help="seed for window offsets and random pruning (default: 0)")
    if evaluation:
        group.add_argument("--eval-tokens", type=int, default=16384,
                           help="held-out tokens for perplexity (default: 16384)")
        group.add_argument("--eval-text", type=Path, help="a UTF-8 text file to evaluate on instead of the held-out plays")


def _add_prune_options(parser: argparse.ArgumentParser, default_method: str, default_reconstruct: str | None = None) -> None:
    from sparsetorch.allocate import ALLOCATIONS
    from sparsetorch.oneshot import LAYER_INPUTS, SOLVERS
    from sparsetorch.precision import CALIB_DTYPES

    group = parser.add_argument_group("pruning")
    methods = ", ".join(f"{name} ({solver.summary})" for name, solver in sorted(SOLVERS.items()))
    group.add_argument("--method", default=default_method, help=f"{methods}. Default: {default_method}")
    group.add_argument("--sparsity", type=float,
                       help="fraction of weights to zero in each layer, in [0, 1) (default: 0.5; N:M implies it)")
    group.add_argument("--pattern", help="unstructured | unstructured-row | N:M (e.g. 2:4) | block-HxW "
                       "(default: unstructured-row for wanda, unstructured otherwise)")
    group.add_argument("--targets", nargs="+",
                       help="modules to prune: names, class names or 're:<regex>' (default: every Linear)")
    group.add_argument("--ignore", nargs="+", default=["lm_head"], help="modules to keep dense (default: lm_head)")
    group.add_argument("--blocks", help="dotted path of the decoder-block list, for model families sparsetorch does not know")
    group.add_argument("--layer-inputs", choices=list(LAYER_INPUTS), default="dense",
                       help="'dense': calibrate every layer on the dense block's activations (the papers' way, "
                            "llm-compressor's statistics; 1.75 block passes); 'mixed': so for every layer but the "
                            "block's last, the last (the MLP's down projection) inside the pruned block's pass "
                            "(1.25 passes); 'pruned': each layer on the outputs of the already-pruned layers before "
                            "it (one pass). The faster two change the result. Default: dense")
    group.add_argument("--calib-dtype", choices=list(CALIB_DTYPES), default="model",
                       help="precision of the forwards that only gather statistics (the dense block's, with "
                            "--layer-inputs dense or mixed): 'model' keeps the model's dtype; 'bfloat16' runs an "
                            "fp32 model's matmuls there in bf16 autocast, about twice as fast on AVX512-BF16/AMX "
                            "CPUs; 'auto' uses bf16 only where the hardware multiplies it natively. The forward "
                            "that feeds the next block stays in the model's dtype. Default: model")
    group.add_argument("--batch-size", type=int, default=4,
                       help="calibration windows per forward; in the model's dtype results do not depend on it "
                            "(default: 4)")
    group.add_argument("--dampening", type=float, default=0.01, help="SparseGPT Hessian dampening (default: 0.01)")
    group.add_argument("--allocation", choices=list(ALLOCATIONS), default="uniform",
                       help="how sparsity is spread over the decoder blocks, the mean kept at --sparsity: 'uniform' "
                            "(the papers'), 'owl' (more weights kept where Wanda scores have more outliers), "
                            "'depth' (later blocks sparser). Unstructured patterns only. Default: uniform")
    group.add_argument("--owl-m", type=float, default=5.0, help="OWL's M: an outlier is above M times the mean score "
                       "(default: 5)")
    group.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's λ: block sparsities span target ± λ "
                       "(default: 0.08)")
    group.add_argument("--depth-step", type=float, default=0.01, help="'depth': sparsity added per block (default: 0.01)")
    group.add_argument("--refine", choices=["dsnot"], default=None,
                       help="after the method chose each layer's mask: 'dsnot' swaps kept and pruned weights within "
                            "each row (or N:M group) where that lowers the layer's expected output error, never "
                            "raising its calibration error (DSnoT). Default: none")
    group.add_argument("--reconstruct", choices=["layer", "block", "none"], default=default_reconstruct,
                       help="after masking: 'layer' refits each layer's kept weights to the dense layer's outputs "
                            "on the calibration inputs (least squares on each row's support); 'block' also trains "
                            "each block's kept weights a few steps to match the dense block's output. "
                            f"Default: {default_reconstruct or 'none'}")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output directory (default: pruned/<model>-<method>-<pattern>)")
    out.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    out.add_argument("--restart", action="store_true",
                     help="discard the checkpoint of an interrupted run (<out>.resume) instead of resuming it")
    out.add_argument("--codec", choices=["zstd", "none"], default="zstd",
                     help="lossless coding of the compressed weights; 'none' writes exactly the "
                          "compressed-tensors 0.14 layout (default: zstd)")


def _add_stream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", action="store_true",
                        help="never load the whole model: read each decoder block from the safetensors shards just "
                             "before its turn and write it out once pruned (Llama-family models), so peak memory is "
                             "about one block plus the calibration activations and embeddings. Chosen by itself "
                             f"when the model's weights exceed {STREAM_FRACTION * 100:.0f}%% of the available memory. "
                             "Keeps the weights in the dtype they are stored in")


def _add_quantize_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    group.add_argument("--quantize", metavar="{int8,int4}",
                       help="store the kept weights as integers: 'int8' (one scale per output channel) or 'int4' (one "
                            "scale per --group-size input columns); full names such as int4-g64-asym work too. "
                            "SparseGPT quantizes jointly with pruning (its sweep rounds each kept weight as it reaches "
                            "it and corrects the columns after it for the error, GPTQ-style); the other methods, and "
                            "any --refine or --reconstruct step after it, round to nearest. The embeddings become int8 "
                            "per row too. Default: off, the model's dtype")
    group.add_argument("--group-size", type=int, default=128,
                       help="input columns sharing one scale with --quantize int4 (default: 128)")
    group.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                       help="with --quantize, give each group the range of least rounding error among 16 clipped "
                            "ranges instead of its largest magnitude (searched clipping). Default: on for int4, "
                            "off for int8")
    group.add_argument("--keep-embeddings", action="store_true",
                       help="with --quantize, leave the embeddings (and an untied lm_head) in the model's dtype")


def _add_runtime_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    from sparsetorch.runtime.config import POLICIES

    group = parser.add_argument_group("sparse runtime")
    policies = "; ".join(f"{name}: {text}" for name, text in POLICIES.items())
    group.add_argument("--sparse-runtime", nargs="?", const="measure", default=default, choices=list(POLICIES),
                       help=f"run the compressed weights with sparse kernels ({policies}). "
                            f"Default: {default or 'off'}; the bare flag means 'measure'")
    group.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                       help="batch rows the sparse kernels must win at, e.g. 1 256 (default: 1, decode)")


def _add_decoder_option(parser: argparse.ArgumentParser) -> None:
    from sparsetorch.evaluate.bench_worker import DECODERS

    parser.add_argument("--decoder", choices=DECODERS, default="auto",
                        help="the decode loop both variants run: 'lean' (sparsetorch's own Llama-family decoder; the "
                             "process never imports transformers), 'transformers', or 'auto' (default: lean for "
                             "Llama, Mistral and Qwen2, else transformers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsetorch",
        description="Make PyTorch models sparse, and make the sparsity pay: prune one-shot, "
                    "store compressed, measure quality, size and speed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sparsetorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    prune = sub.add_parser("prune", help="prune a model one-shot with calibration text and save it",
                           description="Prune a causal LM one-shot and write a directory that plain transformers "
                                       "loads (dense) plus its compressed form and sparsity.json.")
    prune.add_argument("model", nargs="?", help="local HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    _add_prune_options(prune, "wanda")
    _add_stream_option(prune)
    _add_quantize_options(prune)
    _add_data_options(prune, calibration=True, evaluation=False)
    prune.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_recover(sub)

    evaluate = sub.add_parser("eval", help="perplexity on held-out text",
                              description="Perplexity on fixed non-overlapping windows of held-out text.")
    evaluate.add_argument("model", nargs="?", help="model directory (default: the bundled model)")
    evaluate.add_argument("--compressed", action="store_true", help="load the compressed weights of a pruned directory")
    evaluate.add_argument("--compare", action="store_true", help="also evaluate the model it was pruned from")
    _add_runtime_options(evaluate, default=None)
    _add_data_options(evaluate, calibration=False, evaluation=True)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="prefill and decode speed, peak RSS and size: dense vs sparse runtime",
                           description="Run a pruned directory dense and through the sparse runtime, each in its own "
                                       "process, alternating; print medians and sparse/dense ratios.")
    bench.add_argument("model", help="a directory written by `sparsetorch prune`")
    bench.add_argument("--prefill-tokens", type=int, default=256, help="prompt tokens of the prefill test (default: 256)")
    bench.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens of the decode test (default: 128)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per process (default: 3)")
    bench.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating (default: 2)")
    _add_runtime_options(bench, default="measure")
    _add_decoder_option(bench)
    bench.add_argument("--json", type=Path, help="also write every measurement to this JSON file")

    inspect = sub.add_parser("inspect", help="per-layer sparsity table and heatmap",
                             description="Print per-layer sparsity and save a heatmap PNG.")
    inspect.add_argument("model", help="model directory")
    inspect.add_argument("--plot", type=Path, help="where to save the PNG (default: <model>/sparsity.png for a "
                         "`sparsetorch prune` output, ./<model name>-sparsity.png for any other model)")
    inspect.add_argument("--json", action="store_true", help="print the table as JSON")

    export = sub.add_parser("export", help="rewrite a pruned model's compressed form (e.g. for compressed-tensors)",
                            description="Write the compressed form of a pruned directory again with another codec: "
                                        "--codec none gives exactly the compressed-tensors 0.14 sparse-bitmask layout.")
    export.add_argument("model", help="a directory written by `sparsetorch prune`")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.add_argument("--codec", choices=["none", "zstd"], default="none", help="(default: none)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    demo = sub.add_parser("demo", help="prune the bundled LLM and report quality, size and speed",
                          description="The whole pipeline on the bundled SmolLM2-135M: dense and sparse perplexity, "
                                      "file sizes, decode speed, a report and plots.")
    _add_prune_options(demo, "sparsegpt", default_reconstruct="block")
    _add_data_options(demo, calibration=True, evaluation=True)
    demo.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens for the decode-speed test (default: 128)")
    demo.add_argument("--recover-steps", type=int, default=24,
                      help="steps of recovery by distillation from the dense model after pruning, 2 calibration "
                           "windows each; the saved model is the recovered one (0: none; default: 24)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_train_demo(sub)
    return parser


def _add_recover(sub) -> None:
    from sparsetorch.training.recover import AUTOCAST, RecoverConfig

    default = RecoverConfig(steps=1)
    recover = sub.add_parser("recover", help="recover a pruned model's quality by distillation from the dense model",
                             description="Train a directory written by `sparsetorch prune` towards its dense teacher "
                                         "(KL on the logits plus per-block normalized MSE, Kurtic et al. 2023), every "
                                         "pruned weight kept at zero; report held-out perplexity before and after, "
                                         "and write the same kind of pruned directory.")
    recover.add_argument("model", help="a directory written by `sparsetorch prune`")
    recover.add_argument("--teacher", help="the dense model directory (default: the source model its sparsity.json records)")
    recover.add_argument("--text", type=Path, help="a UTF-8 text file to train on, cut into --seqlen windows "
                         "(default: the bundled calibration text; never the evaluation plays)")
    recover.add_argument("--steps", type=int, required=True, help="optimizer steps")
    train = recover.add_argument_group("training")
    train.add_argument("--lr", type=float, default=default.lr, help=f"peak AdamW learning rate (default: {default.lr:g})")
    train.add_argument("--warmup", type=int, default=default.warmup,
                       help=f"linear warmup steps before the cosine decay (default: {default.warmup})")
    train.add_argument("--batch-size", type=int, default=default.batch_size,
                       help=f"windows per forward (default: {default.batch_size})")
    train.add_argument("--accumulation", type=int, default=default.accumulation,
                       help=f"forwards per optimizer step (default: {default.accumulation})")
    train.add_argument("--kl-weight", type=float, default=default.kl_weight,
                       help=f"weight of KL(teacher || student) on the logits (default: {default.kl_weight:g})")
    train.add_argument("--feature-weight", type=float, default=default.feature_weight,
                       help=f"weight of the per-block normalized MSE (default: {default.feature_weight:g})")
    train.add_argument("--lm-weight", type=float, default=default.lm_weight,
                       help=f"weight of the next-token loss on the text (default: {default.lm_weight:g})")
    train.add_argument("--temperature", type=float, default=default.temperature,
                       help=f"softmax temperature of the KL term (default: {default.temperature:g})")
    train.add_argument("--autocast", choices=list(AUTOCAST), default=default.autocast,
                       help="bf16 autocast: 'auto' where the CPU multiplies bf16 natively (default: auto)")
    train.add_argument("--seed", type=int, default=default.seed, help="seed of the window order (default: 0)")
    _add_data_options(recover, calibration=False, evaluation=True)
    out = recover.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output directory")
    out.add_argument("--overwrite", action="store_true",
                     help="replace --out if it exists, and discard an interrupted run's checkpoint (<out>.resume)")
    out.add_argument("--checkpoint-every", type=int, default=100,
                     help="save progress to <out>.resume every K steps; 0: never (default: 100)")
    out.add_argument("--resume", action="store_true", help="continue the interrupted run saved in <out>.resume")
    recover.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_demo(sub) -> None:
    from sparsetorch.training.recipes import RECIPES

    train = sub.add_parser("train-demo", help="train a small model sparse on bundled data and compare methods",
                           description="Train a digits CNN/MLP (scikit-learn's digits) or a tiny character-level GPT "
                                       "(the bundled Shakespeare, validated on held-out plays) once per method, "
                                       "same seed and batches for all, and print a comparison table.")
    train.add_argument("--task", choices=["digits", "gpt"], default="digits", help="default: digits")
    train.add_argument("--methods", nargs="+", default=["dense", "rigl"], metavar="METHOD",
                       help=f"{', '.join(sorted(RECIPES))} (default: dense rigl)")
    train.add_argument("--sparsity", type=float, default=0.9, help="global sparsity, in [0, 1) (default: 0.9; N:M implies it)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: 300 for digits, 200 for gpt)")
    train.add_argument("--seed", type=int, default=0, help="seed for model, batches and masks (default: 0)")
    train.add_argument("--model", choices=["cnn", "mlp"], default="cnn", help="digits model (default: cnn)")
    train.add_argument("--width", type=int, default=128, help="GPT width (default: 128)")
    train.add_argument("--layers", type=int, default=4, help="GPT blocks (default: 4)")
    train.add_argument("--context", type=int, default=64, help="GPT context in characters (default: 64)")
    train.add_argument("--init", choices=["sparse", "keep"], default="sparse",
                       help="initialization of methods that start from random masks: 'sparse' rescales each unit's kept "
                            "weights to its sparse fan-in, 'keep' leaves the dense initialization (default: sparse)")
    train.add_argument("--plot", type=Path, help="save the evaluation curves as a PNG")
    train.add_argument("--x", choices=["steps", "flops"], default="steps",
                       help="x axis of --plot: optimizer steps or training FLOPs of the Linear and conv layers "
                            "(default: steps)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from sparsetorch.formats.checkpoint import CorruptFileError
    from sparsetorch.formats.lock import OutputBusyError

    handlers = {"prune": _cmd_prune, "eval": _cmd_eval, "inspect": _cmd_inspect, "export": _cmd_export,
                "bench": _cmd_bench, "demo": _cmd_demo, "train-demo": _cmd_train_demo, "recover": _cmd_recover}
    if getattr(args, "quiet", False):
        _silence_transformers()
    try:
        return handlers[args.command](args)
    except (UserError, ValueError, TypeError, FileNotFoundError, FileExistsError, CorruptFileError,
            OutputBusyError) as err:
        print(f"sparsetorch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "resume_dir", None)
        where = f" (its finished blocks are kept in {kept}; the same command resumes from there)" if kept else ""
        if args.command == "recover":
            where = f" (its last checkpoint is kept in {kept}; add --resume to continue)" if kept and kept.exists() else ""
        print(f"sparsetorch {args.command}: interrupted; nothing was written to the output{where}", file=sys.stderr)
        return 130


def _silence_transformers() -> None:
    """--quiet: transformers' own loading and saving bars go too."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


# ---- commands --------------------------------------------------------------------------


def _config_from_args(args):
    from sparsetorch.oneshot.config import PruneConfig

    return PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        targets=args.targets,
        ignore=tuple(args.ignore),
        blocks=args.blocks,
        layer_inputs=args.layer_inputs,
        calib_dtype=args.calib_dtype,
        batch_size=args.batch_size,
        dampening=args.dampening,
        seed=args.seed,
        allocation=args.allocation,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        depth_step=args.depth_step,
        refine=args.refine,
        reconstruct=None if args.reconstruct == "none" else args.reconstruct,
        quantize=getattr(args, "quantize", None),  # `prune` has the quantization options, `demo` not
        group_size=getattr(args, "group_size", 128),
        clip_search=getattr(args, "clip_search", None),
        quantize_embeddings=not getattr(args, "keep_embeddings", False),
    )


def _default_out(model_path: str | None, config, root: str = "pruned") -> Path:
    from sparsetorch.models import DEMO_MODEL

    name = Path(model_path).name if model_path else DEMO_MODEL
    pattern = config.pattern.replace(":", "of") if ":" in config.pattern else f"{config.pattern}{round(config.sparsity * 100)}"
    quantized = "" if config.quantize is None else f"-{config.quantize}"
    return Path(root) / f"{name}-{config.method}-{pattern}{quantized}"


def _existing_parent(out: Path) -> Path:
    """The nearest directory above `out` that exists: where its files will be created."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing output without --overwrite, and an output location this user cannot write, before any work."""
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it, or choose another --out")
    parent = _existing_parent(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {parent} is not a directory this user may write to; choose another --out")


def _check_disk(out: Path, model, config) -> None:
    """Refuse to start when the output's file system cannot hold what the run writes: the dense weights,
    the compressed form (at most as large) and the resume checkpoint (the pruned weights and a byte of
    mask per weight)."""
    from sparsetorch.models import count_parameters
    from sparsetorch.targets import find_targets

    weight = next(model.parameters())
    dense = count_parameters(model) * weight.element_size()
    pruned = sum(m.weight.numel() for m in find_targets(model, config.targets, config.ignore).values())
    _check_free(out, 2 * dense + pruned * (weight.element_size() + 1))


def _check_free(out: Path, needed: int) -> None:
    parent = _existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UserError(f"not enough free disk for {out}: about {needed / 1e9:.2f} GB needed (dense and compressed "
                        f"weights, resume checkpoint), {free / 1e9:.2f} GB free on {parent}")


def _read_text(path: Path | None) -> str | None:
    """The UTF-8 text of `path`; a directory, a missing file or bytes that are not UTF-8 are errors."""
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text: byte {err.start} ({data[err.start:err.start + 1]!r}) does not "
                        "decode; convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def _calibration(args, tokenizer, config):
    from sparsetorch.data import calibration_windows
    from sparsetorch.oneshot.solvers import get_solver

    if get_solver(config.method).statistic is None:
        return None, {"source": None, "note": f"{config.method} needs no calibration data"}
    calib_text = _read_text(args.calib_text)
    if calib_text is None:
        from sparsetorch.data import demo_text

        split = demo_text()
        calib_text, source, parts = split.calibration, split.source, list(split.calibration_parts)
    else:
        source, parts = str(args.calib_text), [str(args.calib_text)]
    windows = calibration_windows(tokenizer, calib_text, args.calib_samples, args.seqlen, seed=args.seed)
    info = {"source": source, "parts": parts, "samples": args.calib_samples, "seqlen": args.seqlen, "seed": args.seed}
    return windows, info


def _eval_windows(args, tokenizer):
    from sparsetorch.data import demo_text, evaluation_windows

    text = _read_text(args.eval_text)
    source = str(args.eval_text)
    if text is None:
        split = demo_text()
        text, source = split.evaluation, f"{split.source}: {', '.join(split.evaluation_parts)}"
    return evaluation_windows(tokenizer, text, args.eval_tokens, args.seqlen), source


def _resume_checkpoint(out: Path, config, windows, model, restart: bool):
    """Per-block progress next to the output, so an interrupted run picks up where it stopped."""
    from sparsetorch.oneshot.resume import ResumeCheckpoint

    if windows is None:
        return None
    checkpoint = ResumeCheckpoint(Path(f"{out}.resume"), config, windows, model)
    if restart:
        checkpoint.clear()
    elif checkpoint.directory.exists():
        print(f"resuming the interrupted run saved in {checkpoint.directory} (--restart starts afresh)")
    return checkpoint


def _sizes(out: Path) -> tuple[int, int]:
    from sparsetorch.evaluate.report import file_size

    return file_size(out / "model.safetensors"), file_size(out / "compressed" / "model.safetensors")


def _cmd_prune(args) -> int:
    from sparsetorch.formats.lock import output_lock
    from sparsetorch.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # each layer's MB-sized temporaries go back when freed, not into a growing heap
    config = _config_from_args(args)
    out = args.out or _default_out(args.model, config)
    _check_out(out, args.overwrite)
    with output_lock(out):
        return _prune_into(args, config, out)


def _prune_into(args, config, out: Path) -> int:
    """`sparsetorch prune` once this process holds the output's lock."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (both paths run its code: part of the baseline)

    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.models import resolve_model_path

    args.memory_base = peak_rss_bytes()  # what the expected memory comes on top of
    _check_out(out, args.overwrite)  # again under the lock: the run that held it may have just written it
    path = resolve_model_path(args.model, progress=not args.quiet)
    if _choose_stream(args, path):
        return _prune_streaming(args, config, out, path)
    return _prune_in_memory(args, config, out)


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or all physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _choose_stream(args, path: Path) -> bool:
    """--stream, or a model whose weights (as float32, how the in-memory path loads them) exceed
    STREAM_FRACTION of the available memory; says which and why."""
    from sparsetorch.formats.sharded import ShardedWeights

    if args.stream:
        print("streaming the model block by block (--stream)")
        return True
    try:
        with ShardedWeights(path) as weights:
            size = sum(weights.spec(name).numel for name in weights.keys()) * 4
    except (FileNotFoundError, ValueError):
        return False  # not safetensors: only the in-memory path reads it
    available = _available_memory()
    if size <= STREAM_FRACTION * available:
        return False
    print(f"streaming the model block by block: its weights ({size / 1e9:.1f} GB as float32) exceed "
          f"{STREAM_FRACTION:.0%} of the available memory ({available / 1e9:.1f} GB)")
    return True


def _memory_record(bound: int, streamed: bool, base: int):
    """sparsity.json's `memory` entry, measured when the save calls it (the save raises the peak too).
    `base`: the peak before the model was touched (the interpreter and its libraries), which the bound
    (`memory_bound`: weights, activations, statistics) comes on top of."""
    from sparsetorch.evaluate.memory import peak_rss_bytes

    def record() -> dict:
        return {"memory": {"streamed": streamed, "peak_rss_bytes": peak_rss_bytes(), "expected_bytes": base + bound,
                           "base_bytes": base}}

    return record


def _print_memory(out: Path) -> None:
    from sparsetorch.formats.pruned import read_sparsity

    memory = read_sparsity(out)["memory"]
    print(f"peak memory         {memory['peak_rss_bytes'] / 1e9:8.2f} GB  (expected about "
          f"{memory['expected_bytes'] / 1e9:.2f} GB: {memory['base_bytes'] / 1e9:.2f} GB before the model, then "
          f"{'one block at a time' if memory['streamed'] else 'the whole model'} and the calibration)")


def _prune_streaming(args, config, out: Path, path: Path) -> int:
    """`sparsetorch prune` one block in memory at a time (`oneshot/streaming.py`)."""
    from transformers import AutoTokenizer

    from sparsetorch.formats.sharded import ShardedWeights
    from sparsetorch.oneshot.streaming import memory_bound, prune_directory

    with ShardedWeights(path) as weights:  # the stored dtype is kept: dense, compressed, checkpoint (+ masks)
        _check_free(out, 3 * weights.nbytes() + sum(weights.spec(name).numel for name in weights.keys()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows, calibration = _calibration(args, tokenizer, config)
    resume = Path(f"{out}.resume")
    if args.restart:
        shutil.rmtree(resume, ignore_errors=True)
    elif resume.exists():
        print(f"resuming the interrupted run saved in {resume} (--restart starts afresh)")
    args.resume_dir = resume
    bound = memory_bound(path, config, None if windows is None else tuple(windows.shape))
    started = time.perf_counter()
    report = prune_directory(path, out, windows, config, tokenizer=tokenizer, calibration_info=calibration,
                             resume=resume, codec=args.codec, overwrite=args.overwrite, progress=not args.quiet,
                             annotate=_memory_record(bound.total, True, args.memory_base))
    print(f"pruned {len(report.layers)} layers with {config.method} ({config.pattern}) and wrote them in "
          f"{time.perf_counter() - started:.1f} s, streaming: sparsity {report.sparsity:.2%}")
    _print_sizes(out, args.codec)
    return 0


def _prune_in_memory(args, config, out: Path) -> int:
    from sparsetorch.formats.pruned import save_pruned
    from sparsetorch.models import load_model
    from sparsetorch.oneshot.pipeline import prune

    model, tokenizer, path = load_model(args.model, progress=not args.quiet)
    _check_disk(out, model, config)
    windows, calibration = _calibration(args, tokenizer, config)
    checkpoint = _resume_checkpoint(out, config, windows, model, args.restart)
    args.resume_dir = None if checkpoint is None else checkpoint.directory  # named if interrupted
    report = prune(model, windows, config, progress=not args.quiet, checkpoint=checkpoint)
    quantized = "" if report.quantization is None else \
        f", kept weights {config.quantize} ({report.quantization['method']})"
    print(f"pruned {len(report.layers)} layers with {config.method} ({config.pattern}) in {report.seconds:.1f} s: "
          f"sparsity {report.sparsity:.2%}{quantized}")
    save_pruned(model, out, report.to_dict(), tokenizer=tokenizer, calibration=calibration, source=str(path),
                codec=args.codec, overwrite=args.overwrite, grids=report.grids or None,
                annotate=_memory_record(_in_memory_bound(model, config, windows, path), False, args.memory_base))
    if checkpoint is not None:
        checkpoint.clear()
    _print_sizes(out, args.codec)
    return 0


def _in_memory_bound(model, config, windows, path: Path) -> int:
    """What an in-memory prune should hold: the whole model, plus a streamed run's activations and
    statistics where those can be worked out (a family with a block layout, safetensors weights)."""
    from sparsetorch.models import count_parameters
    from sparsetorch.oneshot.streaming import memory_bound

    weight = next(model.parameters())
    total = count_parameters(model) * weight.element_size()
    try:
        bound = memory_bound(path, config, None if windows is None else tuple(windows.shape), weight.dtype)
    except (ValueError, FileNotFoundError):
        return total
    return total + bound.activations + bound.statistics


def _print_sizes(out: Path, codec: str) -> None:
    dense, compressed = _sizes(out)
    print(f"dense weights       {dense / 1e6:8.1f} MB  {out / 'model.safetensors'}")
    print(f"compressed weights  {compressed / 1e6:8.1f} MB  {out / 'compressed' / 'model.safetensors'}  "
          f"({compressed / dense:.2f}x of dense, codec {codec})")
    _print_memory(out)
    print(f"saved to {out}")


def _cmd_recover(args) -> int:
    from sparsetorch.formats.lock import output_lock
    from sparsetorch.training.recover import RecoverConfig

    config = RecoverConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, accumulation=args.accumulation,
                           warmup=args.warmup, kl_weight=args.kl_weight, feature_weight=args.feature_weight,
                           lm_weight=args.lm_weight, temperature=args.temperature, autocast=args.autocast,
                           seed=args.seed)
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be a number of steps >= 0 (0: never), got {args.checkpoint_every}")
    _check_out(args.out, args.overwrite)
    with output_lock(args.out):
        return _recover_into(args, config, args.out)


def _recover_checkpoint(args, out: Path) -> Path:
    """<out>.resume: continued with --resume, discarded with --overwrite, otherwise never silently replaced."""
    directory = Path(f"{out}.resume")
    if directory.exists() and not args.resume:
        if not args.overwrite:
            raise UserError(f"{directory} holds an interrupted recovery run; pass --resume to continue it, or "
                            "--overwrite to discard it and start afresh")
        shutil.rmtree(directory)
    elif args.resume and not directory.exists():
        print(f"no checkpoint in {directory}: starting afresh")
    return directory


def _teacher_path(args, record: dict) -> str:
    if args.teacher is not None:
        return args.teacher
    source = record.get("source_model")
    if source is None:
        raise UserError(f"{args.model}/sparsity.json records no source model; pass the dense model with --teacher DIR")
    if not Path(source).is_dir():
        raise UserError(f"the source model recorded in {args.model}/sparsity.json, {source}, does not exist; pass the "
                        "dense model with --teacher DIR")
    return source


def _training_windows(args, tokenizer):
    """Consecutive --seqlen windows of the training text: the bundled calibration plays by default."""
    import torch

    from sparsetorch.data import demo_text

    text, source = _read_text(args.text), str(args.text)
    if text is None:
        split = demo_text()
        text, source = split.calibration, f"{split.source}: {len(split.calibration_parts)} calibration texts"
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // args.seqlen
    if count < args.batch_size:
        raise UserError(f"training text is too short: {ids.numel()} tokens make {count} windows of {args.seqlen}, "
                        f"fewer than --batch-size {args.batch_size}; use a longer --text or a smaller --seqlen")
    return ids[: count * args.seqlen].reshape(count, args.seqlen), source


def _recover_into(args, config, out: Path) -> int:
    """`sparsetorch recover` once this process holds the output's lock."""
    from sparsetorch.evaluate.perplexity import perplexity
    from sparsetorch.formats.pruned import read_sparsity, verify_dense
    from sparsetorch.models import load_model
    from sparsetorch.training.recover import check_teacher, recover

    _check_out(out, args.overwrite)  # again under the lock
    record = read_sparsity(args.model)
    verify_dense(args.model)
    teacher_path = _teacher_path(args, record)
    student, tokenizer, _ = load_model(args.model, progress=not args.quiet)
    teacher, _, _ = load_model(teacher_path, progress=not args.quiet)
    try:
        check_teacher(student, teacher)
    except ValueError as err:
        raise UserError(f"{teacher_path} cannot teach {args.model}: {err}") from None
    windows, text_source = _training_windows(args, tokenizer)
    directory = _recover_checkpoint(args, out)
    checkpoint = directory if args.checkpoint_every or directory.exists() else None
    eval_windows, eval_source = _eval_windows(args, tokenizer)
    ppl = {"teacher": perplexity(teacher, eval_windows, progress=not args.quiet),
           "before": perplexity(student, eval_windows, progress=not args.quiet)}
    args.resume_dir = checkpoint
    report = recover(student, teacher, windows, config, checkpoint=checkpoint,
                     checkpoint_every=args.checkpoint_every or config.steps + 1, progress=not args.quiet)
    ppl["after"] = perplexity(student, eval_windows, progress=not args.quiet)
    print(f"recovered {report.steps} steps in {report.seconds:.1f} s ({report.tokens_per_second:.0f} tokens/s); "
          f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    print(f"perplexity  dense teacher    {ppl['teacher']:9.3f}  ({teacher_path})")
    print(f"perplexity  before recovery  {ppl['before']:9.3f}")
    print(f"perplexity  after recovery   {ppl['after']:9.3f}  ({eval_windows.numel()} tokens of {eval_source})")
    recovery = {"teacher": str(teacher_path), "student": str(args.model), "text": text_source,
                "windows": list(windows.shape), "perplexity": {**{k: round(v, 4) for k, v in ppl.items()},
                                                               "text": eval_source, "tokens": eval_windows.numel()}}
    _save_recovered(args, out, student, tokenizer, record, recovery, report)
    if checkpoint is not None and checkpoint.exists():
        shutil.rmtree(checkpoint)
    print(f"saved to {out}")
    return 0


def _save_recovered(args, out: Path, student, tokenizer, record: dict, recovery: dict, report) -> None:
    """The input's sparsity.json with a 'recovery' record (an earlier one nested as 'previous'), in the
    same directory format and codec as `sparsetorch prune` wrote it."""
    from sparsetorch.formats.pruned import save_pruned

    summary = {key: value for key, value in report.to_dict().items() if key not in ("losses", "parts")}
    recovery = {**recovery, **summary, "loss": {"first": report.losses[0], "last": report.losses[-1]}}
    if "recovery" in record:
        recovery["previous"] = record["recovery"]
    kept = {key: value for key, value in record.items() if key not in ("source_model", "calibration", "files")}
    save_pruned(student, out, {**kept, "recovery": recovery}, tokenizer=tokenizer,
                calibration=record.get("calibration"), source=record.get("source_model"),
                codec=record.get("files", {}).get("codec", "zstd"), overwrite=args.overwrite)


def _cmd_eval(args) -> int:
    from sparsetorch.evaluate.perplexity import perplexity
    from sparsetorch.formats.pruned import load_pruned, read_sparsity, verify_dense
    from sparsetorch.models import load_model

    if args.compressed or args.sparse_runtime:
        if args.model is None:
            raise UserError("--compressed and --sparse-runtime need the directory of a pruned model")
        model = _load_sparse(args) if args.sparse_runtime else load_pruned(args.model, compressed=True)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(args.model))
        path = Path(args.model)
    else:
        if args.model is not None:
            verify_dense(args.model)
        model, tokenizer, path = load_model(args.model, progress=not args.quiet)
    windows, source = _eval_windows(args, tokenizer)
    ppl = perplexity(model, windows, progress=not args.quiet)
    print(f"perplexity {ppl:.3f}  ({path}; {windows.numel()} tokens of {source}, windows of {args.seqlen})")
    if args.compare:
        record = read_sparsity(path)
        base, _, _ = load_model(record["source_model"], progress=not args.quiet)
        base_ppl = perplexity(base, windows, progress=not args.quiet)
        print(f"perplexity {base_ppl:.3f}  (dense source {record['source_model']}); "
              f"sparse/dense = {ppl / base_ppl:.3f}x at sparsity {record['sparsity']:.2%}")
    return 0


def _runtime_config(args):
    from sparsetorch.runtime.config import RuntimeConfig

    return RuntimeConfig(batch_sizes=tuple(args.batch_sizes), policy=args.sparse_runtime)


def _load_sparse(args):
    from sparsetorch.runtime import load_sparse_model

    model, report = load_sparse_model(args.model, _runtime_config(args))
    print(f"sparse runtime: {report.summary()}")
    return model


def _cmd_bench(args) -> int:
    from sparsetorch.evaluate.bench import BenchConfig, run_bench
    from sparsetorch.formats.pruned import verify_dense

    verify_dense(args.model)
    config = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
                         rounds=args.rounds, runtime=_runtime_config(args), decoder=args.decoder)
    result = run_bench(args.model, config)
    print(result.table())
    print(f"decoder: {result.dense.decoder}")
    print(f"greedy tokens identical to the dense model: {'yes' if result.same_tokens else 'NO'}")
    print(f"sparse runtime: {result.sparse.runs[0].get('summary', '')}")
    if args.json:
        args.json.write_text(json.dumps({"dense": result.dense.runs, "sparse": result.sparse.runs}, indent=2))
    return 0


def _cmd_inspect(args) -> int:
    from sparsetorch.evaluate.inspect import format_table, layer_sparsity, plot_sparsity
    from sparsetorch.formats.pruned import SPARSITY_FILE, verify_dense

    verify_dense(args.model)
    rows = layer_sparsity(args.model)
    if args.json:
        print(json.dumps([{"name": r.name, "shape": list(r.shape), "sparsity": r.sparsity} for r in rows], indent=2))
    else:
        print(format_table(rows))
    model = Path(args.model)  # a pruned output gets its plot inside; any other model's directory is left untouched
    default = model / "sparsity.png" if (model / SPARSITY_FILE).is_file() else Path(f"{model.resolve().name}-sparsity.png")
    plot = plot_sparsity(rows, args.plot or default, title=str(args.model))
    print(f"heatmap: {plot}")
    return 0


def _cmd_export(args) -> int:
    from sparsetorch.formats.checkpoint import atomic_directory, read_grids, write_compressed
    from sparsetorch.formats.pruned import load_pruned, read_sparsity, structure_name

    record = read_sparsity(args.model)
    _check_out(args.out, args.overwrite)
    model = load_pruned(args.model, compressed=True)
    grids = read_grids(Path(args.model) / "compressed")  # a quantized model stays quantized
    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        weights = write_compressed(model, staging, record["layers"], structure=structure_name(record["pattern"]),
                                   ignore=record["config"]["ignore"], codec=args.codec, grids=grids or None)
        for item in Path(args.model, "compressed").iterdir():  # tokenizer and chat template travel along
            if item.is_file() and not (staging / item.name).exists():
                shutil.copy2(item, staging / item.name)
    print(f"wrote {args.out / weights.name} ({(args.out / weights.name).stat().st_size / 1e6:.1f} MB, codec {args.codec})")
    return 0


def _cmd_demo(args) -> int:
    from sparsetorch.evaluate.demo import DemoOptions, run_demo

    options = DemoOptions(calib_samples=args.calib_samples, seqlen=args.seqlen, eval_tokens=args.eval_tokens,
                          decode_tokens=args.decode_tokens, seed=args.seed, recover_steps=args.recover_steps,
                          codec=args.codec,
                          overwrite=args.overwrite, quiet=args.quiet)
    config = _config_from_args(args)
    out = args.out or _default_out(None, config, root="demo-out")
    _check_out(out, args.overwrite)
    started = time.perf_counter()
    run_demo(options, config, out)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _cmd_train_demo(args) -> int:
    from sparsetorch.training.demo import GPTShape, plot_curves, results_table, train_demo

    shape = GPTShape(width=args.width, layers=args.layers, context=args.context)
    results = train_demo(args.task, args.methods, sparsity=args.sparsity, steps=args.steps, seed=args.seed,
                         model=args.model, shape=shape, init=args.init)
    metric = "test loss" if args.task == "digits" else "validation loss"
    print(results_table(results, metric))
    if args.plot:
        curves = {r.label: [r.flops_curve() if args.x == "flops" else r.curve] for r in results}
        xlabel = "training FLOPs" if args.x == "flops" else "step"
        print(f"curves: {plot_curves(curves, args.plot, metric, title=f'train-demo {args.task}', xlabel=xlabel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
