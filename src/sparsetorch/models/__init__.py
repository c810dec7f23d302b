"""Models: finding and loading them offline (the bundled demo LLM or any local HF directory), and
sparsetorch's own implementation of the Llama family, which calibrates and runs them fast."""

from sparsetorch.models.llama import KVCache, LeanConfig, LeanLlama, own_families
from sparsetorch.models.loading import (
    DEMO_MODEL,
    bundled_gguf,
    count_parameters,
    demo_model_dir,
    load_model,
    resolve_model_path,
)

__all__ = [
    "DEMO_MODEL",
    "KVCache",
    "LeanConfig",
    "LeanLlama",
    "bundled_gguf",
    "count_parameters",
    "demo_model_dir",
    "load_model",
    "own_families",
    "resolve_model_path",
]
