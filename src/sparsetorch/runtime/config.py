"""What `runtime.compile` and `runtime.load_sparse_model` may do, as one frozen config."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsetorch.formats.registry import FORMATS
from sparsetorch.kernels.dispatch import BACKENDS

__all__ = ["POLICIES", "RuntimeConfig"]

POLICIES: dict[str, str] = {
    "measure": "a layer goes sparse only where its kernel measured faster than dense at every batch size",
    "always": "every sparse enough layer goes sparse, in the format a fixed rule picks (2:4 -> nm, else bitmask)",
}


@dataclass(frozen=True)
class RuntimeConfig:
    """How to swap Linear layers for SparseLinear.

    Args:
        batch_sizes: rows per call to measure at: (1,) for decode, e.g. (1, 512) to also keep prefill fast.
        formats: formats to try (`sparsetorch.formats.FORMATS`).
        policy: 'measure' or 'always' (see POLICIES).
        min_speedup: how much faster than dense a kernel must measure, at every batch size.
        max_density: layers with more nonzeros than this fraction stay dense unmeasured.
        backend: kernel backend, 'auto' or one of `sparsetorch.kernels.BACKENDS`.
        targets / ignore: which Linear layers to consider (as in `sparsetorch.prune`).

    Example:
        >>> RuntimeConfig(batch_sizes=(1, 512), policy="measure")
    """

    batch_sizes: tuple[int, ...] = (1,)
    formats: tuple[str, ...] = ("nm", "bitmask", "csr16")
    policy: str = "measure"
    min_speedup: float = 1.05
    max_density: float = 0.75
    backend: str = "auto"
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes!r}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"unknown formats {unknown or list(self.formats)}; choose from {sorted(FORMATS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if not self.min_speedup > 0:
            raise ValueError(f"min_speedup must be > 0, got {self.min_speedup}")
        if not 0 < self.max_density <= 1:
            raise ValueError(f"max_density must be in (0, 1], got {self.max_density}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> RuntimeConfig:
        tuples = {key: tuple(value) for key, value in record.items() if isinstance(value, list)}
        return cls(**{**record, **tuples})
