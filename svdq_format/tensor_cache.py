"""Values derived from weight tensors, made once and reused until a tensor changes or is freed.

The GPU kernels keep per-weight preparations (transposed scales, row powers of two, the ``fast8``
scales, ``[L1 | L1]``), and :mod:`svdq_format.segmented` a k-segmented layer's per-segment slices,
next to the layer's own buffers without owning them: an entry is keyed
by the tensors' identities, recomputed when any of them is modified in place (``_version``) or
reshaped, and dropped when any of them is garbage-collected — so loading new weights into a
layer, or merging a LoRA into ``L1``, is picked up without any call from the user.

**CUDA graphs.** ``torch.compile(model, mode="reduce-overhead")`` runs a graph's first (warm-up)
call with every allocation *of the calling thread* routed into the graph's private memory pool
(``torch._inductor.cudagraph_trees._use_cuda_memory_pool_manager``:
``_cuda_beginAllocateCurrentThreadToPool`` since torch 2.8; the *current stream*'s before), and
then fails the recording ("tensor(s) in the cudagraph pool not tracked as outputs") if anything
allocated there outlives the call — which a cache entry made there does. So a CUDA entry is made
on a worker thread, on a side stream of its own (:func:`_made_off_pool`), outside either routing;
during an actual capture it is made inline, as before (the capture owns its allocations).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import weakref
from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

import torch

__all__ = ["TensorCache"]

T = TypeVar("T")


class TensorCache(Generic[T]):
    """A cache of ``make()`` results keyed by a tuple of tensors (see the module doc)."""

    def __init__(self) -> None:
        self._store: dict[tuple[Hashable, ...], tuple[tuple, T]] = {}

    def get(self, tensors: tuple[torch.Tensor, ...], make: Callable[[], T], *, variant: Hashable = None) -> T:
        """The cached value for ``tensors``, or ``make()`` (then cached) if it is missing or stale.
        ``variant``: a further part of the key (values of one kind made from the same tensors in
        several forms, e.g. for a number of low-rank k-tiles), each cached and dropped like the rest."""
        key = (*(id(t) for t in tensors), variant)
        state = tuple((t._version, tuple(t.shape)) for t in tensors)
        hit = self._store.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        value = _made_off_pool(tensors[0].device, make) if _off_pool(tensors) else make()
        if hit is None:
            for t in tensors:
                weakref.finalize(t, self._store.pop, key, None)
        self._store[key] = (state, value)
        return value

    def __contains__(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        return (*(id(t) for t in tensors), None) in self._store

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()


# --------------------------------------------------------------------------- CUDA entries

_local = threading.local()  # .worker: True on the worker thread while it runs a make()
_lock = threading.Lock()
_worker: list[concurrent.futures.ThreadPoolExecutor] = []
_side_streams: dict[int, torch.cuda.Stream] = {}


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def _off_pool(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``make()`` for these keys runs on the worker thread: real (not a tracer's) CUDA
    tensors, not already on the worker (a nested ``get``), and no capture on the current stream."""
    t = tensors[0]
    if not _on_cuda(t) or getattr(_local, "worker", False):
        return False
    if not (type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)) or torch.compiler.is_compiling():
        return False
    with torch.cuda.device(t.device):
        return not torch.cuda.is_current_stream_capturing()


def _made_off_pool(device: torch.device, make: Callable[[], T]) -> T:
    """``make()`` run on the worker thread and the device's side stream, ordered after the work
    already queued on the current stream, which then waits for it.

    Lifetime: the value's new tensors belong to the side stream in the caching allocator, so once
    freed their blocks go back to it and are reused only by a later ``make()`` there — which starts
    by waiting on the then-current stream. Their users are the current stream of each ``get``; with
    ``record_stream`` on the current stream here, a freed block also waits for the work queued on
    it at free time, so the value is exactly as safe as one allocated on that stream (the old
    inline behaviour): a caller that runs cached layers on several streams is in the same position
    as before. ``make()``'s temporaries are used on the side stream only. A view of a key tensor in
    the value (a segment slice) just records that stream on the key's block: harmless.
    """
    cur = torch.cuda.current_stream(device)
    with _lock:
        if not _worker:
            _worker.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="svdq-tensor-cache"))
        index = cur.device_index
        if index not in _side_streams:
            _side_streams[index] = torch.cuda.Stream(device)
        side = _side_streams[index]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # thread-local

    def run() -> T:
        _local.worker = True
        try:
            # inference_mode(False) enables grad: set the grad mode after it
            with torch.cuda.device(device), torch.cuda.stream(side), torch.inference_mode(inference), \
                    torch.set_grad_enabled(grad):
                return make()
        finally:
            _local.worker = False

    side.wait_stream(cur)
    value = _worker[0].submit(run).result()
    cur.wait_stream(side)
    for t in _tensors(value):
        if _on_cuda(t):
            t.record_stream(cur)
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a cached value: a tensor, a tuple or list of values, or a dataclass."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
