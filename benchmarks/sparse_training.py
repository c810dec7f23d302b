"""Sparse training benchmark: a tiny character GPT on Shakespeare, every method, 3 seeds.

Runs: dense; static random 90% (ERK); SET 90% (ERK); RigL 90% (ERK); gradual magnitude
pruning to 90% (uniform); SR-STE 2:4; and torch.ao.pruning's WeightNormSparsifier driven
by the same cubic schedule as our GMP (the peer check of our mask bookkeeping). Every run
has the same steps, batches and seed per seed index; validation loss is measured on the
held-out plays. The from-scratch methods also train with 2x and 5x the steps
(`--budgets`, `--budget-methods`), and every run records the training FLOPs it spent, for
comparing methods at equal compute. Prints a table, writes the curves PNG, the
loss-against-FLOPs PNG and the JSON next to this file, and appends a section to
benchmarks/RESULTS.md. `--soups` runs the sparse model soups protocol instead
(`sparse_soups.py`).

    flock /work/cpu.lock python benchmarks/sparse_training.py            # the full run
    flock /work/cpu.lock python benchmarks/sparse_training.py --soups    # sparse model soups
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
from sparsetorch.training.sparsifier import DEFAULT_TARGETS, INITS, is_sparse_trainable

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


def gpt_shape(args: argparse.Namespace) -> GPTShape:
    return GPTShape(width=args.width, layers=args.layers, heads=args.heads, context=args.context)


def gpt_config(args: argparse.Namespace, method: str, seed: int, budget: int = 1) -> TrainConfig:
    """The benchmark's run of `method` (a recipe name) with `budget` times the steps."""
    return TrainConfig(method=method, sparsity=0.9, steps=args.steps * budget, seed=seed, batch_size=args.batch,
                       lr=args.lr, weight_decay=args.weight_decay, eval_every=args.eval_every, bf16=not args.fp32,
                       init=args.init)


def label(method: str, budget: int) -> str:
    """The run's key in the JSON: the method, with '-<budget>x' for longer runs."""
    return method if budget == 1 else f"{method}-{budget}x"


def run(method: str, budget: int, seed: int, args: argparse.Namespace, corpus) -> RunResult:
    config = gpt_config(args, "gmp" if method == "torchao-gmp" else method, seed, budget)
    factory = None
    if method == "torchao-gmp":
        schedule = recipe("gmp", config.steps, 0.9).schedule

        def factory(model, optimizer):
            return TorchAOGradual(model, 0.9, schedule.start, schedule.end, schedule.every)

    result = run_gpt(config, gpt_shape(args), corpus, eval_windows=args.eval_windows, stepper_factory=factory)
    stepper = result.info.pop("stepper")
    if isinstance(stepper, TorchAOGradual):
        result.sparsity = stepper.sparsity()
    result.label = label(method, budget)
    result.info.update(method=method, seed=seed, budget=budget, steps=config.steps)
    return result


def describe(runs: list[RunResult]) -> str:
    method, budget = runs[0].info["method"], runs[0].info["budget"]
    return LABELS[method] if budget == 1 else f"{LABELS[method]}, {budget}× steps"


def total_flops(runs: list[RunResult]) -> float | None:
    """Mean training FLOPs of the runs (None where the stepper did not count them)."""
    return statistics.mean(r.flops[-1] for r in runs) if all(r.flops for r in runs) else None


def in_order(results: dict[str, list[RunResult]]) -> dict[str, list[RunResult]]:
    """The runs by method (in LABELS order), then by budget."""
    def rank(key: str) -> tuple[int, int]:
        info = results[key][0].info
        return list(LABELS).index(info["method"]), info["budget"]

    return {key: results[key] for key in sorted(results, key=rank)}


