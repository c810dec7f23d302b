"""PruneConfig: everything that decides a one-shot pruning run, validated and JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from sparsetorch.allocate import ALLOCATIONS, check_spread
from sparsetorch.checks import check_int
from sparsetorch.oneshot.calibrate import LAYER_INPUTS
from sparsetorch.oneshot.solvers import SolverOptions, get_solver
from sparsetorch.oneshot.stats import Gram, Statistic
from sparsetorch.patterns import Block, Pattern, parse_pattern
from sparsetorch.precision import CALIB_DTYPES
from sparsetorch.quantize import QuantScheme, parse_scheme

__all__ = ["DEFAULT_PATTERNS", "PruneConfig"]

# Wanda compares weights within each output row (its paper's finding for LLMs).
DEFAULT_PATTERNS: dict[str, str] = {"wanda": "unstructured-row"}
DEFAULT_SPARSITY = 0.5
REFINES = (None, "dsnot")
RECONSTRUCTS = (None, "layer", "block")


@dataclass(frozen=True)
class PruneConfig:
    """A one-shot pruning recipe.

    Args:
        method: a registered solver: 'magnitude', 'wanda', 'sparsegpt' or 'random'.
        sparsity: fraction of weights to prune in each target layer; N:M patterns imply it.
        pattern: 'unstructured', 'unstructured-row', 'N:M' or 'block-HxW' (default: the
            method's own choice, per-row for Wanda, layer-wide for the others).
        targets: module patterns to prune (default: every Linear); see `sparsetorch.targets`.
        ignore: module patterns to keep dense.
        blocks: dotted path of the decoder-block ModuleList, for families sparsetorch
            does not know.
        layer_inputs: 'dense' (default, the papers' way and llm-compressor's) calibrates
            every layer of a block on the dense block's activations (1.75 block forwards);
            'mixed' does so for all but the block's last layer (the MLP's down projection),
            calibrated on what the pruned block feeds it (1.25 forwards); 'pruned' calibrates
            each layer on the outputs of the already-pruned layers before it (one forward).
            The faster two change the result: see `oneshot/lockstep.py` and, for what they
            measured, benchmarks/RESULTS.md.
        calib_dtype: precision of the forwards that only gather statistics (the dense
            block's, in 'dense' and 'mixed'): 'model' (default) keeps the model's own
            dtype; 'bfloat16' runs an fp32 model's matmuls there in bf16 autocast, about
            twice as fast on CPUs with AVX512-BF16 or AMX; 'auto' picks bf16 only where
            the hardware multiplies it natively. The forward that makes the next block's
            inputs, the statistics' sums and the solvers always stay in the model's dtype.
        batch_size: calibration windows per forward. Every layer is still pruned from
            all windows; small batches just run faster on CPU.
        dampening: SparseGPT's Hessian dampening, a fraction of its mean diagonal.
        block_size: SparseGPT's lazy-update width in columns.
        seed: for the random method.
        allocation: how sparsity is spread over the decoder blocks, keeping the mean at `sparsity`
            (`sparsetorch.allocate`): 'uniform' (default, the papers'), 'owl' (more weights kept in
            blocks with more outliers: `owl_m`, `owl_lambda` as the OWL paper's M and λ), 'depth'
            (later blocks sparser, `depth_step` apart). Unstructured and block patterns only.
        layer_sparsity: explicit sparsities for named layers, over whatever the allocation gives.
        refine: None (default) or 'dsnot': after the method chose a layer's mask, DSnoT swaps kept
            and pruned weights within each row (or N:M group) where that lowers the layer's
            expected output error (`oneshot/refine.py`), never raising its calibration error.
        reconstruct: None (default), 'layer' or 'block': after masking, 'layer' refits each layer's
            kept weights to the dense layer's outputs on the calibration inputs (least squares on
            each row's support, `oneshot/reconstruct.py`); 'block' does that and then trains each
            block's kept weights a few steps so the block's output matches the dense block's.
            Both gather the Gram matrix XᵀX, as SparseGPT does, whatever the method.
        quantize: None (default: weights stay in the model's dtype), 'int8' (one scale per output
            channel), 'int4' (one scale per `group_size` input columns), or a full name such as
            'int4-g64-asym' (see `sparsetorch.quantize.parse_scheme`); stored as the full name.
            SparseGPT then quantizes jointly with pruning (its sweep rounds each kept weight as it
            reaches it and spreads the rounding error too, GPTQ-style); the other methods round to
            nearest after pruning. Any step that changes weights afterwards (refine, reconstruct)
            is followed by round-to-nearest on the final weights (`oneshot/quantized.py`).
        group_size: input columns per scale for 'int4' (a name with '-gN' sets it instead).
        clip_search: with `quantize`, choose each group's (or row's) range by searched clipping, the
            range of least rounding error, instead of its largest magnitude (`sparsetorch.quantize`).
            None (the default): on for 4-bit grids, where it lowered perplexity on both held-out
            texts in every setting measured, off for int8, where it did not (benchmarks/RESULTS.md).
        quantize_embeddings: with `quantize`, also round the input embeddings (and an untied
            output embedding) to int8 per row, round-to-nearest, after all blocks: file-size
            comparisons count the whole model.

    Example:
        >>> PruneConfig(method="sparsegpt", pattern="2:4").sparsity
        0.5
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    blocks: str | None = None
    layer_inputs: str = "dense"
    calib_dtype: str = "model"
    batch_size: int = 4
    dampening: float = 0.01
    block_size: int = 128
    seed: int = 0
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    depth_step: float = 0.01
    layer_sparsity: dict[str, float] | None = None
    refine: str | None = None
    reconstruct: str | None = None
    quantize: str | None = None
    group_size: int = 128
    clip_search: bool | None = None
    quantize_embeddings: bool = True

    def __post_init__(self) -> None:
        get_solver(self.method)
        pattern = parse_pattern(self.pattern or DEFAULT_PATTERNS.get(self.method, "unstructured"))
        wanted = self.sparsity
        if wanted is None and pattern.fixed_sparsity is None:
            wanted = DEFAULT_SPARSITY
        object.__setattr__(self, "sparsity", pattern.resolve_sparsity(wanted))
        object.__setattr__(self, "pattern", pattern.spec)
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.layer_inputs not in LAYER_INPUTS:
            raise ValueError(f"layer_inputs must be one of {list(LAYER_INPUTS)}, got {self.layer_inputs!r}")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ValueError(f"calib_dtype must be one of {list(CALIB_DTYPES)}, got {self.calib_dtype!r}")
        if self.calib_dtype == "bfloat16" and self.layer_inputs == "pruned":
            raise ValueError(
                "calib_dtype='bfloat16' applies to the statistics-only forwards of layer_inputs='dense' or "
                "'mixed'; layer_inputs='pruned' has none (its one forward makes the next block's inputs)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of windows, got {self.batch_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive number of columns, got {self.block_size}")
        if not self.dampening > 0:
            raise ValueError(f"dampening must be > 0, got {self.dampening}")
        self._check_allocation(pattern)
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {list(REFINES)}, got {self.refine!r}")
        if self.reconstruct not in RECONSTRUCTS:
            raise ValueError(f"reconstruct must be one of {list(RECONSTRUCTS)}, got {self.reconstruct!r}")
        if self.refine == "dsnot" and isinstance(pattern, Block):
            raise ValueError(f"refine='dsnot' swaps single weights; pattern {pattern.spec} prunes whole blocks")
        self._check_quantize()

    def _check_allocation(self, pattern: Pattern) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        varies = self.allocation != "uniform" or self.layer_sparsity
        if varies and pattern.fixed_sparsity is not None:
            raise ValueError(f"pattern {pattern.spec} fixes every layer's sparsity; allocation={self.allocation!r} "
                             "and layer_sparsity need an unstructured or block pattern")
        if not self.owl_m > 0:
            raise ValueError(f"owl_m must be > 0 (an outlier is above owl_m times the mean score), got {self.owl_m}")
        if not 0 <= self.owl_lambda < 1 or not 0 <= self.depth_step < 1:
            raise ValueError(f"owl_lambda and depth_step must be in [0, 1), got {self.owl_lambda}, {self.depth_step}")
        if self.layer_sparsity is not None:
            spread = dict(self.layer_sparsity)
            object.__setattr__(self, "layer_sparsity", spread)
            check_spread(spread.values(), "layer_sparsity")

    def _check_quantize(self) -> None:
        """Validate `quantize` and `group_size`, and store `quantize` as its scheme's full name."""
        check_int(self.group_size, "group_size", 2)  # input columns per scale
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError(f"quantize_embeddings must be True or False, got {self.quantize_embeddings!r}")
        if self.clip_search is not None and not isinstance(self.clip_search, bool):
            raise ValueError(f"clip_search must be True, False or None (on for 4-bit grids), got {self.clip_search!r}")
        if self.quantize is None:
            object.__setattr__(self, "clip_search", bool(self.clip_search))
            return
        if not isinstance(self.quantize, str):
            raise ValueError(f"quantize must be None or a name such as 'int8', 'int4', 'int4-g64-asym', "
                             f"got {self.quantize!r}")
        try:
            scheme = parse_scheme(self.quantize)
        except ValueError as err:
            hint = "" if "use int8" in str(err) else "; use int8, int4, or a name such as int4-g128 or int4-g64-asym"
            raise ValueError(f"quantize={self.quantize!r}: {err}{hint}") from None
        if scheme.bits == 4 and scheme.group_size is None:
            scheme = replace(scheme, group_size=self.group_size)
        if scheme.group_size is not None:
            object.__setattr__(self, "group_size", scheme.group_size)
        object.__setattr__(self, "quantize", scheme.name)
        if self.clip_search is None:
            object.__setattr__(self, "clip_search", scheme.bits == 4)

    @property
    def scheme(self) -> QuantScheme | None:
        """The value grid of the pruned layers' kept weights, or None when they stay unquantized.

        Example:
            >>> PruneConfig(quantize="int4", group_size=64).scheme.name
            'int4-g64'
        """
        return None if self.quantize is None else replace(parse_scheme(self.quantize), search=self.clip_search)

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def calibrated(self) -> bool:
        """Whether the run needs calibration data: the method's own statistic, or a step after it."""
        return self.statistic is not None

    @property
    def statistic(self) -> type[Statistic] | None:
        """What each layer's input is summarized as: the method's own statistic, or the Gram matrix
        when refinement or reconstruction reads the layer's output error (it holds Wanda's norms too)."""
        if self.refine is not None or self.reconstruct is not None:
            return Gram
        return get_solver(self.method).statistic

    @property
    def joint_quantization(self) -> bool:
        """Whether the method quantizes inside its own solve (SparseGPT's joint mode) rather than
        the pipeline rounding its weights to nearest afterwards."""
        return self.quantize is not None and get_solver(self.method).quantizes

    def solver_options(self) -> SolverOptions:
        return SolverOptions(dampening=self.dampening, block_size=self.block_size, seed=self.seed,
                             quantize=self.scheme if self.joint_quantization else None)

    def to_dict(self) -> dict:
        """Plain JSON types; `PruneConfig.from_dict` reads it back equal."""
        data = asdict(self)
        data["targets"] = None if self.targets is None else list(self.targets)
        data["ignore"] = list(self.ignore)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        """Build from `to_dict` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PruneConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
