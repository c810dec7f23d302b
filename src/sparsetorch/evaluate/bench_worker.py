"""One variant of `sparsetorch bench`, alone in its own process (so its peak RSS is its own).

    python -m sparsetorch.evaluate.bench_worker DIR --variant dense|sparse --out result.json ...

dense:  the pruned model's dense weights (`load_pruned`), i.e. the same zeros run by dense matmuls.
sparse: the compressed weights through `runtime.load_sparse_model` (no dense copy of sparse layers).
Both run the very same prefill and greedy decode loops (`evaluate.speed`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsetorch.evaluate.memory import peak_rss_bytes
from sparsetorch.evaluate.speed import greedy_decode, measure_prefill
from sparsetorch.nn import SparseLinear

__all__ = ["linear_seconds", "main", "weight_bytes"]

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"


def _load(directory: Path, variant: str, runtime: dict) -> tuple[nn.Module, dict]:
    if variant == "dense":
        from sparsetorch.formats.pruned import load_pruned

        return load_pruned(directory), {}
    from sparsetorch.runtime import RuntimeConfig, load_sparse_model

    model, report = load_sparse_model(directory, RuntimeConfig.from_dict(runtime))
    return model, {"summary": report.summary(), "table": report.table()}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a decode step reads from Linear weights: dense ones and sparse ones (their formats)."""
    dense = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    sparse = sum(m.sparse_weight.nbytes for m in model.modules() if isinstance(m, SparseLinear))
    dense_equiv = sum(m.in_features * m.out_features * m.sparse_weight.values.element_size()
                      for m in model.modules() if isinstance(m, SparseLinear))
    return {"dense_linear": dense, "sparse_linear": sparse, "sparse_linear_as_dense": dense_equiv}


@contextmanager
def linear_seconds(model: nn.Module):
    """Yield a one-item list that collects seconds spent inside Linear and SparseLinear forwards."""
    total, starts, handles = [0.0], {}, []

    def before(module, args):
        starts[module] = time.perf_counter()

    def after(module, args, output):
        total[0] += time.perf_counter() - starts.pop(module)

    for module in model.modules():
        if isinstance(module, (nn.Linear, SparseLinear)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def _prefill_ids(tokenizer, tokens: int) -> Tensor:
    """The first `tokens` tokens of the held-out plays, from a slice of the text: tokenizing all
    of it would add tens of MB to the peak RSS this worker reports."""
    from sparsetorch.data import demo_text, evaluation_windows

    text = demo_text(fetch=False).evaluation
    return evaluation_windows(tokenizer, text[: 16 * tokens], tokens, tokens)[:1]  # (1, tokens)


def run(directory: Path, variant: str, prefill_tokens: int, decode_tokens: int, repeats: int, runtime: dict) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model, info = _load(directory, variant, runtime)
    load_seconds = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    prefill = measure_prefill(model, _prefill_ids(tokenizer, prefill_tokens), repeats)
    ids, _ = greedy_decode(model, prompt, decode_tokens)  # warm-up, and the tokens to compare
    decode = [greedy_decode(model, prompt, decode_tokens)[1] for _ in range(repeats)]
    with linear_seconds(model) as inside:
        _, instrumented = greedy_decode(model, prompt, decode_tokens)
    return {
        "variant": variant,
        "load_seconds": load_seconds,
        "prefill_seconds": list(prefill.seconds),
        "prefill_tokens": prefill.tokens,
        "decode_seconds": decode,
        "decode_tokens": decode_tokens - 1,
        "linear_share": inside[0] / instrumented,
        "generated": ids.tolist(),
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes": weight_bytes(model),
        "threads": torch.get_num_threads(),
        **info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsetorch.evaluate.bench_worker")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--variant", choices=["dense", "sparse"], required=True)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", default="{}", help="RuntimeConfig as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args.directory, args.variant, args.prefill_tokens, args.decode_tokens, args.repeats,
                 json.loads(args.runtime))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
