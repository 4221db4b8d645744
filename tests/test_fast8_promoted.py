"""The ``fast8`` layer on one-signed activations (``act_unsigned`` without an ``act_shift``, e.g. a
ReLU-fed layer) runs the promoted group-64 kernel on the two-step path (issue 23 / 21): its choice,
the dispatch of both entry points, and the layer's output, checked on the CPU with the kernels
replaced by their float64 arithmetic. A GELU-shifted unsigned layer (a Nunchaku ``mlp_fc2``, a
converted FLUX single block's ``proj_out`` MLP half) is quantized unshifted in the FP8 modes (the
shift in the bias, ``ops.fp8_bias``): signed activations, the fast kernels. On the GPU:
tests/test_kernels_segmented_gpu.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from svdq_format import ops, packing
from svdq_format.errors import UnsupportedError
from svdq_kernels import cutlass_fast8, lowrank_tiles
from svdq_kernels.configs import (
    AUTO_GROUP64_CONFIGS,
    DEFAULT_CONFIGS,
    GROUP64_CONFIGS,
    PROMOTED_GROUP64_CONFIGS,
    group64_config,
)
from tests.test_kernels_ss import layer_weights

SHIFT = 0.171875  # Nunchaku's GELU shift


def test_promoted_choice_by_token_count(monkeypatch):
    """``promote=True``: 64 × 128 pingpong p1 for 16 < M < 256, 128 × 128 cooperative p1 from 256
    (large M too: no promoted 128 × 256), the unpromoted 128 × 16 stream-K tiling for M ≤ 16."""
    monkeypatch.delenv("SVDQ_G64_CONFIG", raising=False)
    small, large = PROMOTED_GROUP64_CONFIGS[1], PROMOTED_GROUP64_CONFIGS[0]
    assert (large.tile_m, large.tile_n, large.schedule, large.promote) == (128, 128, "cooperative", 1)
    assert (small.tile_m, small.tile_n, small.schedule, small.promote) == (64, 128, "pingpong", 1)
    for m in (17, 64, 255):
        assert group64_config(m, promote=True) == small
    for m in (256, 2047, 2048, 4608, 65536):
        for n in (None, 3072, 12288):
            assert group64_config(m, n=n, promote=True) == large
    for m in (1, 16):
        assert group64_config(m, promote=True) == group64_config(m) and group64_config(m).scheduler == "streamk"
    # `svdq kernels build` prebuilds them; they are not among the unpromoted automatic tilings
    assert set(PROMOTED_GROUP64_CONFIGS) <= set(GROUP64_CONFIGS) <= set(DEFAULT_CONFIGS)
    assert not set(PROMOTED_GROUP64_CONFIGS) & set(AUTO_GROUP64_CONFIGS)
    with pytest.raises(UnsupportedError, match="no low-rank k-tiles"):
        group64_config(300, lowrank=True, promote=True)
    with pytest.raises(UnsupportedError, match="e4m3"):
        group64_config(300, activations="f16", promote=True)


# --- the layer's dispatch, the kernels replaced by their arithmetic in float64 -----------------------

def _w8(qweight, scales16, k):
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    return packing.fp8_weight_values(codes, scales16[: k // 64].t())


def _g64_op(qweight, scales16, rowinv, q, a, c):
    """The two-step group-64 kernel's math: ``(q · w8ᵀ) · rowinv · a + c`` (bf16 out)."""
    acc = q.double() @ _w8(qweight, scales16, q.shape[1]).double().t()
    return (acc * rowinv.double() * a.double()[:, None] + c.double()).to(torch.bfloat16)


def _g64_lr_op(qweight, scales, rowinv, q, a, bias, lr, l1):
    """The ``lowrank`` group-64 kernel's math (sentinel-extended scales, l1 ``[N, 32 t]``)."""
    m, t = q.shape[0], l1.shape[1] // 32
    lr_used = lr.view(m, t, 2, 32)[:, :, 0].reshape(m, 32 * t)
    acc = q.double() @ _w8(qweight, scales, q.shape[1]).double().t() + lr_used.double() @ l1.double().t()
    out = acc * rowinv.double() * a.double()[:, None]
    return (out + bias.double() if bias.numel() else out).to(torch.bfloat16)


def _lr16(x, down, lora_scales):
    """``x · L2ᵀ`` (per-rank scales applied) as bf16 ``[hi | lo]``: the prologue's ``lr16``."""
    lr = x.double() @ down.double().t()
    if lora_scales is not None:
        lr = lr * lora_scales.double()
    hi = lr.to(torch.bfloat16)
    return torch.cat([hi, (lr - hi.double()).to(torch.bfloat16)], dim=1)


