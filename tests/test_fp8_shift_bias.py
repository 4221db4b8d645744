"""The FP8 activation modes (``fast``, ``fast8``) on a layer with ``act_shift`` (GELU-fed, e.g. a
Nunchaku ``mlp_fc2``): the activations are quantized unshifted, ``x · (1/s)``, and the shift's exact
contribution is a bias, ``b' = b + Σ_k shift_k · fp32(1/s_k) · W[n, k]`` (``ops.fp8_bias``, cached per
layer), with ``W`` the weights the mode's GEMM multiplies. Checked on the CPU: the bias against the
kernels' own weight preparation, its cache, the reference's error against the float64 product on
post-GELU data (no worse than quantizing ``x + shift``), compiled graphs, and the kernel paths with
their kernels replaced by float64 arithmetic (routing: a shifted unsigned layer takes the fast
kernels; the promoted ones are for one-signed layers without a shift). The GPU side:
tests/test_fp8_shift_bias_gpu.py."""

from __future__ import annotations

import gc

import pytest
import torch

import svdq_format as sf
from svdq_format import ops, packing
from svdq_format.errors import BackendError
from svdq_format.spec import KSegment
from tests.test_fast8 import _graph_ops
from tests.test_fast8_promoted import emulated  # noqa: F401  (the fixture, asked for by name below)

SHIFT = 0.171875  # Nunchaku's GELU shift


def _gelu_layer(k=1024, n=256, r=16, *, precision="int4", dtype=torch.bfloat16, seed=0, segments=(), shift=SHIFT):
    """A GELU-fed layer as a quantizer writes it: ``act_shift`` with unsigned codes (int4) and the
    exact mode's bias correction ``b − Q(R) · (shift / s)`` in its stored bias."""
    g = torch.Generator().manual_seed(seed)
    unsigned = precision == "int4"
    kw = {"k_segments": segments} if segments else {"act_shift": shift, "act_unsigned": unsigned}
    layer = sf.SVDQLinear(k, n, rank=r, precision=precision, bias=True, dtype=dtype, **kw)
    with torch.no_grad():
        smooth = torch.rand(k, generator=g) * 1.5 + 0.25
        layer.smooth.copy_(smooth)
        layer.set_residual(torch.randn(n, k, generator=g) * 0.05)
        if r:
            layer.lora_down.copy_(torch.randn(r, k, generator=g) / k**0.5)
            layer.lora_up.copy_(torch.randn(n, r, generator=g) * 0.1)
        shifts = (torch.cat([torch.full((s.size,), s.act_shift) for s in segments]) if segments
                  else torch.full((k,), shift))
        b = torch.randn(n, generator=g) * 0.1
        layer.bias.copy_(b - layer.residual() @ (shifts / layer.smooth.float()))
    return layer


