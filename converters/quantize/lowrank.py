"""The low-rank branch: top-r factors of the smoothed weight (implemented in :mod:`svdq_format.lowrank`,
which ``SVDQLinear.from_linear`` shares with the quantizer)."""

from __future__ import annotations

from svdq_format.lowrank import LOWRANK_METHODS, lowrank_factors

__all__ = ["LOWRANK_METHODS", "lowrank_factors"]