@pytest.fixture()
def emulated(monkeypatch):
    """``cutlass_fast8`` with its Triton and CUTLASS kernels replaced by CPU arithmetic; records
    ``(kernel config, also_build)`` per GEMM and the prologues that ran. ``PROMOTE_SHIFTED`` off (the
    routing of the unshifted quantizer; its default, on, is tests/test_fp8_shift_bias.py's)."""
    calls: list[object] = []
    monkeypatch.setattr(cutlass_fast8, "PROMOTE_SHIFTED", False)

    def load(config, *, also_build=()):
        calls.append((config, tuple(also_build)))
        return _g64_lr_op if config.lowrank else _g64_op

    def prologue(x2, smooth, down, *, act_shift=0.0, lr16=False, lora_scales=None, **_):
        calls.append(("prologue", down is not None, lr16))
        q, a = ops.quantize_fp8_rows(ops.smoothed(x2.float(), smooth, act_shift))
        return q, a, _lr16(x2, down, lora_scales) if down is not None else None

    def lowrank_down(x2, down, *, lora_scales=None):
        calls.append("lowrank_down")
        return _lr16(x2, down, lora_scales)

    def tiles(x, down, a, *, lora_scales=None):
        m, r = x.shape[0], down.shape[0]
        t = lowrank_tiles.lowrank_k_tiles(r)
        ag = torch.where(a > 0, a, torch.ones_like(a))
        ranks = torch.zeros(m, 32 * t, dtype=torch.float64)
        lr_ranks = x.double() @ down.double().t()
        ranks[:, :r] = (lr_ranks * lora_scales.double() if lora_scales is not None else lr_ranks) / ag.double()[:, None]
        lr = torch.zeros(m, t, 64, dtype=torch.bfloat16)
        lr[:, :, :32] = ranks.view(m, t, 32).to(torch.bfloat16)
        return lr.view(m, 64 * t), ag

    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "inductor")  # eager: prologue + lowrank_tiles (no fused kernel)
    monkeypatch.setattr(cutlass_fast8, "load_kernel", load)
    monkeypatch.setattr(cutlass_fast8, "prologue", prologue)
    monkeypatch.setattr(cutlass_fast8, "lowrank_down", lowrank_down)
    monkeypatch.setattr(cutlass_fast8, "lowrank_tiles", tiles)
    monkeypatch.setattr(cutlass_fast8, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", True)
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "int4")
    monkeypatch.delenv("SVDQ_G64_CONFIG", raising=False)
    return calls


