"""A k-segmented layer on a kernel backend that takes only plain calls: one call per segment
(svdq_format.ops.per_segment, svdq_format/segmented.py), against the reference's k-segmented math.

The stand-in backend accepts only plain calls (it refuses ``k_segments``, like the sm90 registry)
in the activation modes it is told, records each call and computes it with the reference math.
Errors are max |got − want| / max |want| over the output; the bounds sit a few times above what
was measured (in the comments) and far below a wrong slice's error (which the last test shows).
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

from svdq_format import ops, segmented
from tests.test_k_segments import SEGS, SHIFT, _layer  # the same random k-segmented layer


@pytest.fixture
def stand_in():
    """A backend for plain calls only, in the activation modes of the returned set; ``calls``
    records ``(entry, in_features, act, has bias, act_shift, act_unsigned)`` per call."""
    accepts: set[str] = set()
    calls: list[tuple] = []

    def record(entry, x, rest):
        calls.append((entry, x.shape[-1], rest[9], rest[6] is not None, rest[10], rest[11]))

    def linear(*args, **kw):
        assert not kw  # never a k_segments call
        record("linear", args[0], args[1:])
        return ops.reference_linear(*args)

    def linear_fp8(*args, **kw):
        assert not kw
        record("linear_fp8", args[0], args[3:])
        return ops.reference_linear_fp8(*args)

    def supports(call: ops.LinearCall):
        if call.k_segments:
            return "stand-in: no k_segments"
        return None if call.act in accepts else f"stand-in: no {call.act}"

    ops.register_backend(ops.Backend("stand-in", linear, supports, priority=50, linear_fp8=linear_fp8))
    yield accepts, calls
    ops.unregister_backend("stand-in")


def _input(m=7, k=320, split=128, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, split:] = torch.nn.functional.gelu(2 * x[:, split:], approximate="tanh")  # the MLP half: post-GELU
    return x.to(dtype)


def _reference(layer, x, act):
    """The reference backend's k-segmented math of ``layer`` in activation mode ``act``."""
    return ops.reference_linear(x, layer.qweight, layer.wscales, layer.wtscale, layer.smooth, layer.lora_down,
                                layer.lora_up, layer.bias, layer.lora_scales, layer.precision, act,
                                k_segments=layer.k_segments)


def _err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _with_lora(layer):
    """``layer`` inside a module with a runtime LoRA (rank 4, strength 0.7) attached to it."""
    from svdq_format.lora import LoraAdapter, LoraDelta, attach_lora, plan_lora

    model = nn.Module()
    model.proj = layer
    g = torch.Generator().manual_seed(5)
    k, n = layer.in_features, layer.out_features
    delta = LoraDelta(down=torch.randn(4, k, generator=g) * 0.1, up=torch.randn(n, 4, generator=g) * 0.1,
                      scales=torch.full((4,), 0.7))
    attach_lora(model, plan_lora(model, LoraAdapter("a", {"proj": delta})))
    assert layer.lora_scales is not None and layer.lora_down.shape[0] > layer.rank
    return model


# Measured (5 seeds, with and without a LoRA): float32 layers ≤ 1.9e-7 (fp32 summation order: the
# low-rank product in two K parts); bfloat16 layers ≤ 7.2e-3 — each segment's output is rounded to
# bf16 (its dtype) before the fp32 sum, the reference rounds once, and a segment's partial can be
# about twice the output: up to ~3 half-ulps of 2^-8. The layer's quantization error itself is
# 6.5e-2 to 1.2e-1 on these inputs (the float32 case checks it is really there).
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("precision,mode,act", [("int4", "exact", "int4"), ("nvfp4", "exact", "nvfp4"),
                                                ("int4", "fast8", "fp8w")])
@pytest.mark.parametrize("lora", [False, True])
def test_per_segment_calls_compute_the_segmented_math(stand_in, precision, mode, act, dtype, bound, lora):
    accepts, calls = stand_in
    accepts.update({"int4", "nvfp4", "fp8w"})
    layer = _layer(precision, dtype=dtype)
    if lora:
        _with_lora(layer)
    layer.mode = mode
    x = _input(dtype=dtype)
    want = _reference(layer, x, act)
    got = layer(x)
    entry = "linear_fp8" if act == "fp8w" else "linear"
    segs = layer.k_segments
    assert calls == [(entry, 128, act, True, 0.0, False), (entry, 192, act, False, SHIFT, segs[1].act_unsigned)]
    assert got.dtype == dtype and got.shape == want.shape
    err = _err(got, want)
    assert err <= bound, err
    if dtype == torch.float32:  # the 4-bit math is really there: the dense layer is far off
        assert _err(layer.to_linear()(x), want) > 1e4 * bound


