"""Pruning a model larger than memory: a Llama-2-7B-shaped model streamed block by block.

    python benchmarks/scale.py                                  # the 7B shape, magnitude and Wanda
    python benchmarks/scale.py --layers 2 --no-append           # a smoke run (seconds)
    python benchmarks/scale.py --bundled --layers 2             # also: bundled model, streamed vs in memory
    python benchmarks/scale.py --bundled-only                   # only the bundled model's comparison

A model of the chosen shape (default: Llama-2-7B's, hidden 4096, 32 layers, MLP 11008, bf16,
13.5 GB) is written with random weights one block per shard, never whole in memory. Each method
then prunes it with `sparsetorch.oneshot.streaming.prune_directory` in a fresh process (few
calibration windows of random tokens: the point is memory, not quality), which reports its peak
RSS, seconds per block, bytes written and the bound `memory_bound` expected. The output is then
loaded back through `load_sparse_model` (the compressed form, read one tensor at a time) and
decodes a few tokens, also in its own process.

With `--bundled`, the bundled SmolLM2-135M is pruned in memory (`prune` + `save_pruned`) and
streamed, each in its own process, for magnitude, Wanda and SparseGPT: the dense weights must be
bit-identical, and the streamed peak RSS is compared with the in-memory one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from results import header, publish

WORK = Path(__file__).parent / "_work" / "scale"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda"])
    parser.add_argument("--windows", type=int, default=4, help="calibration windows (default: 4)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default: 128)")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--bundled", action="store_true", help="also compare streamed and in-memory prunes of "
                        "the bundled model")
    parser.add_argument("--bundled-only", action="store_true", help="only the bundled model's comparison")
    parser.add_argument("--work", type=Path, default=WORK, help=f"where models are written (default: {WORK})")
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- the synthetic model -----------------------------------------------------------------


def write_model(args: argparse.Namespace, directory: Path) -> int:
    """A Llama of the chosen shape with random weights, one shard per block (and one for the rest);
    return its bytes of weights. At most one block's tensors exist at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = DTYPES[args.dtype]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype=args.dtype)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shards = [_outside(args)] + [_block(args, i) for i in range(args.layers)]
    weight_map, total = {}, 0
    for index, shapes in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: _random(shape, dtype, generator) for key, shape in shapes.items()}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # norms
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _outside(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (args.vocab, args.hidden), "model.norm.weight": (args.hidden,),
            "lm_head.weight": (args.vocab, args.hidden)}


def _block(args: argparse.Namespace, index: int) -> dict[str, tuple[int, ...]]:
    h, inner, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    prefix = f"model.layers.{index}."
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inner, h), "mlp.up_proj": (inner, h),
              "mlp.down_proj": (h, inner)}
    out = {f"{prefix}{name}.weight": shape for name, shape in shapes.items()}
    out.update({f"{prefix}input_layernorm.weight": (h,), f"{prefix}post_attention_layernorm.weight": (h,)})
    return out


# ---- workers: each measurement in a fresh process ----------------------------------------


def _calibration(vocab: int, windows: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(1))


def worker_stream(source: str, out: str, method: str, windows: int, seqlen: int) -> dict:
    """Prune `source` into `out` streaming; peak RSS, time and bytes written."""
    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.oneshot import PruneConfig
    from sparsetorch.oneshot.streaming import memory_bound, prune_directory

    config = PruneConfig(method=method)
    vocab = json.loads((Path(source) / "config.json").read_text())["vocab_size"]
    calibration = _calibration(vocab, windows, seqlen) if config.calibrated else None
    bound = memory_bound(source, config, None if calibration is None else tuple(calibration.shape))
    started = time.perf_counter()
    report = prune_directory(source, out, calibration, config, progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"peak_rss": peak_rss_bytes(), "seconds": seconds, "written": written, "bound": bound.total,
            "sparsity": report.sparsity}


def worker_decode(directory: str, tokens: int) -> dict:
    """Load a pruned directory's compressed form (SparseLinear layers) and decode `tokens` greedily."""
    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.runtime import RuntimeConfig, load_sparse_model
    from sparsetorch.runtime.lean import lean_skeleton

    started = time.perf_counter()
    model, _ = load_sparse_model(directory, RuntimeConfig(policy="always"), skeleton=lean_skeleton)
    loaded = time.perf_counter() - started
    cache, ids = model.new_cache(), torch.tensor([[1, 2, 3, 4]])
    started = time.perf_counter()
    for _ in range(tokens):
        ids = model(ids, cache).argmax(-1, keepdim=True)
    return {"peak_rss": peak_rss_bytes(), "load_seconds": loaded,
            "tokens_per_second": tokens / (time.perf_counter() - started)}