def _gelu_segment(m, n=128, k=256, r=32, seed=0, relu=False):
    """A layer and post-GELU input (≥ −0.17: one-signed once shifted by :data:`SHIFT`), or post-ReLU
    (``relu``: one-signed as it is)."""
    g = torch.Generator().manual_seed(seed)
    act = torch.relu if relu else (lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    x = act(3 * torch.randn(m, k, generator=g)).to(torch.bfloat16)
    qweight, wscales, smooth, down, up, bias = layer_weights(g, n, k, r)
    scales = torch.linspace(0.5, 1.5, r).to(torch.bfloat16)
    return x, (qweight, wscales, None, smooth, down, up, bias, scales, "int4", "fp8w")


def _call(entry, x, args, unsigned, shift=SHIFT):
    if entry == "linear":
        return cutlass_fast8.fast8_linear(x, *args, shift, unsigned)
    q, a = ops.quantize_fp8_rows(ops.smoothed(x.float(), args[3]))  # the FP8 modes' activations: unshifted
    return cutlass_fast8.fast8_linear_fp8(x, q, a, *args, shift, unsigned)


@pytest.mark.parametrize("entry", ["linear", "linear_fp8"])
@pytest.mark.parametrize("m", [16, 17, 300])
@pytest.mark.parametrize("unsigned,shift", [(False, 0.0), (True, 0.0), (False, SHIFT), (True, SHIFT)])
def test_one_signed_activations_run_the_promoted_kernel_on_the_two_step_path(emulated, entry, m, unsigned, shift):
    """``act_unsigned`` without a shift (ReLU-fed) and M > 16: the prologue's ``lr16`` (eager) or
    ``lowrank_down`` (compiled), the cuBLAS low-rank source, then the promoted kernel (built with its
    twin); otherwise — GELU-shifted unsigned layers included: quantized unshifted, the shift in the
    bias — the ``lowrank`` kernel of today's tiling. Both within the fast8 bound of the reference."""
    x, args = _gelu_segment(m, relu=unsigned and not shift)
    out = _call(entry, x, args, unsigned, shift)
    promoted = unsigned and not shift and m > 16
    gemms = [c for c in emulated if isinstance(c, tuple) and c[0] != "prologue"]
    assert len(gemms) == 1
    config, also = gemms[0]
    if promoted:
        assert config == group64_config(m, promote=True) and config.promote == 1 and not config.lowrank
        assert set(also) == set(PROMOTED_GROUP64_CONFIGS)
        assert (("prologue", True, True) in emulated) == (entry == "linear")
        assert ("lowrank_down" in emulated) == (entry == "linear_fp8")
    else:
        assert config == group64_config(m, n=128, sms=132, lowrank=True) and config.promote == 0
        assert "lowrank_down" not in emulated and ("prologue", True, True) not in emulated
    ref = ops.reference_linear(x, *args, act_shift=shift, act_unsigned=unsigned).double()
    assert out.shape == (m, 128) and out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


def test_one_signed_entry_points_agree_and_stay_near_the_lowrank_kernels(emulated):
    """On the promoted path the eager entry (the prologue's ``lr16``) and the compiled one
    (``lowrank_down`` beside the graph's quantizer) give the same bits; against the low-rank
    k-tiles' output (signed dispatch, same arithmetic here) they differ by bf16 roundings only
    (3.2e-3 measured: the source ``c`` and both outputs rounded)."""
    x, args = _gelu_segment(300, seed=3, relu=True)
    eager, compiled = _call("linear", x, args, True, 0.0), _call("linear_fp8", x, args, True, 0.0)
    assert torch.equal(eager, compiled)
    plain = _call("linear", x, args, False, 0.0).double()
    assert ((eager.double() - plain).norm() / plain.norm()).item() < 4e-3


def test_a_forced_unpromoted_tiling_keeps_the_lowrank_path(emulated, monkeypatch):
    """``SVDQ_G64_CONFIG`` (benchmarks) overrides the choice: an unpromoted tiling there runs the
    ``lowrank`` kernels even for one-signed activations."""
    forced = dataclasses.replace(AUTO_GROUP64_CONFIGS[2])
    monkeypatch.setenv("SVDQ_G64_CONFIG", forced.name)
    x, args = _gelu_segment(300)
    _call("linear", x, args, True)
    ((config, _),) = [c for c in emulated if isinstance(c, tuple) and c[0] != "prologue"]
    assert config == dataclasses.replace(forced, lowrank=True)


@pytest.mark.parametrize("entry", ["linear", "linear_fp8"])
def test_promotion_comes_before_the_pre_converted_weights(emulated, monkeypatch, entry):
    """With ``SVDQ_FAST8_WEIGHTS=e4m3`` an M ≥ 2048 one-signed call (unsigned, no shift) still runs the
    promoted kernel (the pre-converted one accumulates without promotion); a signed one, and a
    GELU-shifted unsigned one (quantized unshifted), take the e4m3 pre-pass and the pre-converted
    kernel, with the shift-corrected bias (``ops.fp8_bias``) as its bias."""
    ss_calls = []

    def ss(w8, rowinv, q, a, bias, lr, l1, **kw):
        ss_calls.append(bias)
        return torch.zeros(q.shape[0], 128, dtype=torch.bfloat16)

    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "e4m3")
    monkeypatch.setattr(cutlass_fast8, "e4m3_weights", lambda *a: emulated.append("e4m3_weights"))
    monkeypatch.setattr(cutlass_fast8, "ss_gemm_lowrank", ss)
    x, args = _gelu_segment(2048, k=128)
    _call(entry, x, args, True, 0.0)
    assert "e4m3_weights" not in emulated and not ss_calls
    assert [c[0] for c in emulated if isinstance(c, tuple) and c[0] != "prologue"] == [PROMOTED_GROUP64_CONFIGS[0]]
    for unsigned, shift in ((False, 0.0), (True, SHIFT)):
        emulated.clear()
        _call(entry, x, args, unsigned, shift)
        assert [c for c in emulated if not (isinstance(c, tuple) and c[0] == "prologue")] == ["e4m3_weights"]
    qweight, wscales, _, smooth, _, _, bias = args[:7]
    assert torch.equal(ss_calls[0], bias)
    want = ops.fp8_bias(qweight, wscales, None, smooth, bias, "int4", "fp8w", SHIFT, dtype=torch.bfloat16)
    assert want is not None and not torch.equal(want, bias) and torch.equal(ss_calls[1], want)
