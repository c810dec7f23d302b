"""One variant of `sparsetorch bench`, alone in its own process (so its peak RSS is its own).

    python -m sparsetorch.evaluate.bench_worker JOB.json RESULT.json

JOB.json holds the arguments of `run` by name (`directory`, `variant` 'dense' or 'sparse', and
optionally `prefill_tokens`, `decode_tokens`, `repeats`, `runtime`, `decoder`, `ids`).

dense:  the pruned model's dense weights, i.e. the same zeros run by dense matmuls.
sparse: the compressed weights through `runtime.load_sparse_model` (no dense copy of sparse layers).
Both run the very same prefill and greedy decode loops (`evaluate.speed`), in the same decoder:
'lean' (`models.llama.LeanLlama` and the `tokenizers` tokenizer: this process never imports
transformers, whose modeling code alone adds ~160 MB to the peak RSS) or 'transformers'
(`AutoModelForCausalLM`, `AutoTokenizer`); 'auto' is lean for the families it runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sparsetorch.evaluate.memory import peak_rss_bytes
from sparsetorch.evaluate.speed import greedy_decode, measure_prefill
from sparsetorch.malloc import fix_mmap_threshold
from sparsetorch.nn import SparseLinear

__all__ = ["DECODERS", "linear_seconds", "main", "resolve_decoder", "weight_bytes"]

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
DECODERS = ("auto", "lean", "transformers")


def resolve_decoder(directory: Path, decoder: str) -> str:
    """'lean' or 'transformers': 'auto' is lean wherever `runtime.lean` runs the model's family."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    from sparsetorch.models.llama import LeanConfig
    from sparsetorch.runtime.lean import lean_supports

    if decoder == "auto":
        return "lean" if lean_supports(directory) else "transformers"
    if decoder == "lean":
        try:
            LeanConfig.from_directory(directory)
        except NotImplementedError as err:
            raise ValueError(f"decoder 'lean': {err}") from None
    return decoder


def _load(directory: Path, variant: str, runtime: dict, decoder: str) -> tuple[nn.Module, dict]:
    if decoder == "lean":
        from sparsetorch.runtime import RuntimeConfig
        from sparsetorch.runtime.lean import load_lean_model

        model, report = load_lean_model(directory, variant, RuntimeConfig.from_dict(runtime))
        return model, {} if report is None else {"summary": report.summary(), "table": report.table()}
    if variant not in ("dense", "sparse"):
        raise ValueError(f"variant {variant!r} runs in the lean decoder only (decoder='lean')")
    if variant == "dense":
        from sparsetorch.formats.pruned import load_pruned

        return load_pruned(directory), {}
    from sparsetorch.runtime import RuntimeConfig, load_sparse_model

    model, report = load_sparse_model(directory, RuntimeConfig.from_dict(runtime))
    return model, {"summary": report.summary(), "table": report.table()}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a decode step reads from Linear weights: dense ones (nn.Linear, or a SparseLinear over a
    dense weight) and sparse ones (their formats)."""
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear) and m.format != "dense"]
    dense = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    dense += sum(m.sparse_weight.nbytes for m in model.modules() if isinstance(m, SparseLinear) and m.format == "dense")
    dense_equiv = sum(m.in_features * m.out_features * m.sparse_weight.values.element_size() for m in sparse)
    return {"dense_linear": dense, "sparse_linear": sum(m.sparse_weight.nbytes for m in sparse),
            "sparse_linear_as_dense": dense_equiv}


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


def _tokenizer(directory: Path, decoder: str) -> Callable[[str, bool], list[int]]:
    """encode(text, special_tokens) -> ids: the `tokenizers` file for 'lean', else AutoTokenizer (the
    same tokenizer.json; AutoTokenizer only adds transformers' import to the process)."""
    if decoder == "lean":
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; the bench needs the model's tokenizer next to its weights")
        tokenizer = Tokenizer.from_file(str(path))
        return lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(directory)
    return lambda text, special: auto(text, add_special_tokens=special)["input_ids"]


def _prefill_ids(encode: Callable[[str, bool], list[int]], tokens: int) -> list[int]:
    """The first `tokens` tokens of the held-out plays, from a slice of the text: tokenizing all
    of it would add tens of MB to the peak RSS this worker reports."""
    from sparsetorch.data import demo_text

    ids = encode(demo_text(fetch=False).evaluation[: 16 * tokens], False)[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the evaluation text gave {len(ids)} tokens, {tokens} asked for; lower --prefill-tokens")
    return ids


def token_ids(directory: Path, decoder: str, prefill_tokens: int) -> dict[str, list[int]]:
    """The prompt's ids and the prefill's ids, as `run` takes them (`bench` makes them once, in the
    parent, so that no worker's peak RSS holds a tokenizer and the text)."""
    encode = _tokenizer(directory, resolve_decoder(directory, decoder))
    return {"prompt": encode(PROMPT, True), "prefill": _prefill_ids(encode, prefill_tokens)}


def run(directory: Path, variant: str, prefill_tokens: int = 256, decode_tokens: int = 128, repeats: int = 3,
        runtime: dict | None = None, decoder: str = "auto", ids: dict[str, list[int]] | None = None) -> dict:
    """Load one variant of `directory`, time its prefill and greedy decode, and return the measures as JSON data."""
    runtime = runtime or {}
    decoder = resolve_decoder(directory, decoder)
    started = time.perf_counter()
    model, info = _load(directory, variant, runtime, decoder)
    load_seconds = time.perf_counter() - started
    ids = ids or token_ids(directory, decoder, prefill_tokens)
    prompt = torch.tensor([ids["prompt"]])  # (1, T)
    prefill = measure_prefill(model, torch.tensor([ids["prefill"][:prefill_tokens]]), repeats)
    generated, _ = greedy_decode(model, prompt, decode_tokens)  # warm-up, and the tokens to compare
    decode = [greedy_decode(model, prompt, decode_tokens)[1] for _ in range(repeats)]
    with linear_seconds(model) as inside:  # the prompt's prefill too, on both sides of the ratio
        started = time.perf_counter()
        greedy_decode(model, prompt, decode_tokens)
        instrumented = time.perf_counter() - started
    return {
        "variant": variant,
        "decoder": decoder,
        "load_seconds": load_seconds,
        "prefill_seconds": list(prefill.seconds),
        "prefill_tokens": prefill.tokens,
        "decode_seconds": decode,
        "decode_tokens": decode_tokens - 1,
        "linear_share": inside[0] / instrumented,
        "generated": generated.tolist(),
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes": weight_bytes(model),
        "threads": torch.get_num_threads(),
        "transformers_imported": "transformers" in sys.modules,
        **info,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the job of `argv[0]` (JSON: `run`'s arguments by name) and write its result to `argv[1]`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m sparsetorch.evaluate.bench_worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    fix_mmap_threshold()  # both variants alike: freed loading temporaries must not count as peak RSS
    result = run(Path(job.pop("directory")), **job)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
