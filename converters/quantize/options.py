"""Quantizer settings (one dataclass, recorded in the checkpoint and in the resume state)."""

from __future__ import annotations

import dataclasses
from typing import Any

from svdq_format.errors import UnsupportedError
from svdq_format.spec import PRECISIONS

from .lowrank import LOWRANK_METHODS
from .residual import DEFAULT_CLIP_RATIOS
from .targets import check_target

__all__ = ["QuantizeOptions", "DEFAULT_ALPHAS"]

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
        gptq: GPTQ on the int4 residual (needs many calibration rows per input channel).
        refine_iters: Iterative low-rank refinement steps (re-fit L1·L2 to W − Q(R)).
        lowrank: ``"auto"``, ``"svd"`` or ``"randomized"``.
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
    gptq: bool = False
    refine_iters: int = 3
    lowrank: str = "auto"
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
        if self.gptq and self.precision != "int4":
            raise UnsupportedError("--gptq is implemented for int4 residuals only")
        if self.calib_rows < 1:
            raise UnsupportedError("calib_rows must be >= 1")
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
