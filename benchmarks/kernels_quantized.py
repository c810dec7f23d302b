"""Decode (batch 1) on one 2048 x 8192 layer: dense fp32 vs the fp32 bitmask kernel vs the quantized kernels.

    flock /work/cpu.lock python benchmarks/kernels_quantized.py [--threads 2] [--batch 1]

Every alternative is timed in the same process, in interleaved turns, caches flushed before each
call (decode reads the weight from memory), median of the turns. Dense bf16 through PyTorch (what
a CPU user of PyTorch would run instead) is timed beside them. Prints a table (median time, speedup
over dense fp32 and over dense bf16, bits read per weight: the memory-bound limit of the speedup
over fp32 is 32 / bits) and appends it to RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from results import header, publish
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.kernels import bind_kernel, kernel_name
from sparsetorch.quantize import QuantScheme, find_grid
from sparsetorch.runtime.timing import MedianTimer, Trial


def nm_dense(dense: torch.Tensor) -> torch.Tensor:
    """`dense` keeping the 2 largest magnitudes of every 4 consecutive inputs (2:4)."""
    groups = dense.view(dense.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).view(dense.shape)


def candidates(rows: int, cols: int, generator: torch.Generator) -> dict:
    """name -> weight in its format (None: dense fp32 through F.linear)."""
    dense = torch.randn(rows, cols, generator=generator)
    half = dense * (torch.rand(rows, cols, generator=generator) > 0.5)  # 50% unstructured
    two_four = nm_dense(dense)

    def quantized(weight, scheme, structure, *layout):
        return QuantizedTensor.from_dense(weight, find_grid(weight, scheme, weight != 0), structure, *layout)

    return {
        "dense fp32 (torch)": None,
        "dense bf16 (torch)": "bf16",
        "bitmask fp32, 50%": BitmaskTensor.from_dense(half),
        "bitmask-int8, 50%": quantized(half, QuantScheme(8), "bitmask"),
        "dense-int8": quantized(dense, QuantScheme(8), "dense"),
        "nm-int4 2:4, g128": quantized(two_four, QuantScheme(4, 128), "nm", 2, 4),
        "dense-int4, g128": quantized(dense, QuantScheme(4, 128), "dense"),
    }


def _bits(weight, count: int) -> float:
    """Bits read per weight: fp32 and bf16 dense, or a format's bytes."""
    if weight is None or isinstance(weight, str):
        return 16.0 if weight == "bf16" else 32.0
    return weight.nbytes * 8 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = candidates(args.rows, args.cols, torch.Generator().manual_seed(0))
    dense = torch.randn(args.rows, args.cols)
    x = torch.randn(args.batch, args.cols)
    dense_bf16, x_bf16 = dense.bfloat16(), x.bfloat16()
    shape, runs, kernels = (args.rows, args.cols), {}, {}
    for name, weight in weights.items():
        if weight is None or isinstance(weight, str):
            bf16 = weight == "bf16"
            runs[Trial(name, shape, args.batch, 1.0)] = (lambda: F.linear(x_bf16, dense_bf16)) if bf16 else \
                (lambda: F.linear(x, dense))
            kernels[name] = "torch"
            continue
        run = bind_kernel(weight, x)
        runs[Trial(name, shape, args.batch, 1.0)] = lambda run=run: run(x, None)
        kernels[name] = kernel_name(weight, x)
    timer = MedianTimer(budget_s=args.budget, min_repeats=9, max_repeats=60)
    seconds = {trial.kind: s for trial, s in timer(runs).items()}
    base, bf16 = seconds["dense fp32 (torch)"], seconds["dense bf16 (torch)"]
    lines = [f"One {args.rows}×{args.cols} layer, batch {args.batch}, {args.threads} threads; median of interleaved "
             "turns, caches flushed before each call. 'limit': 32 / bits, the memory-bound ceiling over fp32.", "",
             "| weight | kernel | median µs | vs dense fp32 | vs dense bf16 | bits/weight | limit |",
             "|---|---|---|---|---|---|---|"]
    for name, weight in weights.items():
        bits = _bits(weight, args.rows * args.cols)
        lines.append(f"| {name} | {kernels[name]} | {seconds[name] * 1e6:.0f} | {base / seconds[name]:.2f}× | "
                     f"{bf16 / seconds[name]:.2f}× | {bits:.2f} | {32 / bits:.2f}× |")
    publish([*header("Quantized sparse kernels, one layer (issue 15)", "kernels_quantized.py"), *lines, ""],
            append=not args.no_append)


if __name__ == "__main__":
    main()
