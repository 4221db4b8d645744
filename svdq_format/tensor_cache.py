"""Values derived from weight tensors, made once and reused until a tensor changes or is freed.

The GPU kernels keep per-weight preparations (transposed scales, row powers of two, the ``fast8``
scales, ``[L1 | L1]``), and :mod:`svdq_format.segmented` a k-segmented layer's per-segment slices,
next to the layer's own buffers without owning them: an entry is keyed
by the tensors' identities, recomputed when any of them is modified in place (``_version``) or
reshaped, and dropped when any of them is garbage-collected — so loading new weights into a
layer, or merging a LoRA into ``L1``, is picked up without any call from the user.
"""

from __future__ import annotations

import weakref
from typing import Callable, Generic, TypeVar

import torch

__all__ = ["TensorCache"]

T = TypeVar("T")


class TensorCache(Generic[T]):
    """A cache of ``make()`` results keyed by a tuple of tensors (see the module doc)."""

    def __init__(self) -> None:
        self._store: dict[tuple[int, ...], tuple[tuple, T]] = {}

    def get(self, tensors: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
        """The cached value for ``tensors``, or ``make()`` (then cached) if it is missing or stale."""
        key = tuple(id(t) for t in tensors)
        state = tuple((t._version, tuple(t.shape)) for t in tensors)
        hit = self._store.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        value = make()
        if hit is None:
            for t in tensors:
                weakref.finalize(t, self._store.pop, key, None)
        self._store[key] = (state, value)
        return value

    def __contains__(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        return tuple(id(t) for t in tensors) in self._store

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
