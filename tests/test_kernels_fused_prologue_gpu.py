"""Issue 23, levers 2 and 3 on a Hopper GPU: the FP8 modes' reciprocal quantizer and the fused
``fast8`` prologue (``SVDQ_FAST8_PROLOGUE=fused``, :func:`svdq_kernels.lowrank_tiles.quantize_lowrank`).

* ``quantize_lowrank`` gives the current path's inputs bit for bit: the prologue's codes and token
  scales (themselves the reference quantizer's, evaluated on the CPU: every operation of the
  quantizer is correctly rounded) and ``lowrank_tiles``' k-tiles and ``a'``;
* the ``fast8`` layer with it equals the default layer (same GEMM inputs), eager and compiled;
* Inductor's graph quantizer (``1/s`` from ``svdquant::smooth_reciprocal``) stays within a few
  ulp of the eager one.
"""

from __future__ import annotations

import pytest
import torch

from svdq_format import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                       reason="needs an sm_90 GPU"),
]

import svdq_kernels  # noqa: E402,F401  (registers cutlass-sm90)
from svdq_kernels import cutlass_fast8, lowrank_tiles, triton_prologue  # noqa: E402


def _inputs(m, n, k, r, *, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g, device=dev) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g, device=dev) * 1.5 + 0.25).to(torch.bfloat16)
    down = (torch.randn(r, k, generator=g, device=dev) / k**0.5).to(torch.bfloat16)
    up = (torch.randn(n, r, generator=g, device=dev) * 0.5).to(torch.bfloat16)
    b = (torch.randn(n, generator=g, device=dev) * 0.1).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g, device=dev)
    x[:, :: max(1, k // 16)] *= 20.0  # outlier channels
    x = x.to(torch.bfloat16)
    if m > 8:
        x[3] = 0.0
        x[5, 7] = float("nan")
    return x, qweight, wscales, smooth, down, up, b


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("k", [3072, 12288, 15360])
@pytest.mark.parametrize("m,r", [(1, 32), (16, 48), (300, 32), (4608, 32)])
def test_quantize_lowrank_gives_the_current_paths_bits(m, k, r):
    x, _, _, smooth, down, _, _ = _inputs(m, 256, k, r, seed=m + k)
    for shift, ls in ((0.0, None), (0.171875, torch.linspace(0.5, 1.5, r, device="cuda").to(torch.bfloat16))):
        q, a, lr, ag = lowrank_tiles.quantize_lowrank(x, smooth, down, act_shift=shift, lora_scales=ls)
        q0, a0, _ = triton_prologue.prologue(x, smooth, None, act_shift=shift)
        lr0, ag0 = lowrank_tiles.lowrank_tiles(x, down, a0, lora_scales=ls)
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8))
        assert torch.equal(a.view(torch.int32), a0.view(torch.int32))
        assert torch.equal(lr.view(torch.int16), lr0.view(torch.int16)) and torch.equal(ag, ag0)
        # the reference quantizer on the CPU: the same codes and scales (a NaN row's scale is inf here)
        q_ref, a_ref = ops.fp8_activations(x.cpu().float(), smooth.cpu(), shift)
        fin = torch.isfinite(a_ref)
        assert torch.equal(a.cpu()[fin].view(torch.int32), a_ref[fin].view(torch.int32))
        assert torch.equal(q.cpu()[fin].view(torch.uint8), q_ref[fin].view(torch.uint8))


@pytest.mark.parametrize("n,k", [(3072, 3072), (3072, 12288), (21504, 3072)])
@pytest.mark.parametrize("m", [16, 4608])
def test_fused_fast8_layer_equals_the_default_one(monkeypatch, m, n, k):
    """Same GEMM inputs, so the same output (bit for bit where the GEMM itself is deterministic —
    checked by running the default twice — else within its accumulation-order noise)."""
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, 32, seed=7)
    x = torch.nan_to_num(x)  # (a NaN row would make torch.equal false)
    args = (qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "inductor")
    base, again = cutlass_fast8.fast8_linear(x, *args), cutlass_fast8.fast8_linear(x, *args)
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "fused")
    fused = cutlass_fast8.fast8_linear(x, *args)
    if torch.equal(base, again):
        assert torch.equal(fused, base)
    else:
        assert _rel(fused, base) < 1e-3


def test_compiled_fused_layer_matches_the_reference(monkeypatch):
    """Compiled with the fused prologue (the graph: one svdquant::linear, tests/test_fast8.py), the
    layer runs the same kernels as eager: within the fast8 bound of the reference, next to eager."""
    from svdq_format.linear import SVDQLinear

    m, n, k = 1000, 3072, 3072
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, 32, seed=9)
    x = torch.nan_to_num(x)
    layer = SVDQLinear(k, n, rank=32, bias=True, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for name, t in (("qweight", qw), ("wscales", ws), ("smooth", smooth), ("lora_down", down),
                        ("lora_up", up), ("bias", b)):
            getattr(layer, name).copy_(t)
    layer.mode = "fast8"
    ref = ops.reference_linear(*[t.cpu() for t in (x, qw, ws)], None, *[t.cpu() for t in (smooth, down, up, b)],
                               None, "int4", "fp8w").float()
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "fused")
    eager = layer(x)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(x)
    assert _rel(got.cpu(), ref) < 5e-3 and _rel(eager.cpu(), ref) < 5e-3
    assert _rel(got, eager) < 1e-3


def test_graph_quantizer_with_the_reciprocal_op_tracks_the_prologue():
    """Inductor's quantizer (``ops.graph_fp8_activations``): ``1/s`` is the cached vector (the op),
    ``absmax / 448`` becomes a multiplication by fp32(1/448) and ``1/a`` Triton's approximate
    division — token scales within a few ulp, codes one e4m3 step apart in rare entries."""
    x, _, _, smooth, down, _, _ = _inputs(4608, 256, 3072, 32, seed=11)
    x = torch.nan_to_num(x)
    torch._dynamo.reset()
    quant = torch.compile(lambda x, s: ops.graph_fp8_activations(x.float(), s), fullgraph=True)
    q, a = quant(x, smooth)
    q0, a0, _ = triton_prologue.prologue(x, smooth, None)
    torch.testing.assert_close(a, a0, rtol=4 * 2.0**-23, atol=0)
    differ = q.view(torch.uint8) != q0.view(torch.uint8)
    assert differ.float().mean().item() <= 1e-3, differ.float().mean().item()
    qf, q0f = q.float(), q0.float()
    assert ((qf - q0f).abs() <= 2.0**-3 * torch.maximum(qf.abs(), q0f.abs()) + 2.0**-9).all()