def worker_bundled(mode: str, out: str, method: str, windows: int, seqlen: int) -> dict:
    """The bundled model pruned `mode` ('memory' or 'stream') into `out`; peak RSS."""
    from transformers import AutoTokenizer

    from sparsetorch.data import calibration_windows, demo_text
    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.formats.pruned import save_pruned
    from sparsetorch.models import load_model, resolve_model_path
    from sparsetorch.oneshot import PruneConfig, prune
    from sparsetorch.oneshot.streaming import prune_directory

    config = PruneConfig(method=method)
    path = resolve_model_path(None, progress=False)
    windows = calibration_windows(AutoTokenizer.from_pretrained(path), demo_text().calibration, windows, seqlen,
                                  seed=0)
    if mode == "stream":
        prune_directory(path, out, windows, config, progress=False, overwrite=True)
    else:
        model = load_model(path, progress=False)[0]
        report = prune(model, windows, config, progress=False)
        save_pruned(model, out, report.to_dict(), source=str(path), overwrite=True)
    return {"peak_rss": peak_rss_bytes()}


WORKERS = {"stream": worker_stream, "decode": worker_decode, "bundled": worker_bundled}


def run_worker(*args) -> dict:
    command = [sys.executable, __file__, "--worker", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worker_main(argv: list[str]) -> None:
    name, *rest = argv
    values = [int(value) if value.isdigit() else value for value in rest]
    print(json.dumps(WORKERS[name](*values)))


# ---- the runs -------------------------------------------------------------------------------


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def scale_rows(args: argparse.Namespace) -> list[str]:
    source = args.work / "source"
    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    weights = write_model(args, source)
    print(f"wrote {_gb(weights)} GB of random {args.dtype} weights in {time.perf_counter() - started:.0f} s")
    lines = [f"Model: Llama shape hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
             f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, {args.dtype}: {_gb(weights)} GB of weights. "
             f"Calibration: {args.windows} windows x {args.seqlen} random tokens.", "",
             "| method | peak RSS GB | x weights | bound GB | s/block | written GB | load+decode peak GB | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        out = args.work / f"pruned-{method}"
        pruned = run_worker("stream", source, out, method, args.windows, args.seqlen)
        decoded = run_worker("decode", out, args.decode_tokens)
        lines.append(f"| {method} | {_gb(pruned['peak_rss'])} | {pruned['peak_rss'] / weights:.2f} | "
                     f"{_gb(pruned['bound'])} | {pruned['seconds'] / args.layers:.2f} | {_gb(pruned['written'])} | "
                     f"{_gb(decoded['peak_rss'])} | {decoded['tokens_per_second']:.2f} |")
        if not args.keep:
            shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(source)
    return lines


def bundled_rows(args: argparse.Namespace) -> list[str]:
    lines = ["", f"Bundled SmolLM2-135M (fp32), {args.windows} windows x {args.seqlen} tokens of the calibration "
             "text: in memory (`prune` + `save_pruned`) vs streamed, each in its own process.", "",
             "| method | in-memory peak GB | streamed peak GB | streamed / in-memory | dense weights identical |",
             "|---|---|---|---|---|"]
    for method in ("magnitude", "wanda", "sparsegpt"):
        outs = {mode: args.work / f"bundled-{method}-{mode}" for mode in ("memory", "stream")}
        peaks = {mode: run_worker("bundled", mode, out, method, args.windows, args.seqlen)["peak_rss"]
                 for mode, out in outs.items()}
        same = all((outs["memory"] / name).read_bytes() == (outs["stream"] / name).read_bytes()
                   for name in ("model.safetensors", "compressed/model.safetensors"))
        lines.append(f"| {method} | {_gb(peaks['memory'])} | {_gb(peaks['stream'])} | "
                     f"{peaks['stream'] / peaks['memory']:.2f} | {'yes' if same else 'NO'} |")
        if not args.keep:
            for out in outs.values():
                shutil.rmtree(out)
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return
    lines = header("Streaming prune at scale", "scale.py") + ([] if args.bundled_only else scale_rows(args))
    if args.bundled or args.bundled_only:
        lines += bundled_rows(args)
    publish(lines, append=not args.no_append)


if __name__ == "__main__":
    main()
