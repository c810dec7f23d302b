"""Sparse matmul on one LLaMA-7B MLP layer (11008 x 4096 fp32): dense torch vs sparsetorch vs torch CSR.

    flock /work/cpu.lock python benchmarks/kernels.py          # prints the tables, appends to RESULTS.md

For each pattern (2:4, and unstructured 50/70/90% by magnitude) and batch size, every
alternative is timed in the same process, in interleaved turns, median of the turns:
dense `F.linear`, torch's CSR matmul, and each sparsetorch format through each ISA build this
CPU runs. Then `runtime.compile` decides for a one-layer model at that batch size, and the
compiled layer is timed against dense again ("after compile": never slower, it falls back).
The physical limit at batch 1 is bytes read: a format's bits per weight against dense's 32.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from results import header, publish
from sparsetorch.kernels import bind_kernel, kernel_name, supported_isas
from sparsetorch.kernels.build import load_isa
from sparsetorch.nn import compress
from sparsetorch.patterns import parse_pattern
from sparsetorch.runtime import MedianTimer, RuntimeConfig, Trial, compile


def pruned_weight(rows: int, cols: int, pattern: str, generator: torch.Generator) -> torch.Tensor:
    """A random (rows, cols) weight pruned by magnitude to `pattern` ('2:4' or a sparsity like '0.7')."""
    weight = torch.randn(rows, cols, generator=generator)
    if ":" in pattern:
        keep = parse_pattern(pattern).mask(weight.abs())
    else:
        keep = parse_pattern("unstructured").mask(weight.abs(), float(pattern))
    return weight * keep


def label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%} unstructured"


def bits_per_weight(weight) -> float:
    rows, cols = weight.shape
    return weight.nbytes * 8 / (rows * cols)


def measure(dense: torch.Tensor, weights: dict, csr: torch.Tensor, batch: int, isas: list[str], budget: float):
    """Median seconds of every alternative at one batch size, timed in interleaved turns."""
    x = torch.randn(batch, dense.shape[1])
    shape = tuple(dense.shape)
    runs = {Trial("dense", shape, batch, 1.0): lambda: F.linear(x, dense),
            Trial("torch CSR", shape, batch, 1.0): lambda: torch.sparse.mm(csr, x.t())}
    for fmt, weight in weights.items():
        for isa in isas:
            if kernel_name(weight, x, isa) == isa:
                run = bind_kernel(weight, x, isa)
                runs[Trial(f"{fmt} ({isa})", shape, batch, 1.0)] = (lambda run=run: run(x, None))
    timer = MedianTimer(budget_s=budget, min_repeats=3 if batch > 64 else 7, max_repeats=30, flush_bytes=0)
    return {t.kind: s for t, s in timer(runs).items()}


def after_compile(dense: torch.Tensor, batch: int, budget: float) -> tuple[str, float]:
    """runtime.compile a one-layer model at this batch size; (its choice, dense time / compiled time)."""
    layer = nn.Linear(dense.shape[1], dense.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(dense)
    model = nn.Sequential(layer)
    compiled = copy.deepcopy(model)
    report = compile(compiled, RuntimeConfig(batch_sizes=(batch,), targets=("Linear",), ignore=()))
    x = torch.randn(batch, dense.shape[1])
    shape = tuple(dense.shape)
    timer = MedianTimer(budget_s=budget, min_repeats=3 if batch > 64 else 7, max_repeats=30, flush_bytes=0)
    with torch.no_grad():
        seconds = timer({Trial("dense", shape, batch, 1.0): lambda: model(x),
                         Trial("compiled", shape, batch, 1.0): lambda: compiled(x)})
    by_kind = {t.kind: s for t, s in seconds.items()}
    return report.decisions[0].chosen, by_kind["dense"] / by_kind["compiled"]


def table_rows(pattern: str, batch: int, seconds: dict[str, float], weights: dict, choice: tuple[str, float]) -> list[str]:
    dense = seconds["dense"]
    rows = []
    for kind, s in seconds.items():
        fmt = kind.split(" ")[0]
        bits = bits_per_weight(weights[fmt]) if fmt in weights else 32.0
        limit = f"{32 / bits:.2f}×" if batch == 1 and kind != "torch CSR" else "–"
        bits_text = f"{bits:.1f}" if kind != "torch CSR" else "96·d"
        rows.append(f"| {label(pattern)} | {batch} | {kind} | {s * 1e3:.2f} | {dense / s:.2f}× | {bits_text} | {limit} |")
    rows.append(f"| {label(pattern)} | {batch} | **after runtime.compile** → {choice[0]} | | **{choice[1]:.2f}×** | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], help="out in (default: 11008 4096)")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "0.5", "0.7", "0.9"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 512])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed turns per table cell group")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    isas = [isa for isa in supported_isas() if load_isa(isa) is not None]
    generator = torch.Generator().manual_seed(0)
    lines = ["| pattern | batch | kernel | ms | × dense | bits/weight | limit × (b1, bytes) |", "|---|---|---|---|---|---|---|"]
    for pattern in args.patterns:
        dense = pruned_weight(*args.shape, pattern, generator)
        formats = ("nm", "bitmask", "csr16") if ":" in pattern else ("bitmask", "csr16")
        weights = {fmt: compress(dense, fmt) for fmt in formats}
        csr = dense.to_sparse_csr()
        for batch in args.batches:
            batch_isas = isas if batch <= 8 else isas[:1]
            seconds = measure(dense, weights, csr, batch, batch_isas, args.budget)
            choice = after_compile(dense, batch, args.budget)
            lines += table_rows(pattern, batch, seconds, weights, choice)
            print("\n".join(lines[-len(seconds) - 1:]), flush=True)
    rows, cols = args.shape
    publish([
        *header(f"Sparse kernels, one {rows}×{cols} fp32 layer", "kernels.py"),
        f"ISA builds run: {', '.join(isas)} (best first; `auto` uses the first). Medians of interleaved turns in one "
        "process; 'limit' is the memory-bound ideal at batch 1: 32 bits / the format's bits per weight "
        "(d = density; torch CSR stores int64 columns). 'after runtime.compile' times the compiled one-layer model "
        "against dense again.",
        "",
        *lines,
    ], append=not args.no_append)


if __name__ == "__main__":
    main()