def test_auto_mode_picks_fast8_for_a_segmented_int4_layer(stand_in):
    """``auto`` counts a backend that runs the segments as running the layer: fast8 (``fp8w``) for
    int4, the exact math for nvfp4 (``fp8`` has no per-segment path: its whole-row activations
    would need pre-quantized ``fp8`` kernels); with nothing accepted, the exact math on the reference."""
    accepts, calls = stand_in
    layer, nv = _layer(), _layer("nvfp4")
    assert layer.act == "int4" and nv.act == "nvfp4"  # nothing accepted yet
    accepts.update({"fp8w", "fp8", "nvfp4"})
    ops.register_backend(ops.get_backend("stand-in"), replace=True)  # a registry change re-decides
    assert layer.act == "fp8w" and nv.act == "nvfp4"
    x = _input()
    assert _err(layer(x), _reference(layer, x, "fp8w")) <= 1e-6 and len(calls) == 2
    assert _err(nv(x), _reference(nv, x, "nvfp4")) <= 1e-6 and len(calls) == 4
    call = ops.LinearCall(device=torch.device("cpu"), dtype=torch.float32, precision="int4", act="fp8", rows=7,
                          in_features=320, out_features=96, rank=8, has_bias=True, k_segments=SEGS)
    assert "pre-quantized" in ops.per_segment_refusal(ops.get_backend("stand-in"), call)
    assert ops.select_backend(call).name == "reference"  # mode="fast" asked explicitly: the reference
    assert ops.select_backend(dataclasses.replace(call, act="fp8w")).name == "stand-in per segment"
    layer.backend = "reference"
    assert layer.act == "int4"


def test_a_backend_named_for_the_layer_runs_it_per_segment_without_a_warning(stand_in):
    accepts, calls = stand_in
    accepts.add("int4")
    layer = _layer()
    layer.backend, layer.mode = "stand-in", "exact"
    x = _input()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer(x)
    assert len(calls) == 2 and _err(got, _reference(layer, x, "int4")) <= 1e-6


def test_a_segmented_layer_on_a_plain_backend_compiles_whole(stand_in):
    """fullgraph: ``auto`` is a constant (fp8w), the quantizer is in the graph, and the one
    ``svdquant::linear_fp8`` node runs the segments with the graph's codes."""
    from tests.test_fast8 import _graph_ops

    accepts, calls = stand_in
    accepts.add("fp8w")
    layer = _layer(dtype=torch.bfloat16)
    x = _input(dtype=torch.bfloat16)
    want = layer(x)
    found, got = _graph_ops(layer, x)
    assert found == ["svdquant.smooth_reciprocal", "svdquant.linear_fp8"]
    assert torch.equal(got, want)
    assert [c[0] for c in calls] == ["linear_fp8"] * 4
    with pytest.MonkeyPatch.context() as mp:  # the fused prologue is for plain layers: the scale spans segments
        mp.setattr(ops, "FAST8_PROLOGUE", "fused")
        assert _graph_ops(layer, x)[0] == ["svdquant.smooth_reciprocal", "svdquant.linear_fp8"]
    layer.mode = "exact"
    accepts.add("int4")
    want = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), want) and [c[0] for c in calls[-2:]] == ["linear", "linear"]


def test_slices_are_made_once_per_weight_version_and_freed_with_the_layer(stand_in, monkeypatch):
    accepts, _ = stand_in
    accepts.add("int4")
    made = []
    slice_weights = segmented.segment_weights

    def counting(*args):
        parts = slice_weights(*args)
        made.append(tuple(id(p[0]) for p in parts))
        return parts

    monkeypatch.setattr(segmented, "segment_weights", counting)
    layer = _layer()
    layer.mode = "exact"
    x = _input()
    y = layer(x)
    layer(x)
    assert made[0] == made[1]  # the same cached views
    down_slices = segmented.segment_downs(layer.lora_down, layer.k_segments)
    assert down_slices is segmented.segment_downs(layer.lora_down, layer.k_segments)
    assert all(d.is_contiguous() for d in down_slices)
    with torch.no_grad():
        layer.wscales.mul_(2.0)  # changed in place: sliced again, and the output follows
    y2 = layer(x)
    assert made[2] != made[0] or not torch.equal(y2, y)
    assert _err(y2, _reference(layer, x, "int4")) <= 1e-6
    _with_lora(layer)  # a LoRA replaces lora_down: its slices are new
    assert segmented.segment_downs(layer.lora_down, layer.k_segments)[0].shape[0] == layer.lora_down.shape[0]
    n_weights, n_downs = len(segmented._WEIGHTS), len(segmented._DOWNS)
    qweight, lora_down = weakref.ref(layer.qweight), weakref.ref(layer.lora_down)
    del layer, down_slices
    gc.collect()
    assert qweight() is None and lora_down() is None  # the cached views do not keep the layer's tensors
    assert len(segmented._WEIGHTS) < n_weights and len(segmented._DOWNS) < n_downs  # and their entries go


def test_a_wrong_slice_would_be_seen(stand_in):
    """The bounds above separate right from wrong: the segments' handling swapped (the MLP half
    read as signed and unshifted) is far off."""
    accepts, _ = stand_in
    accepts.add("int4")
    layer = _layer()
    layer.mode = "exact"
    x = _input()
    want = _reference(layer, x, "int4")
    swapped = (SEGS[0], dataclasses.replace(SEGS[1], act_shift=0.0, act_unsigned=False))
    wrong = ops.per_segment(ops.get_backend("stand-in")).linear(
        x, layer.qweight, layer.wscales, None, layer.smooth, layer.lora_down, layer.lora_up, layer.bias, None, "int4",
        "int4", k_segments=swapped)
    assert _err(wrong, want) > 1e-2
