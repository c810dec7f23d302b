"""Greedy decode of the bundled SmolLM2-135M, pruned 2:4 and 70% unstructured: dense vs sparse runtime.

    flock /work/cpu.lock python benchmarks/decode_llm.py        # prints the table, appends to RESULTS.md

The model is pruned with Wanda on a few calibration windows (quality is not the point here;
lm_head stays dense) and saved with `save_pruned`. Then `sparsetorch bench`'s logic runs the
dense-pruned model (dense matmuls over the zeros) and the sparse runtime (loaded from the
compressed directory, no dense weights) each in fresh processes, alternating, through the same
greedy KV-cache decode loop, and compares tokens/s, the generated tokens and peak RSS. The loop
runs in sparsetorch's lean Llama decoder (`runtime.lean`: the processes never import
transformers); `--decoder transformers` runs transformers' LlamaForCausalLM instead.

Physical limit: a decode step reads every Linear weight once, so its best time scales with
bytes read. 'bytes limit' is dense bytes / sparse bytes; 'with the rest' also keeps the
non-Linear share of the dense step's time (measured) fixed, which no kernel can shrink.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from results import header, publish
from sparsetorch.evaluate.bench import BenchConfig, BenchResult, run_bench
from sparsetorch.evaluate.bench_worker import DECODERS
from sparsetorch.runtime import RuntimeConfig

WORK = Path(__file__).parent / "_work" / "decode_llm"
PATTERNS = {"2:4": ("2:4", None), "70%": ("unstructured", 0.7)}
DECODER_NOTES = {
    "lean": "Decoder: sparsetorch's lean Llama (`runtime.lean`); transformers is never imported.",
    "auto": "Decoder: sparsetorch's lean Llama (`runtime.lean`, 'auto'); transformers is never imported.",
    "transformers": "Decoder: transformers' LlamaForCausalLM and AutoTokenizer (their imports are in the peak RSS).",
}


def prepare(name: str, samples: int, seqlen: int) -> Path:
    """The pruned directory for `name` ('2:4' or '70%'), pruned and saved once, then reused."""
    out = WORK / name.replace(":", "of").replace("%", "pct")
    if (out / "sparsity.json").exists():
        return out
    import sparsetorch
    from sparsetorch.data import calibration_windows, demo_text
    from sparsetorch.formats.pruned import save_pruned
    from sparsetorch.models import load_model

    model, tokenizer, path = load_model(None, progress=False)
    windows = calibration_windows(tokenizer, demo_text().calibration, samples, seqlen, seed=0)
    pattern, sparsity = PATTERNS[name]
    report = sparsetorch.prune(model, windows, method="wanda", pattern=pattern, sparsity=sparsity, progress=False)
    save_pruned(model, out, report.to_dict(), tokenizer=tokenizer, source=str(path), overwrite=True)
    return out


def limits(result: BenchResult) -> tuple[float, float]:
    """(bytes limit, limit with the measured non-Linear time of the dense step) for the decode speedup."""
    dense_bytes = result.dense.runs[0]["weight_bytes"]["dense_linear"]
    sparse = result.sparse.runs[0]["weight_bytes"]
    sparse_bytes = sparse["dense_linear"] + sparse["sparse_linear"]
    share = result.dense.linear_share
    return dense_bytes / sparse_bytes, 1 / ((1 - share) + share * sparse_bytes / dense_bytes)


def row(name: str, result: BenchResult) -> str:
    d, s = result.dense, result.sparse
    speed = s.decode_tokens_per_second / d.decode_tokens_per_second
    bytes_limit, amdahl = limits(result)
    return (f"| {name} | {d.decode_tokens_per_second:.2f} | {s.decode_tokens_per_second:.2f} | **{speed:.2f}×** "
            f"| {bytes_limit:.2f}× | {amdahl:.2f}× | {'yes' if result.same_tokens else 'NO'} "
            f"| {d.linear_share:.0%} / {s.linear_share:.0%} | {d.peak_rss_bytes / 1e6:.0f} / {s.peak_rss_bytes / 1e6:.0f} "
            f"(**{s.peak_rss_bytes / d.peak_rss_bytes:.2f}×**) "
            f"| {d.prefill_tokens_per_second:.0f} / {s.prefill_tokens_per_second:.0f} "
            f"({s.prefill_tokens_per_second / d.prefill_tokens_per_second:.2f}×) "
            f"| {d.disk_bytes / 1e6:.0f} / {s.disk_bytes / 1e6:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, alternating")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--decoder", choices=DECODERS, default="lean",
                        help="the decode loop of both variants (default: lean, no transformers in the process)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    config = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
                         rounds=args.rounds, runtime=RuntimeConfig(batch_sizes=(1,)), decoder=args.decoder)
    lines = ["| pruned | dense tok/s | sparse tok/s | decode speedup | bytes limit | limit with the rest "
             "| same tokens | Linear share of decode (dense / sparse) | peak RSS MB (dense / sparse) "
             "| prefill tok/s (dense / sparse) | weights on disk MB (dense / compressed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in args.patterns:
        directory = prepare(name, args.calib_samples, args.calib_seqlen)
        result = run_bench(directory, config)
        lines.append(row(name, result))
        notes.append(f"- {name}: sparse runtime {result.sparse.runs[0]['summary']}")
        print(lines[-1], flush=True)
    publish([
        *header("Decode speed, SmolLM2-135M-Instruct pruned (lm_head dense)", "decode_llm.py"),
        f"Wanda on {args.calib_samples} calibration windows × {args.calib_seqlen} tokens; greedy decode of "
        f"{args.decode_tokens} tokens after a short prompt, prefill of one {args.prefill_tokens}-token window; "
        f"{args.rounds} fresh processes per variant, alternating, {args.repeats} timed repeats each; medians. "
        "Dense = the pruned model's dense weights (model.safetensors); sparse = `runtime.load_sparse_model` on the "
        "compressed directory (no dense weights), decided at batch size 1. "
        f"{DECODER_NOTES[args.decoder]} Peak RSS is the whole worker process (Python and torch included); the "
        "parent tokenizes the prompt and prefill text once and passes the ids, and each worker keeps glibc's mmap "
        "threshold at 128 KiB (`sparsetorch.malloc`) so freed buffers leave the resident set (both variants alike). "
        "Linear share: time inside Linear/SparseLinear forwards in one instrumented decode (lm_head included).",
        "",
        *lines,
        "",
        *notes,
    ], append=not args.no_append)


if __name__ == "__main__":
    main()
