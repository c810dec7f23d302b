"""Sparse training benchmark: a tiny character GPT on Shakespeare, every method, 3 seeds.

Runs: dense; static random 90% (ERK); SET 90% (ERK); RigL 90% (ERK); gradual magnitude
pruning to 90% (uniform); SR-STE 2:4; and torch.ao.pruning's WeightNormSparsifier driven
by the same cubic schedule as our GMP (the peer check of our mask bookkeeping). Every run
has the same steps, batches and seed per seed index; validation loss is measured on the
held-out plays. Prints a table, writes the curves PNG and JSON next to this file, and
appends a section to benchmarks/RESULTS.md.

    flock /work/cpu.lock python benchmarks/sparse_training.py            # the full run
    python benchmarks/sparse_training.py --steps 20 --seeds 1 --no-append  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from results import machine
from sparsetorch.targets import find_targets
from sparsetorch.training.demo import GPTShape, RunResult, TrainConfig, char_corpus, plot_curves, run_gpt
from sparsetorch.training.recipes import recipe
from sparsetorch.training.sparsifier import DEFAULT_TARGETS, is_sparse_trainable

HERE = Path(__file__).resolve().parent
LABELS = {
    "dense": "dense",
    "static": "static random 90% (ERK)",
    "set": "SET 90% (ERK)",
    "rigl": "RigL 90% (ERK)",
    "gmp": "GMP to 90% (ours)",
    "torchao-gmp": "GMP to 90% (torch.ao WeightNormSparsifier)",
    "srste": "SR-STE 2:4",
}


class TorchAOGradual:
    """torch.ao.pruning's WeightNormSparsifier (unstructured, |w|) stepped by its CubicSL
    scheduler exactly at our Gradual schedule's pruning steps, one scheduler tick each."""

    def __init__(self, model: torch.nn.Module, sparsity: float, start: int, end: int, every: int) -> None:
        from torch.ao.pruning import CubicSL, WeightNormSparsifier

        self.start, self.end, self.every, self.step_count = start, end, every, 0
        self.names = list(find_targets(model, DEFAULT_TARGETS, None, prunable=is_sparse_trainable))
        self.sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
        self.sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in self.names])
        ticks = -(-(end - start) // every)
        self.scheduler = CubicSL(self.sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=ticks)
        self.model = model

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        if self.start <= t <= self.end and ((t - self.start) % self.every == 0 or t == self.end):
            self.sparsifier.step()
            self.scheduler.step()

    def sparsity(self) -> float:
        modules = dict(self.model.named_modules())
        weights = [modules[name].weight for name in self.names]  # parametrized: the masked weight
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run(method: str, seed: int, args: argparse.Namespace, corpus) -> RunResult:
    shape = GPTShape(width=args.width, layers=args.layers, heads=args.heads, context=args.context)
    base = "gmp" if method == "torchao-gmp" else method
    config = TrainConfig(method=base, sparsity=0.9, steps=args.steps, seed=seed, batch_size=args.batch,
                         lr=args.lr, weight_decay=args.weight_decay, eval_every=args.eval_every, bf16=not args.fp32)
    factory = None
    if method == "torchao-gmp":
        schedule = recipe("gmp", args.steps, 0.9).schedule

        def factory(model, optimizer):
            return TorchAOGradual(model, 0.9, schedule.start, schedule.end, schedule.every)

    result = run_gpt(config, shape, corpus, eval_windows=args.eval_windows, stepper_factory=factory)
    stepper = result.info.pop("stepper")
    if isinstance(stepper, TorchAOGradual):
        result.sparsity = stepper.sparsity()
    result.label = method
    return result


def summarize(results: dict[str, list[RunResult]]) -> tuple[dict, list[str]]:
    finals = {m: [r.final for r in runs] for m, runs in results.items()}
    stats = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in finals.items()}
    dense = stats["dense"][0] if "dense" in stats else None  # absent when --methods leaves it out
    lines = ["| run | final val loss (mean ± std) | vs dense | sparsity | seeds |", "|---|---|---|---|---|"]
    for method, (mean, std) in stats.items():
        sparsity = statistics.mean(r.sparsity for r in results[method])
        seeds = len(finals[method])
        versus = "–" if dense is None else f"{mean / dense:.3f}×"
        lines.append(f"| {LABELS[method]} | {mean:.4f} ± {std:.4f} | {versus} | {sparsity:.1%} | {seeds} |")
    return stats, lines