def summarize(results: dict[str, list[RunResult]]) -> tuple[dict, list[str]]:
    results = in_order(results)
    finals = {key: [r.final for r in runs] for key, runs in results.items()}
    stats = {key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for key, v in finals.items()}
    dense = stats["dense"][0] if "dense" in stats else None  # absent when --methods leaves it out
    lines = ["| run | budget | steps | training FLOPs | final val loss (mean ± std) | vs dense | sparsity | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for key, (mean, std) in stats.items():
        runs = results[key]
        sparsity = statistics.mean(r.sparsity for r in runs)
        flops = total_flops(runs)
        versus = "–" if dense is None else f"{mean / dense:.3f}×"
        lines.append(f"| {describe(runs)} | {runs[0].info['budget']}× | {runs[0].info['steps']} | "
                     f"{'–' if flops is None else f'{flops:.3g}'} | {mean:.4f} ± {std:.4f} | {versus} | {sparsity:.1%} | "
                     f"{len(runs)} |")
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


def plot_flops(results: dict[str, list[RunResult]], path: Path, title: str) -> Path:
    """Final validation loss against training FLOPs (log x): one point per method and budget,
    the mean over seeds with min-max error bars, a method's budgets joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    counted = [runs for runs in in_order(results).values() if total_flops(runs) is not None]
    for method in LABELS:
        groups = [runs for runs in counted if runs[0].info["method"] == method]  # one per budget, ascending
        if not groups:
            continue
        x = [total_flops(runs) for runs in groups]
        finals = [[r.final for r in runs] for runs in groups]
        y = [statistics.mean(values) for values in finals]
        spread = [[mean - min(values) for mean, values in zip(y, finals)],
                  [max(values) - mean for mean, values in zip(y, finals)]]
        ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=LABELS[method])
        for xi, yi, runs in zip(x, y, groups):
            if runs[0].info["budget"] != 1:
                ax.annotate(f"{runs[0].info['budget']}×", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (Linear layers, forward + backward)")
    ax.set_ylabel("final validation loss (held-out plays)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 5],
                        help="step multiples to run the --budget-methods at (every method runs at 1x)")
    parser.add_argument("--budget-methods", nargs="+", default=["static", "set", "rigl"], choices=list(LABELS))
    parser.add_argument("--init", choices=INITS, default="sparse", help="the Sparsifier's initialization")
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
    parser.add_argument("--resume", action="store_true", help="reuse runs already in the JSON under <out>")
    soups = parser.add_argument_group("sparse model soups (--soups)")
    soups.add_argument("--soups", action="store_true", help="run the sparse model soups protocol instead of the table")
    soups.add_argument("--soup-k", type=int, default=4, help="retrainings (soup ingredients) per seed")
    soups.add_argument("--soup-steps", type=int, help="steps of each retraining (default: half of --steps)")
    soups.add_argument("--soup-lrs", nargs="+", type=float,
                       help="peak learning rates, cycled over the ingredients (default: --lr for all)")
    args = parser.parse_args(argv)
    if min(args.budgets) < 1 or 1 not in args.budgets:
        parser.error(f"--budgets must be whole multiples >= 1 and include 1, got {args.budgets}")
    args.soup_steps = args.soup_steps or max(2, args.steps // 2)
    args.soup_lrs = args.soup_lrs or [args.lr]
    return args


SETTINGS = ("steps", "width", "layers", "heads", "context", "batch", "lr", "weight_decay", "eval_every", "eval_windows", "fp32",
            "init")


def settings(args: argparse.Namespace, names: tuple[str, ...] = SETTINGS) -> dict:
    return {name: getattr(args, name) for name in names}


def load_done(path: Path, args: argparse.Namespace) -> dict[tuple[str, int], RunResult]:
    """Runs already measured with the same settings (for --resume after an interruption)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved["settings"] != settings(args):
        print(f"{path} holds runs with other settings; starting afresh", flush=True)
        return {}
    return {(r["label"], r["info"]["seed"]): RunResult(**{**r, "curve": [tuple(point) for point in r["curve"]]})
            for runs in saved["results"].values() for r in runs}


def save(path: Path, args: argparse.Namespace, results: dict[str, list[RunResult]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {key: [asdict(r) for r in runs] for key, runs in results.items()}
    path.write_text(json.dumps({"settings": settings(args), "results": raw}, indent=1))


def planned(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(budget, seed, method) of every run, the 1x table first."""
    return [(budget, seed, method) for budget in sorted(args.budgets) for seed in range(args.seeds)
            for method in args.methods if budget == 1 or method in args.budget_methods]


def run_all(args: argparse.Namespace, corpus) -> dict[str, list[RunResult]]:
    path = args.out / "sparse_training.json"
    done = load_done(path, args) if args.resume else {}
    results: dict[str, list[RunResult]] = {}
    for budget, seed, method in planned(args):
        result = done.get((label(method, budget), seed))
        if result is None:
            result = run(method, budget, seed, args, corpus)
        results.setdefault(result.label, []).append(result)
        save(path, args, results)
        print(f"seed {seed} {result.label:15s} val loss {result.final:.4f}  sparsity {result.sparsity:.1%}  "
              f"{result.seconds:.0f} s", flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, list[RunResult]], corpus, command: str) -> list[str]:
    """The table, the verdicts and the PNGs; returns the RESULTS.md section."""
    stats, table = summarize(results)
    verdicts = checks(stats) if set(LABELS) <= set(results) and args.seeds > 1 else []
    print("\n".join([*table, "", *verdicts]))
    title = f"tiny GPT {args.layers}x{args.width}, ctx {args.context}, {args.seeds} seeds"
    base = {key: runs for key, runs in results.items() if runs[0].info["budget"] == 1}
    plot = plot_curves({LABELS[key]: [r.curve for r in runs] for key, runs in base.items()},
                       args.out / "sparse_training.png", "validation loss (held-out plays)",
                       title=f"{title}, {args.steps} steps")
    flops_plot = plot_flops(results, args.out / "sparse_training_flops.png", f"{title}, budgets {args.budgets}")
    minutes = sum(r.seconds for runs in results.values() for r in runs) / 60
    return [
        f"## Sparse training: tiny GPT on Shakespeare ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, Python {platform.python_version()}, {machine()}; {minutes:.0f} min of training in all.  ",
        f"Model: {args.layers} blocks, width {args.width}, {args.heads} heads, context {args.context} characters, "
        f"vocabulary {len(corpus.vocab)} ({corpus.source}); AdamW lr {args.lr} (5% warm-up, cosine to 10%), "
        f"weight decay {args.weight_decay}, batch {args.batch}, {args.steps} steps (× budget), grad clip 1.0, "
        f"{'float32' if args.fp32 else 'bfloat16 autocast (float32 weights)'}. Validation (float32): "
        f"{args.eval_windows} windows of the held-out plays. Targets: every Linear in the blocks (lm_head and "
        f"embeddings dense). Initialization: '{args.init}'. Training FLOPs: forward and backward of every Linear, "
        "the targets at their density at each step (the weight gradient dense on the steps whose gradients RigL sums "
        "for growth), lm_head dense; "
        "attention products, embeddings and norms not counted; the torch.ao peer is not counted.",
        "",
        *table,
        "",
        *verdicts,
        "",
        f"Curves (1× runs): `{plot.name}`; loss against training FLOPs (mean over seeds, min-max bars): "
        f"`{flops_plot.name}`; raw numbers: `sparse_training.json`.",
        "",
    ]


def append_section(section: list[str]) -> None:
    results_md = HERE / "RESULTS.md"
    previous = results_md.read_text() if results_md.exists() else "# Benchmark results\n\n"
    results_md.write_text(previous.rstrip("\n") + "\n\n" + "\n".join(section))
    print(f"appended to {results_md}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = char_corpus()
    command = ("python benchmarks/sparse_training.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.soups:
        from sparse_soups import SoupProtocol, soup_section

        protocol = SoupProtocol(args, corpus, gpt_shape(args), lambda seed: gpt_config(args, "gmp", seed),
                                settings(args) | settings(args, ("soup_k", "soup_steps", "soup_lrs")))
        section = soup_section(protocol, protocol.run_all(), command)
    else:
        section = report(args, run_all(args, corpus), corpus, command)
    if not args.no_append:
        append_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
