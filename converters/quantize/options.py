"""Quantizer settings (one dataclass, recorded in the checkpoint and in the resume state)."""

from __future__ import annotations

import dataclasses
from typing import Any

from svdq_format.errors import UnsupportedError
from svdq_format.spec import PRECISIONS

from .lowrank import LOWRANK_METHODS
from .residual import DEFAULT_CLIP_RATIOS, DEFAULT_GPTQ_DAMP
from .targets import check_target

__all__ = ["QuantizeOptions", "DEFAULT_ALPHAS", "RANK_ALLOCATIONS", "RANK_STEP"]

#: How the low-rank budget is spread over the layers (``QuantizeOptions.rank_allocation``).
RANK_ALLOCATIONS = ("uniform", "budget")
#: Ranks of the budget allocation are multiples of this.
RANK_STEP = 16

#: Migration strengths α tried by the smoothing search (plus "no smoothing").
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize (see docs/quantization.md).

    Attributes:
        rank: Rank of the low-rank branch of W4A4 layers.
        precision: ``"int4"`` (group 64) or ``"nvfp4"`` (group 16).
        smoothing: Search a smoothing vector per input group (else s = 1).
        alphas: Migration strengths of the search grid: ``s = amax_x^α / amax_w^(1−α)``.
        activation_alphas: Extra candidates ``s = amax_x^α`` (weights ignored), as in
            DeepCompressor's grid.
        clip_search: int4 per-group clipping search on the residual.
        clip_ratios: Its candidate ratios.
        unsigned_acts: Try unsigned int4 activations (with the GELU shift) on layers whose
            inputs never go below −0.171875 (post-GELU), keeping them where they score better.
        gptq: GPTQ on the int4 residual, with the low-rank branch re-fitted after it
            (:mod:`converters.quantize.gptq`). ``None`` (default): on int4 layers that have the
            calibration rows it needs (the others: clipping search only; reported per layer);
            ``True``: required (refused, before any layer is quantized, when a layer has too few
            rows; int4 only); ``False``: off.
        gptq_damp: GPTQ's diagonal damping, a fraction of the Hessian's mean diagonal.
        gptq_act_order: GPTQ visits input channels in decreasing order of ``diag(X̂ᵀX̂)``.
        gptq_rounds: GPTQ + low-rank re-fit rounds.
        gptq_hessian_gib: Memory for Hessians over every calibration row (float64 K×K per
            layer, smallest K first; layers reading one input share one); None: 16 GiB or a
            quarter of the calibration device's total memory, whichever is less. Layers left
            out use the rows kept for the search.
        refine_iters: Iterative low-rank refinement steps (re-fit L1·L2 to W − Q(R)).
        lowrank: ``"auto"``, ``"svd"`` or ``"randomized"``.
        rank_allocation: ``"uniform"`` (every W4A4 layer gets ``rank``) or ``"budget"``: the
            low-rank bytes of ``rank`` everywhere, spent across layers by each layer's measured
            error reduction per byte (:mod:`converters.quantize.rank_allocation`; ranks are
            multiples of 16 up to ``max_rank``).
        max_rank: Largest rank the budget allocation gives a layer (None: 4 × ``rank``).
        w4a16_rank: Rank of weight-only (W4A16) layers (AdaLN modulation).
        weight_only: Quantize every selected layer weight-only.
        calib_rows: Activation rows kept per layer for the search and the report.
        include: fnmatch patterns of extra layers to quantize.
        exclude: fnmatch patterns of layers to keep 16-bit.
        seed: Seed of every random choice (row sampling, randomised SVD).
        target: Preset for the runtime the checkpoint is for: ``"svdquant"`` (default) or
            ``"nunchaku"`` (every layer representable in Nunchaku's files, so
            ``svdq convert --to nunchaku`` succeeds; :mod:`converters.quantize.targets`).
    """

    rank: int = 32
    precision: str = "int4"
    smoothing: bool = True
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    activation_alphas: tuple[float, ...] = (0.4, 0.6)
    clip_search: bool = True
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS
    unsigned_acts: bool = True
    gptq: bool | None = None
    gptq_damp: float = DEFAULT_GPTQ_DAMP
    gptq_act_order: bool = True
    gptq_rounds: int = 1
    gptq_hessian_gib: float | None = None
    refine_iters: int = 3
    lowrank: str = "auto"
    rank_allocation: str = "budget"
    max_rank: int | None = None
    w4a16_rank: int = 0
    weight_only: bool = False
    calib_rows: int = 256
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    target: str = "svdquant"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UnsupportedError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.rank < 0 or self.w4a16_rank < 0:
            raise UnsupportedError(f"rank must be >= 0, got {self.rank}")
        if self.lowrank not in LOWRANK_METHODS:
            raise UnsupportedError(f"low-rank method {self.lowrank!r} is not one of {LOWRANK_METHODS}")
        if self.gptq is True and self.precision != "int4":
            raise UnsupportedError("--gptq is implemented for int4 residuals only")
        if self.calib_rows < 1:
            raise UnsupportedError("calib_rows must be >= 1")
        if self.gptq_damp < 0 or self.gptq_rounds < 1:
            raise UnsupportedError(f"gptq_damp must be >= 0 and gptq_rounds >= 1, got {self.gptq_damp}, "
                                   f"{self.gptq_rounds}")
        if self.gptq_hessian_gib is not None and self.gptq_hessian_gib < 0:
            raise UnsupportedError(f"gptq_hessian_gib must be >= 0, got {self.gptq_hessian_gib}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise UnsupportedError(f"rank allocation {self.rank_allocation!r} is not one of {RANK_ALLOCATIONS}")
        if self.max_rank is not None and (self.max_rank < self.rank or self.max_rank % RANK_STEP):
            raise UnsupportedError(f"max_rank must be a multiple of {RANK_STEP} and >= rank ({self.rank}), "
                                   f"got {self.max_rank}")
        check_target(self.target, weight_only=self.weight_only, w4a16_rank=self.w4a16_rank)
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "activation_alphas", tuple(float(a) for a in self.activation_alphas))
        object.__setattr__(self, "clip_ratios", tuple(float(a) for a in self.clip_ratios))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> QuantizeOptions:
        """Build from keyword options, naming an unknown one clearly."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise UnsupportedError(f"unknown quantize option {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**kwargs)
