"""Eager calls skip the ``svdquant::linear`` op's torch.library dispatch (host time per layer);
everything that traces or transforms still goes through the op."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from svdq_format import ops


class _CountingBackend:
    """A backend that records the calls it gets and returns zeros."""

    def __init__(self) -> None:
        self.calls = 0

    def linear(self, x, qweight, *args):
        self.calls += 1
        return x.new_zeros(*x.shape[:-1], qweight.shape[0])


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    k = n = 128
    return dict(
        x=torch.randn(3, k, generator=g).to(torch.bfloat16),
        qweight=torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
        wscales=(torch.rand(n, k // 64, generator=g) * 0.01 + 0.001).to(torch.bfloat16),
        smooth=(torch.rand(k, generator=g) + 0.5).to(torch.bfloat16),
        down=torch.randn(8, k, generator=g).to(torch.bfloat16),
        up=torch.randn(n, 8, generator=g).to(torch.bfloat16),
        bias=torch.randn(n, generator=g).to(torch.bfloat16),
    )


def _call(lay, x=None, **kw):
    return ops.svdq_linear(x if x is not None else lay["x"], lay["qweight"], lay["wscales"], None, lay["smooth"],
                           lay["down"], lay["up"], lay["bias"], precision="int4", act="int4", **kw)


def test_eager_result_equals_the_op(layer):
    direct = _call(layer)
    via_op = torch.ops.svdquant.linear(layer["x"], layer["qweight"], layer["wscales"], None, layer["smooth"],
                                       layer["down"], layer["up"], layer["bias"], None, "int4", "int4", 0.0, False,
                                       "auto")
    assert torch.equal(direct, via_op)


def test_plain_eager_is_recognised_and_tracing_is_not(layer):
    x = layer["x"]
    assert ops._plain_eager(x)
    with torch.inference_mode():
        assert ops._plain_eager(torch.randn(2, 4))
    assert not ops._plain_eager(x.float().requires_grad_())  # autograd: the op (and its error)
    with torch.no_grad():
        assert ops._plain_eager(x.float().requires_grad_())
    assert not ops._plain_eager(x.to("meta"))
    with FakeTensorMode() as mode:
        assert not ops._plain_eager(mode.from_tensor(x))
    with FakeTensorMode():  # a dispatch mode, whatever the tensor
        assert not ops._plain_eager(x)

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Recording():
        assert not ops._plain_eager(x)
    seen = []
    torch.func.vmap(lambda row: seen.append(ops._plain_eager(row)) or row)(x.float())
    assert seen == [False]
    with warnings.catch_warnings():  # deprecated in torch 2.13, still there: ops.py must keep recognising it
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace` is deprecated", DeprecationWarning)
        torch.jit.trace(lambda t: seen.append(ops._plain_eager(t)) or t * 2, (torch.randn(2),), check_trace=False)
    assert seen == [False, False]


def test_a_fake_tensor_call_still_gets_the_ops_shape(layer):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = _call(layer, x=mode.from_tensor(layer["x"]))
    assert tuple(y.shape) == (3, 128) and y.dtype == torch.bfloat16


def test_eager_calls_reach_the_backend_once(layer, monkeypatch):
    counting = _CountingBackend()
    monkeypatch.setattr(ops, "select_backend", lambda call, requested="auto": counting)
    _call(layer)
    assert counting.calls == 1
