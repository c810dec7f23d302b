"""Runs inside the compressed-tensors==0.14.0 environment (never imports sparsetorch).

    ct_side.py read DIR EXPECTED.safetensors   decompress DIR with compressed-tensors, compare
    ct_side.py write DIR EXPECTED.safetensors  write a sparse-bitmask DIR with compressed-tensors
    ct_side.py decompress DIR EXPECTED.safetensors
        build the model of DIR/config.json, load its plain tensors and let ModelCompressor.decompress
        fill in the compressed (sparse and/or quantized) ones, as a model load does; compare every
        expected tensor, in the dtype compressed-tensors gives it
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


def decompress(directory, expected_path):
    import os

    from compressed_tensors import ModelCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    try:
        compressor = ModelCompressor.from_pretrained(directory)
    except Exception as err:
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        return
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    stored = load_file(os.path.join(directory, "model.safetensors"))
    sparse = {key.removesuffix(".bitmask") for key in stored if key.endswith(".bitmask")}
    model.load_state_dict({k: v for k, v in stored.items() if k.rpartition(".")[0] not in sparse}, strict=False)
    compressor.decompress(directory, model)
    state = model.state_dict()
    expected = load_file(expected_path)
    mismatched = [key for key, value in expected.items()
                  if key not in state or not torch.equal(state[key], value.to(state[key].dtype))]
    print(json.dumps({
        "checked": len(expected),
        "mismatched": mismatched,
        "dtypes": sorted({str(state[key].dtype) for key in expected if key in state}),
        "version": __import__("compressed_tensors").__version__,
    }))


if __name__ == "__main__":
    {"read": read, "write": write, "decompress": decompress}[sys.argv[1]](sys.argv[2], sys.argv[3])
