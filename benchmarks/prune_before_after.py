"""Before vs after, same run: this tree's one-shot pruning against a baseline checkout.

    git worktree add /tmp/base <rev>                  # the code before the change
    python benchmarks/prune_before_after.py --baseline /tmp/base
    python benchmarks/prune_before_after.py --baseline /tmp/base --rounds 3 \\
        --reference-python benchmarks/_work/llmc-venv/bin/python
    python benchmarks/prune_before_after.py --baseline /tmp/base --skip-reference \\
        --samples 4 --seqlen 64 --eval-tokens 512 --methods wanda --patterns 2:4 --no-append   # smoke test

For each combination of method, pattern and layer_inputs it prunes the bundled SmolLM2-135M with the
baseline's code ("before") and with this tree's ("after"), alternately (before first in odd rounds,
after first in even ones), each in a fresh process on the same calibration windows, then with
llm-compressor once (unless --skip-reference). Each side runs its own checkout's
`benchmarks/oneshot_llm.py worker` with PYTHONPATH=<checkout>/src in front; a small wrapper adds the
`sparsetorch.__file__` the worker imported to its JSON line, and this script checks it lies in that
checkout. All perplexities are computed afterwards in this process by this tree's code
(`oneshot_llm.evaluate_all`), and the last round's masks of before and after are compared entry by
entry. Verdict per config: perplexity after/before within 1e-3 relative, or masks identical; median
prune time after/before ≤ 1.05; after/llm-compressor ≤ 0.55.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from oneshot_llm import CONFIGS, HERE, WORK, Run, _version, evaluate_all, prepare_data, reference_python
from results import machine, publish

ROOT = HERE.parent
PPL_TOLERANCE = 1e-3  # relative
TIME_VS_BEFORE = 1.05
TIME_VS_REFERENCE = 0.55
PATTERNS = {"unstructured": "50% unstructured", "2:4": "2:4"}  # --patterns choice -> CONFIGS label

# Runs a checkout's oneshot_llm.py as __main__ (argv: script, its arguments) and prints its last JSON
# line with the imported sparsetorch's file added; the script's folder goes first on sys.path, as
# when it is run directly.
WRAPPER = """
import contextlib, io, json, os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
out = io.StringIO()
with contextlib.redirect_stdout(out):
    runpy.run_path(sys.argv[0], run_name="__main__")
