"""svdq_format.tensor_cache: a CUDA entry is made off the calling thread (CUDA graphs' pool).

CUDA graph trees route the warm-up call's allocations of the calling thread into the graph's
private pool, so a cache entry must be made on another thread. No GPU here: the real worker thread
and ordering run against stand-ins for ``torch.cuda``'s stream API that log what happens; the real
thing runs in tests/test_kernels_fast8_gpu.py (``test_reduce_overhead_compiles_on_a_first_call``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch

from svdq_format import tensor_cache
from svdq_format.tensor_cache import TensorCache


class _Stream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.device_index = name, log, 0

    def wait_stream(self, other: "_Stream") -> None:
        self.log.append(("wait", self.name, other.name))


@dataclasses.dataclass
class _Prep:
    scales: torch.Tensor
    groups: int
    parts: tuple


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every tensor counts as a CUDA tensor; streams are thread-local names; returns the log."""
    log: list = []
    cur = _Stream("cur", log)
    local = threading.local()
    state = {"capturing": False}

    @contextlib.contextmanager
    def stream(s):
        prev = getattr(local, "stream", cur)
        local.stream = s
        try:
            yield
        finally:
            local.stream = prev

    monkeypatch.setattr(tensor_cache, "_on_cuda", lambda t: True)
    monkeypatch.setattr(tensor_cache, "_side_streams", {})
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: getattr(local, "stream", cur))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", t.shape[0], s.name)))
    log.append(state)  # the test flips log[0]["capturing"]
    return log


def _maker(log, value):
    def make():
        log.append(("make", threading.get_ident(), tensor_cache.torch.cuda.current_stream().name,
                    torch.is_grad_enabled()))
        return value
    return make


def test_cuda_entry_made_on_the_worker_thread_and_side_stream(fake_cuda):
    log = fake_cuda
    cache: TensorCache[_Prep] = TensorCache()
    w = torch.zeros(4)
    value = _Prep(torch.zeros(5), 2, (torch.zeros(6), None, (torch.zeros(7),)))
    with torch.no_grad():
        assert cache.get((w,), _maker(log, value)) is value
    events = log[1:]
    assert events[0] == ("wait", "side", "cur")  # the side stream waits for the queued work first
    assert events[1][0] == "make" and events[1][1] != threading.get_ident()  # on another thread...
    assert events[1][2:] == ("side", False)  # ...on the side stream, with the caller's grad mode
    assert events[2] == ("wait", "cur", "side")  # then the current stream waits for the entry
    assert sorted(events[3:]) == [("record", 5, "cur"), ("record", 6, "cur"), ("record", 7, "cur")]
    n = len(log)
    assert cache.get((w,), _maker(log, None)) is value and len(log) == n  # a hit: nothing runs
    assert tensor_cache.torch.cuda.current_stream().name == "cur"  # the caller's stream unchanged


def test_nested_get_runs_inline_on_the_worker(fake_cuda):
    log = fake_cuda
    outer_cache: TensorCache[torch.Tensor] = TensorCache()
    inner_cache: TensorCache[torch.Tensor] = TensorCache()
    w = torch.zeros(3)

    def outer():
        log.append(("outer", threading.get_ident()))
        return inner_cache.get((w,), _maker(log, torch.ones(2))) + 1

    assert torch.equal(outer_cache.get((w,), outer), torch.full((2,), 2.0))
    (_, outer_thread), make = [e for e in log[1:] if e[0] in ("outer", "make")]
    assert make[1] == outer_thread != threading.get_ident() and make[2] == "side"
    assert [e for e in log[1:] if e[0] == "wait"] == [("wait", "side", "cur"), ("wait", "cur", "side")]


def test_during_a_capture_the_entry_is_made_inline(fake_cuda):
    log = fake_cuda
    log[0]["capturing"] = True
    cache: TensorCache[torch.Tensor] = TensorCache()
    cache.get((torch.zeros(2),), _maker(log, torch.zeros(1)))
    assert log[1:] == [("make", threading.get_ident(), "cur", True)]


def test_errors_reach_the_caller_and_nothing_is_cached(fake_cuda):
    cache: TensorCache[torch.Tensor] = TensorCache()
    w = torch.zeros(2)

    def bad():
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        cache.get((w,), bad)
    assert len(cache) == 0 and cache.get((w,), lambda: torch.ones(1)).item() == 1.0


def test_cpu_tensors_use_no_cuda_api(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda used for CPU tensors")

    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", no_cuda)
    cache: TensorCache[int] = TensorCache()
    made_on = []
    assert cache.get((torch.zeros(2),), lambda: made_on.append(threading.get_ident()) or 7) == 7
    assert made_on == [threading.get_ident()]


def test_inference_mode_is_carried_to_the_worker(fake_cuda):
    seen = []
    cache: TensorCache[torch.Tensor] = TensorCache()
    w = torch.zeros(2)
    with torch.inference_mode():
        value = cache.get((w,), lambda: seen.append(
            (torch.is_inference_mode_enabled(), torch.is_grad_enabled(), threading.get_ident())) or torch.zeros(1))
    assert seen[0][:2] == (True, False) and seen[0][2] != threading.get_ident() and value.is_inference()


def test_variants_are_cached_apart_and_dropped_with_their_tensors() -> None:
    """``variant`` keys several values made from the same tensors (the fast8 scales per low-rank
    k-tile count): each made once, stale after an in-place change, gone with the tensor."""
    import gc

    cache: TensorCache[torch.Tensor] = TensorCache()
    held = [torch.ones(4)]
    made: list[int] = []

    def make(n: int):
        def run() -> torch.Tensor:
            made.append(n)
            return held[0].repeat(n)
        return run

    w = held[0]
    assert cache.get((w,), make(1)).shape == (4,) and cache.get((w,), make(2), variant=2).shape == (8,)
    assert cache.get((w,), make(2), variant=2).shape == (8,) and cache.get((w,), make(1)).shape == (4,)
    assert made == [1, 2] and len(cache) == 2 and (w,) in cache
    w.add_(1)  # in place: both entries stale
    assert cache.get((w,), make(2), variant=2).sum().item() == 16 and made == [1, 2, 2]
    held.clear()
    del w
    gc.collect()
    assert len(cache) == 0
