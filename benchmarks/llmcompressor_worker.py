"""Prune with llm-compressor, the reference tool, in its own virtual environment.

Run by `oneshot_llm.py` with that environment's Python: it loads the model from a local
HF directory, prunes it with exactly the calibration windows our run uses, and saves
the pruned linear weights, so perplexity is measured by the same code for both tools.
Prints one JSON line: the wall time of the `oneshot` call and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow
# the `kernels` package that transformers probes for: keep the folder off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def peak_rss_gib() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would carry over the parent's peak on Linux)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True, help="torch-saved (windows, seqlen) input ids")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--structure", default="0:0", help="llm-compressor mask_structure: 0:0 or N:M")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", required=True, help="safetensors file for the pruned Linear weights")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    windows = torch.load(args.calibration)
    dataset = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    recipe = modifier(sparsity=args.sparsity, mask_structure=args.structure, targets=["Linear"], ignore=["re:.*lm_head"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        pipeline="sequential",
    )
    seconds = time.perf_counter() - started

    weights = {
        f"{name}.weight": module.weight.detach().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    save_file(weights, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib()}))


if __name__ == "__main__":
    main()
