"""Quality of one-shot pruning on the bundled SmolLM2-135M, on two held-out texts of different domains.

    python benchmarks/quality_llm.py                                   # Wanda and SparseGPT, uniform vs OWL, 70%
    python benchmarks/quality_llm.py --methods wanda --sparsities 0.5 0.7 --allocations uniform owl depth

Calibration windows come from the Shakespeare plays sparsetorch calibrates on; perplexity is measured on
the held-out plays (Hamlet, Macbeth, Othello) and on CPython's language reference (`pydoc_data.topics`,
technical English prose that neither calibration nor any default touches), so a gain cannot be one
text's. Each run prunes a fresh copy of the model in this process, one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from results import machine, publish


def _texts(tokenizer, tokens: int, seqlen: int) -> dict[str, torch.Tensor]:
    from pydoc_data.topics import topics

    from sparsetorch.data import demo_text, evaluation_windows

    split = demo_text()
    reference = "\n".join(topics[key] for key in sorted(topics))
    return {"held-out plays": evaluation_windows(tokenizer, split.evaluation, tokens, seqlen),
            "Python reference": evaluation_windows(tokenizer, reference, tokens, seqlen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "owl"])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation text (default: 16384)")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append to RESULTS.md")
    args = parser.parse_args()

    import sparsetorch
    from sparsetorch.data import calibration_windows, demo_text
    from sparsetorch.evaluate.perplexity import perplexity
    from sparsetorch.models import load_model

    started, machine_line = time.time(), machine()
    model, tokenizer, _ = load_model(None, progress=False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calibration_windows(tokenizer, demo_text().calibration, args.samples, args.seqlen, seed=0)
    texts = _texts(tokenizer, args.eval_tokens, args.seqlen)
    dense = {name: perplexity(model, ids, progress=False) for name, ids in texts.items()}
    rows = []
    for method in args.methods:
        for sparsity in args.sparsities:
            for allocation in args.allocations:
                model.load_state_dict(dense_state)
                report = sparsetorch.prune(model, windows, method=method, sparsity=sparsity, allocation=allocation,
                                           progress=False)
                ppl = {name: perplexity(model, ids, progress=False) for name, ids in texts.items()}
                rows.append((method, sparsity, allocation, report.seconds, ppl))
                print(method, sparsity, allocation, f"{report.seconds:.1f} s", ppl, flush=True)
    names = list(texts)
    lines = ["| method | sparsity | allocation | " + " | ".join(f"{n} ppl (× dense)" for n in names) + " | prune s |",
             "|---|---|---|" + "---|" * len(names) + "---|",
             "| dense | 0% | – | " + " | ".join(f"{dense[n]:.2f}" for n in names) + " | – |"]
    for method, sparsity, allocation, seconds, ppl in rows:
        cells = " | ".join(f"{ppl[n]:.2f} ({ppl[n] / dense[n]:.2f}×)" for n in names)
        lines.append(f"| {method} | {sparsity:.0%} | {allocation} | {cells} | {seconds:.1f} |")
    section = "\n".join([
        f"## Quality of one-shot pruning on two texts, SmolLM2-135M-Instruct ({datetime.date.today()})",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/quality_llm.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine_line}  ",
        f"Data: {args.samples} calibration windows × {args.seqlen} tokens from the calibration plays; perplexity "
        f"on {args.eval_tokens} tokens of each text, windows of {args.seqlen}; 'dense' layer inputs; "
        f"total {(time.time() - started) / 60:.0f} min.",
        "",
        *lines,
        "",
    ])
    publish([section], append=not args.no_append)


if __name__ == "__main__":
    main()