stats = json.loads(out.getvalue().strip().splitlines()[-1])
stats["sparsetorch_file"] = sys.modules["sparsetorch"].__file__
print(json.dumps(stats))
"""


@dataclass(frozen=True)
class Config:
    method: str
    label: str  # pattern as the tables name it
    pattern: str  # sparsetorch's pattern
    structure: str | None  # llm-compressor's mask_structure; None: no reference run
    layer_inputs: str

    @property
    def tag(self) -> str:
        return f"{self.method}-{self.pattern.replace(':', 'of')}-{self.layer_inputs}"


@dataclass(frozen=True)
class Side:
    name: str  # "before" or "after"
    root: Path  # the checkout whose src/ and benchmarks/oneshot_llm.py it runs


@dataclass
class Outcome:
    config: Config
    seconds: dict[str, list[float]] = field(default_factory=dict)  # side name -> one per round
    runs: dict[str, Run] = field(default_factory=dict)  # "before", "after", "llm-compressor"
    differing: int = 0  # mask entries that are zero on one side only
    entries: int = 0


def configs(methods: list[str], patterns: list[str], layer_inputs: list[str]) -> list[Config]:
    labels = [PATTERNS[p] for p in patterns]
    return [Config(method, label, ours, theirs, inputs)
            for method, label, ours, theirs in CONFIGS if method in methods and label in labels
            for inputs in layer_inputs]


def _run_json(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prune_side(side: Side, config: Config, calibration: Path, out: Path) -> float:
    """One pruning run of `side` in a fresh process; returns its prune seconds."""
    src = side.root / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-c", WRAPPER, str(side.root / "benchmarks" / "oneshot_llm.py"), "worker",
               "--method", config.method, "--pattern", config.pattern, "--layer-inputs", config.layer_inputs,
               "--calib-dtype", "model", "--calibration", str(calibration), "--out", str(out)]
    stats = _run_json(command, out.with_suffix(".log"), env)
    imported = Path(stats["sparsetorch_file"]).resolve()
    if not imported.is_relative_to((src / "sparsetorch").resolve()):
        raise RuntimeError(f"{side.name} run imported {imported}, not the sparsetorch under {src}")
    return stats["seconds"]


def prune_reference(config: Config, ref_python: Path, model_dir: Path, calibration: Path) -> Run:
    run = Run("llm-compressor", config.method, config.label, WORK / f"ba-llmc-{config.tag}.safetensors")
    print(f"llm-compressor {config.method} {config.label} ...", flush=True)
    stats = _run_json([str(ref_python), str(HERE / "llmcompressor_worker.py"), "--model", str(model_dir),
                       "--calibration", str(calibration), "--method", config.method, "--structure", str(config.structure),
                       "--out", str(run.weights)], run.weights.with_suffix(".log"))
    run.seconds, run.peak_rss_gib = stats["seconds"], stats["peak_rss_gib"]
    return run


def prune_config(config: Config, sides: list[Side], rounds: int, calibration: Path,
                 ref_python: Path | None, model_dir: Path) -> Outcome:
    """Alternate the sides for `rounds` rounds (the last round's weights are kept), then llm-compressor."""
    outcome = Outcome(config, {side.name: [] for side in sides})
    for i in range(rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            out = WORK / f"ba-{side.name}-{config.tag}.safetensors"
            print(f"round {i + 1}: {side.name} {config.method} {config.label} ({config.layer_inputs}) ...", flush=True)
            outcome.seconds[side.name].append(prune_side(side, config, calibration, out))
            outcome.runs[side.name] = Run(side.name, config.method, config.label, out)
    for side in sides:
        outcome.runs[side.name].seconds = statistics.median(outcome.seconds[side.name])
    if ref_python is not None and config.structure is not None:
        outcome.runs["llm-compressor"] = prune_reference(config, ref_python, model_dir, calibration)
    return outcome


def compare_masks(outcome: Outcome) -> None:
    """Count the layer weight entries that are zero in one of before/after but not the other."""
    from safetensors.torch import load_file

    before, after = (load_file(outcome.runs[name].weights) for name in ("before", "after"))
    if before.keys() != after.keys():
        raise RuntimeError(f"{outcome.config.tag}: before and after pruned different layers")
    outcome.differing = sum(int(((before[k] == 0) != (after[k] == 0)).sum()) for k in before)
    outcome.entries = sum(w.numel() for w in before.values())


def verdict(outcome: Outcome) -> str:
    before, after = outcome.runs["before"], outcome.runs["after"]
    reference = outcome.runs.get("llm-compressor")
    failed = []
    if outcome.differing and abs(after.perplexity / before.perplexity - 1) > PPL_TOLERANCE:
        failed.append("perplexity")
    if after.seconds / before.seconds > TIME_VS_BEFORE:
        failed.append("time vs before")
    if reference is not None and after.seconds / reference.seconds > TIME_VS_REFERENCE:
        failed.append("time vs llm-compressor")
    return "met" if not failed else "NOT met: " + ", ".join(failed)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| method | pattern | layer inputs | ppl before | ppl after | after/before | masks differing "
        "| s before | s after | after/before | s llm-compressor | after/llm-compressor | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        before, after = o.runs["before"], o.runs["after"]
        reference = o.runs.get("llm-compressor")
        ref_cells = (f"{reference.seconds:.1f} | {after.seconds / reference.seconds:.2f}×" if reference else "– | –")
        lines.append(f"| {o.config.method} | {o.config.label} | {o.config.layer_inputs} "
                     f"| {before.perplexity:.4f} | {after.perplexity:.4f} | {after.perplexity / before.perplexity:.6f}× "
                     f"| {o.differing} ({o.differing / o.entries:.4%}) | {before.seconds:.2f} | {after.seconds:.2f} "
                     f"| {after.seconds / before.seconds:.3f}× | {ref_cells} | {verdict(o)} |")
    return "\n".join(lines)


def _revision(root: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "src") else ""
    return f"{root} at {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True,
                        help="checkout of the earlier commit (e.g. made with `git worktree add /tmp/base <rev>`)")
    parser.add_argument("--current", type=Path, default=ROOT, help=argparse.SUPPRESS)  # debug: the "after" checkout
    methods = list(dict.fromkeys(method for method, *_ in CONFIGS))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=methods,
                        help="methods (default: wanda sparsegpt)")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS),
                        help="'unstructured' is 50%% unstructured as in oneshot_llm.py (default: both)")
    parser.add_argument("--layer-inputs", nargs="+", default=["dense"], help="layer_inputs values (default: dense)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating timed runs of each side (default: 1)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens (default: 16384)")
    parser.add_argument("--reference-python", help="python of an existing llm-compressor 0.14 environment")
    parser.add_argument("--skip-reference", action="store_true", help="no llm-compressor runs")
    parser.add_argument("--no-append", action="store_true", help="print the section, do not append to RESULTS.md")
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sides = [Side("before", args.baseline.resolve()), Side("after", args.current.resolve())]
    for side in sides:
        if not (side.root / "benchmarks" / "oneshot_llm.py").is_file() or not (side.root / "src" / "sparsetorch").is_dir():
            sys.exit(f"{side.root} has no benchmarks/oneshot_llm.py or src/sparsetorch")

    started, machine_line = time.time(), machine()  # the load average as the run begins
    model_dir, _, calibration, windows = prepare_data(args.samples, args.seqlen, args.eval_tokens,
                                                          "ba-calibration.pt")
    ref_python = None if args.skip_reference else reference_python(args.reference_python)

    outcomes = [prune_config(c, sides, args.rounds, calibration, ref_python, model_dir)
                for c in configs(args.methods, args.patterns, args.layer_inputs)]
    dense = evaluate_all([run for o in outcomes for run in o.runs.values()], windows)
    for outcome in outcomes:
        compare_masks(outcome)

    import transformers

    import sparsetorch

    versions = f"transformers {transformers.__version__}"
    if ref_python is not None:
        versions += f"; reference: llmcompressor {_version(ref_python, 'llmcompressor')}"
    rounds = "; ".join(f"{o.config.tag}: " + ", ".join(f"{name} {' '.join(f'{s:.2f}' for s in secs)}"
                                                       for name, secs in o.seconds.items()) for o in outcomes)
    section = [
        f"## One-shot pruning before vs after, SmolLM2-135M-Instruct ({datetime.date.today()})",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/prune_before_after.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine_line}; {versions}  ",
        f"Before: {_revision(sides[0].root)}; after: {_revision(sides[1].root)}  ",
        f"Data: {args.samples} calibration windows × {args.seqlen} tokens, perplexity on {windows.numel()} held-out "
        f"tokens (dense {dense:.4f}), all evaluated by {Path(sparsetorch.__file__).parent}. {args.rounds} round(s) "
        "per config, before and after alternating, each run in a fresh process; seconds are the pruning call only, "
        f"medians over rounds. Masks compared from the last round. Total {(time.time() - started) / 60:.1f} min.",
        "",
        table(outcomes),
        "",
        f"Seconds per round: {rounds}. Verdict: perplexity after/before within {PPL_TOLERANCE:g} relative "
        f"or masks identical; time after/before ≤ {TIME_VS_BEFORE}; after/llm-compressor ≤ {TIME_VS_REFERENCE}.",
        "",
    ]
    publish(section, append=not args.no_append)


if __name__ == "__main__":
    main()