def checks(stats: dict) -> list[str]:
    """The issue's bars, each with the numbers it was decided on."""
    out = []
    static_mean, static_std = stats["static"]
    for method in ("rigl", "gmp"):
        mean, std = stats[method]
        gap, bar = static_mean - mean, max(std, static_std)
        out.append(f"- {LABELS[method]} beats static random by {gap:.4f} (bar: > seed std {bar:.4f}): "
                   f"{'PASS' if gap > bar else 'FAIL'}")
    ratio = stats["srste"][0] / stats["dense"][0]
    out.append(f"- SR-STE 2:4 / dense = {ratio:.4f} (bar: <= 1.03): {'PASS' if ratio <= 1.03 else 'FAIL'}")
    (ours, ours_std), (peer, peer_std) = stats["gmp"], stats["torchao-gmp"]
    bar = max(ours_std, peer_std)
    out.append(f"- our GMP vs torch.ao GMP: |{ours:.4f} - {peer:.4f}| = {abs(ours - peer):.4f} (bar: <= seed std "
               f"{bar:.4f}): {'PASS' if abs(ours - peer) <= bar else 'FAIL'}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--fp32", action="store_true", help="train in float32 (default: bfloat16 autocast)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--resume", action="store_true", help="reuse runs already in <out>/sparse_training.json")
    return parser.parse_args(argv)


SETTINGS = ("steps", "width", "layers", "heads", "context", "batch", "lr", "weight_decay", "eval_every", "eval_windows", "fp32")


def load_done(path: Path, args: argparse.Namespace) -> dict[tuple[str, int], RunResult]:
    """Runs already measured with the same settings (for --resume after an interruption)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved["settings"] != {key: getattr(args, key) for key in SETTINGS}:
        print(f"{path} holds runs with other settings; starting afresh", flush=True)
        return {}
    return {(r["label"], r["info"]["seed"]): RunResult(**{**r, "curve": [tuple(point) for point in r["curve"]]})
            for runs in saved["results"].values() for r in runs}


def save(path: Path, args: argparse.Namespace, results: dict[str, list[RunResult]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key) for key in SETTINGS}
    raw = {m: [asdict(r) for r in runs] for m, runs in results.items()}
    path.write_text(json.dumps({"settings": settings, "results": raw}, indent=1))


def run_all(args: argparse.Namespace, corpus) -> dict[str, list[RunResult]]:
    path = args.out / "sparse_training.json"
    done = load_done(path, args) if args.resume else {}
    results: dict[str, list[RunResult]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        for method in args.methods:
            result = done.get((method, seed))
            if result is None:
                result = run(method, seed, args, corpus)
                result.info["seed"] = seed
            results[method].append(result)
            save(path, args, results)
            print(f"seed {seed} {method:12s} val loss {result.final:.4f}  sparsity {result.sparsity:.1%}  "
                  f"{result.seconds:.0f} s", flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, list[RunResult]], corpus, command: str) -> list[str]:
    """The table, the verdicts and the PNG; returns the RESULTS.md section."""
    stats, table = summarize(results)
    verdicts = checks(stats) if set(LABELS) <= set(results) and args.seeds > 1 else []
    print("\n".join([*table, "", *verdicts]))
    plot = plot_curves({LABELS[m]: [r.curve for r in runs] for m, runs in results.items()},
                       args.out / "sparse_training.png", "validation loss (held-out plays)",
                       title=f"tiny GPT {args.layers}x{args.width}, ctx {args.context}, {args.steps} steps, {args.seeds} seeds")
    minutes = sum(r.seconds for runs in results.values() for r in runs) / 60
    return [
        f"## Sparse training: tiny GPT on Shakespeare ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, Python {platform.python_version()}, {machine()}; {minutes:.0f} min of training in all.  ",
        f"Model: {args.layers} blocks, width {args.width}, {args.heads} heads, context {args.context} characters, "
        f"vocabulary {len(corpus.vocab)} ({corpus.source}); AdamW lr {args.lr} (5% warm-up, cosine to 10%), "
        f"weight decay {args.weight_decay}, batch {args.batch}, {args.steps} steps, grad clip 1.0, "
        f"{'float32' if args.fp32 else 'bfloat16 autocast (float32 weights)'}. Validation (float32): "
        f"{args.eval_windows} windows of the held-out plays. Targets: every Linear in the blocks (lm_head and "
        "embeddings dense).",
        "",
        *table,
        "",
        *verdicts,
        "",
        f"Curves: `{plot.name}`; raw numbers: `sparse_training.json`.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = char_corpus()
    results = run_all(args, corpus)
    command = "python benchmarks/sparse_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = report(args, results, corpus, command.strip())
    if not args.no_append:
        results_md = HERE / "RESULTS.md"
        previous = results_md.read_text() if results_md.exists() else "# Benchmark results\n\n"
        results_md.write_text(previous.rstrip("\n") + "\n\n" + "\n".join(section))
        print(f"appended to {results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