def _gelu_input(m, k, *, seed=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (0.5 + torch.rand(m, 1, generator=g))
    x[:, :: k // 16] *= 8.0  # a few large channels, as in DiT MLPs
    return torch.nn.functional.gelu(x, approximate="tanh").to(dtype)


def _args(layer, act):
    return (layer.qweight, layer.wscales, layer.wtscale, layer.smooth, layer.lora_down, layer.lora_up, layer.bias,
            layer.lora_scales, layer.precision, act)


def _gemm_weights(layer, act):
    """float64 ``[N, K]``: what the mode's kernels multiply — ``fast8``: the CUTLASS kernels' weight
    preparation (``fast8_weights``: fp16 scales × the row's power of two, then ``rowinv``); ``fast``:
    ``code × scale`` (times nvfp4's tensor scale per segment)."""
    nib = packing.unpack_nibbles(layer.qweight)
    if act == "fp8w":
        from svdq_kernels.cutlass_fast8 import fast8_weights

        scales16, rowinv = fast8_weights(layer.qweight, layer.wscales)
        codes = packing.nibbles_to_int4(nib)
        return packing.fp8_weight_values(codes, scales16.t()).double() * rowinv.double()[:, None]
    if layer.precision == "int4":
        return packing.dequantize_int4(nib, layer.wscales, group_size=64).double()
    w = packing.dequantize_nvfp4(nib, layer.wscales, torch.ones(()), group_size=16)
    sizes = [s.size for s in layer.k_segments] or [layer.in_features]
    return (w * layer.wtscale.float().reshape(-1).repeat_interleave(torch.tensor(sizes))[None, :]).double()


def _shift_vector(layer):
    if layer.k_segments:
        return torch.cat([torch.full((s.size,), s.act_shift, dtype=torch.float64) for s in layer.k_segments])
    return torch.full((layer.in_features,), layer.act_shift, dtype=torch.float64)


@pytest.mark.parametrize("precision,act,segments", [
    ("int4", "fp8w", ()), ("int4", "fp8", ()),
    ("int4", "fp8w", (KSegment(384), KSegment(640, SHIFT, True))),
    ("nvfp4", "fp8", (KSegment(384, 0.25), KSegment(640, SHIFT))),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bias_is_the_shift_times_the_gemm_weights(precision, act, segments, dtype):
    """``b' = b + W · (shift · fp32(1/s))`` in float64, rounded once to the bias's dtype, with ``W`` the
    GEMM's weights (``fast8``: the CUTLASS preparation's; nvfp4: each segment's tensor scale)."""
    layer = _gelu_layer(precision=precision, dtype=dtype, segments=segments)
    got = ops.fp8_bias(*_args(layer, act)[:4], layer.bias, precision, act, layer.act_shift,
                       k_segments=layer.k_segments, dtype=dtype)
    rcp = (1.0 / layer.smooth.float()).double()
    want = (layer.bias.double() + _gemm_weights(layer, act) @ (_shift_vector(layer) * rcp)).to(dtype)
    assert got is not None and got.dtype == dtype and torch.equal(got, want)
    # without a bias: the correction alone, in the given dtype
    alone = ops.fp8_bias(*_args(layer, act)[:4], None, precision, act, layer.act_shift,
                         k_segments=layer.k_segments, dtype=torch.float16)
    assert alone is not None and alone.dtype == torch.float16
    assert torch.equal(alone, (_gemm_weights(layer, act) @ (_shift_vector(layer) * rcp)).to(torch.float16))


def test_no_shift_keeps_the_bias_and_other_modes_are_refused():
    layer = _gelu_layer(shift=0.0)
    for bias in (layer.bias, None):
        assert ops.fp8_bias(*_args(layer, "fp8w")[:4], bias, "int4", "fp8w", 0.0, dtype=torch.bfloat16) is bias
    unshifted = (KSegment(512), KSegment(512, 0.0, True))
    assert ops.fp8_bias(*_args(layer, "fp8w")[:4], layer.bias, "int4", "fp8w", k_segments=unshifted,
                        dtype=torch.bfloat16) is layer.bias
    with pytest.raises(BackendError, match="FP8 activation modes"):
        ops.fp8_bias(*_args(layer, "int4")[:4], layer.bias, "int4", "int4", SHIFT, dtype=torch.bfloat16)


def test_a_zero_smoothing_entry_outside_the_shifted_segment_adds_nothing():
    """1/s = inf on an unshifted segment's channel contributes 0 (not NaN) to the shift bias."""
    segs = (KSegment(384), KSegment(640, SHIFT, True))
    layer = _gelu_layer(segments=segs)
    with torch.no_grad():
        layer.smooth[5] = 0
    b = ops.fp8_bias(*_args(layer, "fp8w")[:4], layer.bias, "int4", "fp8w", k_segments=segs, dtype=torch.bfloat16)
    assert b is not None and torch.isfinite(b).all()


def test_bias_is_cached_and_remade_when_an_input_changes():
    """Made once per weights, smoothing, bias, shift, mode and dtype; a tensor changed in place makes it
    anew; freed tensors drop it; tensors that require grad are never cached."""
    layer = _gelu_layer(k=256, n=128, r=0)
    args = _args(layer, "fp8w")[:4]

    def get(shift=SHIFT, act="fp8w", bias=layer.bias, dtype=torch.bfloat16):
        return ops.fp8_bias(*args, bias, "int4", act, shift, dtype=dtype)

    first = get()
    assert get() is first
    assert get(0.25) is not first and not torch.equal(get(0.25), first) and get() is first  # a variant each
    assert get(act="fp8") is not first
    for change in (lambda: layer.qweight.__ixor__(0x11), lambda: layer.wscales.mul_(1.5),
                   lambda: layer.smooth.mul_(0.75), lambda: layer.bias.add_(1.0)):
        before = get()
        with torch.no_grad():
            change()
        after = get()
        assert after is not before and not torch.equal(after, before)
        assert after is get()
    gc.collect()  # earlier tests' layers
    size = len(ops._SHIFT_BIASES)
    other = _gelu_layer(k=256, n=128, r=0, seed=3)
    ops.fp8_bias(*_args(other, "fp8w")[:4], other.bias, "int4", "fp8w", SHIFT, dtype=torch.bfloat16)
    assert len(ops._SHIFT_BIASES) == size + 1
    del other
    gc.collect()
    assert len(ops._SHIFT_BIASES) == size
    trained = layer.bias.detach().clone().requires_grad_(True)
    out = get(bias=trained)
    assert out.requires_grad and len(ops._SHIFT_BIASES) == size
    assert torch.equal(out.detach(), get())


def _old_fp8_reference(layer, x, act):
    """The FP8 modes before: ``x + shift`` quantized, the stored bias as it is."""
    xf = x.reshape(-1, x.shape[-1]).float()
    q, a = ops.fp8_activations(xf, layer.smooth, ops.shift_vector(xf.shape[-1], layer.act_shift, layer.k_segments))
    return ops.reference_linear_fp8(x, q, a, *_args(layer, act), k_segments=layer.k_segments)


def _exact_product(layer, x, act):
    """float64: the layer's 4-bit branch on unquantized activations ``(x + shift) / s`` with the mode's
    weights, plus the stored bias and the low-rank branch — what both formulations approximate."""
    xd = x.double()
    xs = (xd + _shift_vector(layer)) / layer.smooth.double()
    y = xs @ _gemm_weights(layer, act).t() + layer.bias.double()
    return y + (xd @ layer.lora_down.double().t()) @ layer.lora_up.double().t()


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("act", ["fp8w", "fp8"])
@pytest.mark.parametrize("k", [3072, 12288])
def test_unshifted_quantizer_is_no_worse_on_gelu_outputs(act, k):
    """Against the float64 product on post-GELU rows, the FP8 modes' output with ``x · (1/s)`` quantized
    and the shift in the bias is no worse than with ``x + shift`` quantized (float32 layer: no output
    rounding). Measured here: fp8w 2.81e-2 → 2.58e-2 (K = 3072), 2.83e-2 → 2.58e-2 (12288); fp8 alike."""
    layer = _gelu_layer(k=k, n=128, dtype=torch.float32, seed=k)
    x = _gelu_input(64, k, seed=k + 1, dtype=torch.float32)
    exact = _exact_product(layer, x, act)
    new = ops.reference_linear(x, *_args(layer, act), act_shift=layer.act_shift, act_unsigned=True)
    old = _old_fp8_reference(layer, x, act)
    e_new, e_old = _rel(new, exact), _rel(old, exact)
    assert e_new <= e_old, (e_new, e_old)
    assert e_new < 0.05  # the quantization error is there, at the e4m3 level


def test_zero_row_gives_the_corrected_bias_and_nan_rows_stay_nan():
    """A zero input row is quantized to zero codes: its output is the corrected bias (the dense layer's
    bias, up to the weights' quantization) — before, ``shift · (1/s)`` was quantized for it."""
    layer = _gelu_layer(k=256, n=128, r=8)
    x = _gelu_input(5, 256)
    x[1] = 0
    x[3, 7] = float("nan")
    y = ops.reference_linear(x, *_args(layer, "fp8w"), act_shift=SHIFT, act_unsigned=True)
    b = ops.fp8_bias(*_args(layer, "fp8w")[:4], layer.bias, "int4", "fp8w", SHIFT, dtype=torch.bfloat16)
    assert torch.equal(y[1], b) and y[3].isnan().all() and not y[[0, 2, 4]].isnan().any()


@pytest.mark.parametrize("act", ["fp8w", "fp8"])
def test_reference_fp8_entry_and_the_layer_agree(act):
    """``reference_linear`` = ``reference_linear_fp8`` on the unshifted codes = the module's forward."""
    layer = _gelu_layer(k=512, n=128)
    layer.mode = "fast8" if act == "fp8w" else "fast"
    x = _gelu_input(9, 512)
    want = ops.reference_linear(x, *_args(layer, act), act_shift=SHIFT, act_unsigned=True)
    q, a = ops.fp8_activations(x.float(), layer.smooth)
    got = ops.reference_linear_fp8(x, q, a, *_args(layer, act), SHIFT, True)
    assert torch.equal(got, want) and torch.equal(layer(x), want)


def _captured(model, x):
    """tests/test_fast8.py's ``_graph_ops`` (the ``svdquant`` ops of the captured graph, and the
    output), with dynamo reset afterwards too: the next test's compiles start from a clean frame
    state, not one where a shift that differed between compiles is a symbolic float."""
    try:
        return _graph_ops(model, x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("prologue", ["fused", "inductor"])
@pytest.mark.parametrize("segmented,rank", [(False, 16), (True, 16), (False, 0)])
def test_compiled_shifted_layer_gives_the_eager_bits(monkeypatch, prologue, segmented, rank):
    """Compiled ``fast8``: the graph's quantizer (``inductor``, every k-segmented layer, every layer
    without a low-rank branch — its op gets an empty stand-in for x) quantizes ``x · (1/s)`` without
    the shift, the op adds it as a bias — the eager output bit for bit."""
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", prologue)
    segs = (KSegment(384), KSegment(640, SHIFT, True)) if segmented else ()
    layer = _gelu_layer(segments=segs, r=rank)
    layer.mode = "fast8"
    x = _gelu_input(7, 1024)
    found, out = _captured(layer, x)
    split = prologue == "inductor" or segmented or (rank == 0 and ops.GRAPH_QUANTIZE_RANK0)
    assert found == (["svdquant.smooth_reciprocal", "svdquant.linear_fp8"] if split else ["svdquant.linear"])
    assert torch.equal(out, layer(x))
    assert torch.equal(out, ops.reference_linear(x, *_args(layer, "fp8w"), layer.act_shift, layer.act_unsigned,
                                                 k_segments=layer.k_segments))


def test_one_signed_only_without_a_shift():
    assert ops.fp8_one_signed(0.0, True)
    assert not ops.fp8_one_signed(SHIFT, True) and not ops.fp8_one_signed(0.0, False)
    assert not ops.fp8_one_signed(-0.5, True)


# --- the kernel paths, their kernels replaced by float64 arithmetic (tests/test_kernels_ss.py) ----------

def test_fast8_kernel_paths_use_the_unshifted_codes_and_the_shift_bias(monkeypatch):
    """A GELU-shifted unsigned layer (fast8, M = 2048): the pre-converted path (e4m3 pass + SS kernel)
    and the int4 ``lowrank`` kernel get the unshifted codes and ``b'``, give the same bits and stay
    within the fast8 bound of the new reference; no promoted kernel is built."""
    from svdq_kernels import cutlass_fast8
    from tests.test_kernels_ss import emulate_kernels

    monkeypatch.setattr(cutlass_fast8, "PROMOTE_SHIFTED", False)  # the fast kernels' routing (default: on)
    recorded = emulate_kernels(monkeypatch)
    layer = _gelu_layer(k=256, n=128, r=32)
    x = _gelu_input(2048, 256)
    q, a = ops.fp8_activations(x.float(), layer.smooth)
    outs = {}
    for weights in ("e4m3", "int4"):
        monkeypatch.setattr(cutlass_fast8, "WEIGHTS", weights)
        outs[weights] = cutlass_fast8.fast8_linear_fp8(x, q, a, *_args(layer, "fp8w"), SHIFT, True)
    calls = [c for c in recorded if not isinstance(c, str)]  # (the kernels; "e4m3_weights" for the pass)
    assert [type(c).__name__ for c in calls] == ["SsLowrankGemmConfig", "Group64GemmConfig"]
    assert not any(getattr(c, "promote", 0) for c in calls)
    assert torch.equal(outs["e4m3"], outs["int4"])
    ref = ops.reference_linear(x, *_args(layer, "fp8w"), SHIFT, True).double()
    assert ((outs["e4m3"].double() - ref).norm() / ref.norm()).item() < 4e-3
    old = _old_fp8_reference(layer, x, "fp8w").double()  # the shifted codes are not what ran
    assert ((outs["e4m3"].double() - old).norm() / ref.norm()).item() > 4e-3


@pytest.mark.parametrize("shift", [SHIFT, 0.0])
@pytest.mark.parametrize("compiled", [False, True])
def test_segmented_layer_runs_its_shifted_half_on_the_fast_kernels(request, monkeypatch, shift, compiled):
    """A FLUX single block's ``proj_out`` in small (attention half signed, MLP half unsigned and
    GELU-shifted), on a kernel backend that runs it one plain call per segment: the shifted half takes
    the ``lowrank`` kernels like the signed one (the shift in its bias); with ``shift = 0`` (one-signed
    as it is) the promoted kernel. Eager and compiled (the graph's unshifted quantizer, then
    ``linear_fp8`` per segment), within the per-segment bound of the reference (tests/test_segmented.py)."""
    from svdq_kernels import cutlass_fast8

    monkeypatch.setattr(cutlass_fast8, "PROMOTE_SHIFTED", False)  # the fast kernels' routing (default: on)

    calls = request.getfixturevalue("emulated")  # cutlass_fast8's kernels as float64 arithmetic

    def supports(call):
        if call.k_segments:
            return "emulated: no k_segments"
        return None if call.act == "fp8w" else f"emulated: no {call.act}"

    ops.register_backend(ops.Backend("emulated-fast8", cutlass_fast8.fast8_linear, supports, priority=60,
                                     linear_fp8=cutlass_fast8.fast8_linear_fp8))
    try:
        segs = (KSegment(256), KSegment(512, shift, True))
        layer = _gelu_layer(k=768, n=128, r=32, segments=segs)
        layer.mode = "fast8"
        x = _gelu_input(300, 768)
        if shift == 0.0:
            x[:, 256:] = x[:, 256:].clamp(min=0)  # ReLU-fed: one-signed without a shift
        want = ops.reference_linear(x, *_args(layer, "fp8w"), k_segments=segs).double()
        out = _captured(layer, x)[1] if compiled else layer(x)
    finally:
        ops.unregister_backend("emulated-fast8")
    gemms = [c[0] for c in calls if isinstance(c, tuple) and c[0] != "prologue"]
    assert len(gemms) == 2 and not gemms[0].promote and gemms[0].lowrank
    assert (gemms[1].promote, gemms[1].lowrank) == ((1, False) if shift == 0.0 else (0, True))
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1.5e-2, err


def test_promote_shifted_switch_routes_gelu_layers_to_the_promoted_kernel(request, monkeypatch):
    """``cutlass_fast8.PROMOTE_SHIFTED`` (on by default, until an H100 measurement): on, a GELU-shifted
    unsigned call takes the promoted kernel again — with the unshifted codes and the shift bias, so still
    the new reference."""
    from svdq_kernels import cutlass_fast8

    calls = request.getfixturevalue("emulated")
    monkeypatch.setattr(cutlass_fast8, "PROMOTE_SHIFTED", True)
    layer = _gelu_layer(k=256, n=128, r=32)
    x = _gelu_input(300, 256)
    out = cutlass_fast8.fast8_linear(x, *_args(layer, "fp8w"), SHIFT, True)
    gemms = [c[0] for c in calls if isinstance(c, tuple) and c[0] != "prologue"]
    assert [g.promote for g in gemms] == [1]
    ref = ops.reference_linear(x, *_args(layer, "fp8w"), SHIFT, True).double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3
    calls.clear()
    cutlass_fast8.fast8_linear(x, *_args(layer, "fp8w"), SHIFT, False)  # signed: never promoted
    assert [c[0].promote for c in calls if isinstance(c, tuple) and c[0] != "prologue"] == [0]
