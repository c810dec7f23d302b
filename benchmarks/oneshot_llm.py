"""One-shot pruning of the bundled SmolLM2-135M: sparsetorch vs llm-compressor, same data.

    python benchmarks/oneshot_llm.py                       # everything, appends to RESULTS.md
    python benchmarks/oneshot_llm.py --reference-python /path/to/llmc-venv/bin/python

For dense, magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4, and for
llm-compressor 0.14's Wanda and SparseGPT on exactly the same calibration windows, it
reports perplexity on held-out plays, measured sparsity, prune wall time and peak RSS.
Every pruning run happens in its own process (so peak RSS is that run's own), one at a
time; all perplexities are computed afterwards by the same code from the saved weights.
llm-compressor runs in its own virtual environment (it pins its own transformers),
built in benchmarks/_work/llmc-venv on first use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from results import machine, publish

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
REFERENCE_SPEC = ["llmcompressor==0.14.0.1", "torch==2.13.0"]
CONFIGS = [  # (method, pattern label, our pattern, llm-compressor mask_structure)
    ("magnitude", "50% unstructured", "unstructured", None),
    ("wanda", "50% unstructured", "unstructured-row", "0:0"),
    ("sparsegpt", "50% unstructured", "unstructured", "0:0"),
    ("magnitude", "2:4", "2:4", None),
    ("wanda", "2:4", "2:4", "2:4"),
    ("sparsegpt", "2:4", "2:4", "2:4"),
]


# sparsetorch's variants, LAYER_INPUTS:CALIB_DTYPE: the default, the papers' and llm-compressor's statistics
# ('dense'), and the opt-in faster orders ('mixed', 'pruned'), all in fp32 (bf16 statistics, e.g.
# dense:bfloat16, make the perplexity fragile: benchmarks/RESULTS.md).
VARIANTS = ("dense:model", "mixed:model", "pruned:model")


def _variant(text: str) -> str:
    from sparsetorch import PruneConfig

    layer_inputs, _, calib_dtype = text.partition(":")
    try:
        PruneConfig(layer_inputs=layer_inputs, calib_dtype=calib_dtype or "model")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return f"{layer_inputs}:{calib_dtype or 'model'}"


@dataclass
class Run:
    tool: str
    method: str
    pattern: str
    weights: Path | None = None
    seconds: float | None = None
    peak_rss_gib: float | None = None
    perplexity: float | None = None
    sparsity: float | None = None


def worker(args: argparse.Namespace) -> None:
    """Prune with sparsetorch in this process and save the pruned linear weights."""
    from safetensors.torch import save_file

    import sparsetorch
    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.models import load_model

    model, _, _ = load_model(None, progress=False)
    windows = torch.load(args.calibration)
    started = time.perf_counter()
    report = sparsetorch.prune(model, windows, method=args.method, pattern=args.pattern,
                               layer_inputs=args.layer_inputs, calib_dtype=args.calib_dtype, progress=False)
    seconds = time.perf_counter() - started
    modules = dict(model.named_modules())
    save_file({f"{name}.weight": modules[name].weight.detach().contiguous() for name in report.layers}, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_bytes() / 2**30}))


def _run_json(command: list[str], log: Path) -> dict:
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def reference_python(given: str | None) -> Path:
    """The llm-compressor environment's python, creating the environment if needed."""
    if given:
        return Path(given)
    venv = WORK / "llmc-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating llm-compressor environment in {venv} (once, a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_SPEC], check=True)
    return python


