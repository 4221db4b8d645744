"""The kernels' per-weight cache: :class:`svdq_format.tensor_cache.TensorCache` (one implementation,
shared with the per-segment fallback of :mod:`svdq_format.segmented`)."""

from __future__ import annotations

from svdq_format.tensor_cache import TensorCache

__all__ = ["TensorCache"]
