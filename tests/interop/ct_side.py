"""Runs inside the compressed-tensors==0.14.0 environment (never imports sparsetorch).

    ct_side.py read DIR EXPECTED.safetensors   decompress DIR with compressed-tensors, compare
    ct_side.py write DIR EXPECTED.safetensors  write a sparse-bitmask DIR with compressed-tensors
Prints one JSON line.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def read(directory, expected_path):
    from compressed_tensors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(directory)
    expected = load_file(expected_path)
    decompressed = dict(compressor.sparsity_compressor.decompress(directory))
    mismatched = [
        key for key, value in expected.items()
        if key not in decompressed or not torch.equal(decompressed[key].view(torch.uint8), value.view(torch.uint8))
    ]
    print(json.dumps({
        "format": compressor.sparsity_config.format,
        "structure": compressor.sparsity_config.sparsity_structure,
        "checked": len(expected),
        "mismatched": mismatched,
        "version": __import__("compressed_tensors").__version__,
    }))


def write(directory, expected_path):
    import os

    from compressed_tensors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    state = load_file(os.path.join(directory, "dense.safetensors"))
    config = SparsityCompressionConfig.load_from_registry("sparse-bitmask", targets=["Linear"], ignore=["lm_head"])
    compressor = ModelCompressor(sparsity_config=config)
    targets = {key.removesuffix(".weight") for key in state if "layers" in key and key.endswith("proj.weight")}
    compressed = compressor.sparsity_compressor.compress(state, compression_targets=targets)
    os.remove(os.path.join(directory, "dense.safetensors"))
    save_file({k: v.contiguous() for k, v in compressed.items()}, os.path.join(directory, "model.safetensors"))
    compressor.update_config(directory)
    save_file(state, expected_path)
    print(json.dumps({"written": len(compressed), "version": __import__("compressed_tensors").__version__}))


if __name__ == "__main__":
    {"read": read, "write": write}[sys.argv[1]](sys.argv[2], sys.argv[3])