def _version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version('{package}'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip() or "?"


def _ours(method: str, label: str, pattern: str, layer_inputs: str, calibration: Path, calib_dtype: str) -> Run:
    tag = f"{method}-{pattern.replace(':', 'of')}-{layer_inputs}-{calib_dtype}"
    precision = "" if calib_dtype == "model" else f", {calib_dtype} statistics"
    tool = "sparsetorch" if method == "magnitude" else f"sparsetorch ({layer_inputs} inputs{precision})"
    run = Run(tool, method, label, WORK / f"ours-{tag}.safetensors")
    print(f"{tool} {method} {label} ...", flush=True)
    stats = _run_json([sys.executable, __file__, "worker", "--method", method, "--pattern", pattern,
                       "--layer-inputs", layer_inputs, "--calib-dtype", calib_dtype, "--calibration", str(calibration),
                       "--out", str(run.weights)],
                      WORK / f"ours-{tag}.log")
    run.seconds, run.peak_rss_gib = stats["seconds"], stats["peak_rss_gib"]
    return run


def prune_all(calibration: Path, ref_python: Path | None, model_dir: Path, variants: list[str],
              methods: list[str]) -> list[Run]:
    runs = []
    for method, label, ours, theirs in CONFIGS:
        if method not in methods:
            continue
        for variant in ["dense:model"] if method == "magnitude" else variants:  # magnitude uses no calibration
            layer_inputs, calib_dtype = variant.split(":")
            runs.append(_ours(method, label, ours, layer_inputs, calibration, calib_dtype))
        if theirs is None or ref_python is None:
            continue
        tag = f"{method}-{ours.replace(':', 'of')}"
        run = Run("llm-compressor", method, label, WORK / f"llmc-{tag}.safetensors")
        print(f"llm-compressor {method} {label} ...", flush=True)
        stats = _run_json([str(ref_python), str(HERE / "llmcompressor_worker.py"), "--model", str(model_dir),
                           "--calibration", str(calibration), "--method", method, "--structure", theirs,
                           "--out", str(run.weights)], WORK / f"llmc-{tag}.log")
        run.seconds, run.peak_rss_gib = stats["seconds"], stats["peak_rss_gib"]
        runs.append(run)
    return runs


def evaluate_all(runs: list[Run], windows: torch.Tensor) -> float:
    """Perplexity and sparsity of every run, by the same code; returns the dense perplexity."""
    from safetensors.torch import load_file

    from sparsetorch.evaluate.perplexity import perplexity
    from sparsetorch.models import load_model

    model, _, _ = load_model(None, progress=False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, windows, progress=False)
    for run in runs:
        weights = load_file(run.weights)
        model.load_state_dict(dense_state)
        model.load_state_dict(weights, strict=False)
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        run.sparsity = zeros / sum(w.numel() for w in weights.values())
        run.perplexity = perplexity(model, windows, progress=False)
        print(f"{run.tool:15s} {run.method:10s} {run.pattern:17s} ppl {run.perplexity:8.3f}", flush=True)
    return dense


def _find(runs: list[Run], tool: str, method: str, pattern: str) -> Run | None:
    return next((r for r in runs if (r.tool, r.method, r.pattern) == (tool, method, pattern)), None)


def tables(runs: list[Run], dense: float) -> str:
    lines = [
        "| tool | method | pattern | perplexity | vs dense | sparsity | prune s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| – | dense | – | {dense:.3f} | 1.00× | 0% | – | – |",
    ]
    for r in runs:
        lines.append(f"| {r.tool} | {r.method} | {r.pattern} | {r.perplexity:.3f} | {r.perplexity / dense:.2f}× "
                     f"| {r.sparsity:.2%} | {r.seconds:.1f} | {r.peak_rss_gib:.2f} |")
    lines += [
        "",
        "Ours / llm-compressor, same method, pattern and calibration windows "
        "(bars: perplexity ≤ 1.01×, prune time ≤ 0.5×):",
        "",
        "| ours | method | pattern | perplexity ratio | prune time ratio | peak RSS ratio | bars |",
        "|---|---|---|---|---|---|---|",
    ]
    for ours in runs:
        theirs = _find(runs, "llm-compressor", ours.method, ours.pattern)
        if not ours.tool.startswith("sparsetorch") or theirs is None:
            continue
        ppl, secs = ours.perplexity / theirs.perplexity, ours.seconds / theirs.seconds
        verdict = "met" if ppl <= 1.01 and secs <= 0.5 else "NOT met"
        lines.append(f"| {ours.tool} | {ours.method} | {ours.pattern} | {ppl:.4f}× | {secs:.2f}× "
                     f"| {ours.peak_rss_gib / theirs.peak_rss_gib:.2f}× | {verdict} |")
    return "\n".join(lines)


def prepare_data(samples: int, seqlen: int, eval_tokens: int, name: str) -> tuple[Path, object, Path, torch.Tensor]:
    """(the bundled model's directory, the text split, calibration windows saved as WORK/name, held-out windows)."""
    from sparsetorch.data import calibration_windows, demo_text, evaluation_windows
    from sparsetorch.models import demo_model_dir, load_model

    WORK.mkdir(exist_ok=True)
    model_dir = demo_model_dir()
    _, tokenizer, _ = load_model(None, progress=False)
    split = demo_text()
    calibration = WORK / name
    torch.save(calibration_windows(tokenizer, split.calibration, samples, seqlen, seed=0), calibration)
    return model_dir, split, calibration, evaluation_windows(tokenizer, split.evaluation, eval_tokens, seqlen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="internal: one sparsetorch pruning run")
    w.add_argument("--method", required=True)
    w.add_argument("--pattern", required=True)
    w.add_argument("--calibration", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--layer-inputs", default="dense")
    w.add_argument("--calib-dtype", default="model")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens (default: 16384)")
    parser.add_argument("--variants", nargs="+", type=_variant, default=list(VARIANTS),
                        help="sparsetorch runs for Wanda and SparseGPT, as LAYER_INPUTS:CALIB_DTYPE "
                             f"(default: {' '.join(VARIANTS)})")
    methods = list(dict.fromkeys(method for method, *_ in CONFIGS))
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods, help="methods to run (default: all)")
    parser.add_argument("--reference-python", help="python of an existing llm-compressor 0.14 environment")
    parser.add_argument("--skip-reference", action="store_true", help="run sparsetorch only")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
        return

    started, machine_line = time.time(), machine()  # the load average as the run begins
    model_dir, split, calibration, windows = prepare_data(args.samples, args.seqlen, args.eval_tokens, "calibration.pt")
    ref_python = None if args.skip_reference else reference_python(args.reference_python)
    runs = prune_all(calibration, ref_python, model_dir, args.variants, args.methods)
    dense = evaluate_all(runs, windows)
    table = tables(runs, dense)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if ref_python is not None:
        versions += (f"; reference: llmcompressor {_version(ref_python, 'llmcompressor')}, "
                     f"transformers {_version(ref_python, 'transformers')}")
    command = " ".join(["python", "benchmarks/oneshot_llm.py", *sys.argv[1:]])
    section = "\n".join([
        f"## One-shot pruning, SmolLM2-135M-Instruct ({datetime.date.today()})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line}; {versions}  ",
        f"Data: {args.samples} calibration windows × {args.seqlen} tokens from {split.source} "
        f"({len(split.calibration_parts)} calibration plays), perplexity on {windows.numel()} tokens of "
        f"held-out {', '.join(split.evaluation_parts)}; every run prunes all 210 linear layers of the 30 blocks "
        "(lm_head dense). Prune time is the pruning call only (model loading excluded), peak RSS is the "
        f"whole pruning process. Total benchmark time {(time.time() - started) / 60:.0f} min.",
        "",
        table,
        "",
        "llm-compressor's magnitude modifier is a training-time schedule with no one-shot counterpart, so "
        "magnitude has no reference row. `layer_inputs`: 'dense' calibrates every layer of a block "
        "on the dense block's activations, as the Wanda and SparseGPT papers and llm-compressor do (the default; a statistics "
        "pass, then a pass of the pruned block for the next block's inputs); 'mixed' does the same "
        "except for the block's last layer (down_proj), calibrated inside the pruned block's pass; 'pruned' calibrates each "
        "layer on the outputs of the already-pruned layers before it, in a single pass. 'bfloat16 statistics': "
        "the statistics pass runs in bf16 autocast, the pass that feeds the next block in fp32.",
        "",
    ])
    publish([section], append=not args.no_append)


if __name__ == "__main__":
    main()
