"""The pre-converted ``fast8`` GEMM (``SsLowrankGemmConfig``, ``csrc/svdq_sm90_ss_lowrank.hpp``;
``SVDQ_FAST8_WEIGHTS=e4m3``) on a Hopper GPU.

The kernel multiplies the e4m3 weights that :func:`svdq_kernels.weights_e4m3.e4m3_weights` wrote
(the bytes the ``lowrank`` group-64 kernel's consumer warps compute in registers: the same
``e4m3(fp16(code × scale16))``) and issues the same wgmma sequence — per k-tile four FP8
``m64nNk32`` (two bf16 ``k16`` on a low-rank k-tile, over the same ``lr``/``L1`` values) into the same
fp32 accumulator in the same order, with the same scheduler, stream-K splits and epilogue. The
operand source does not change a tensor core's arithmetic (``tests/test_kernels_producer_gpu.py``
found SS and RS FP8 wgmmas bit-identical), so the outputs must be **bit-identical** to the
consumer kernel of the same tiling. Against the float64 evaluation of its inputs and the ``fast8``
reference layer it gets the consumer kernel's bounds (``tests/test_kernels_lowrank_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch

from svdq_format import ops, packing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                       reason="needs an sm_90 GPU"),
]

import svdq_kernels  # noqa: E402,F401  (registers cutlass-sm90)
from svdq_kernels import cutlass_fast8, lowrank_tiles  # noqa: E402
from svdq_kernels.configs import (  # noqa: E402
    AUTO_GROUP64_LR_CONFIGS,
    SS_LOWRANK_CANDIDATES,
    SS_LOWRANK_CONFIGS,
    group64_config,
    ss_lowrank_config,
)
from svdq_kernels.weights_e4m3 import e4m3_weights  # noqa: E402
from tests import test_kernels_lowrank_gpu as lowrank_gpu  # noqa: E402

#: FLUX.1-dev's layers as (N, K): q/k/v/out, fused q|k|v, MLP up, MLP down, single-block MLP up, proj_out.
FLUX_NK = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (15360, 3072), (3072, 15360)]

_inputs = lowrank_gpu._inputs  # the same random layer (outlier channels, FLUX scales)


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _both_inputs(m, n, k, r, *, bias, seed):
    """One layer's operands for both kernels: ``(int4 args, e4m3 args)``."""
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, r, bias=bias, seed=seed)
    q, a = ops.quantize_fp8_rows(ops.smoothed(x, smooth, 0.0))
    lr, ag = lowrank_tiles.lowrank_tiles(x, down, a.reshape(m).float())
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(qw, ws, lowrank_tiles.lowrank_k_tiles(r))
    scales16, rowinv16 = cutlass_fast8.fast8_weights(qw, ws)
    assert torch.equal(rowinv, rowinv16)
    w8 = e4m3_weights(qw, scales16)
    int4 = (qw, scales, rowinv, q, ag, b, lr, lowrank_tiles.padded_up(up, rowinv))
    e4m3 = (w8, rowinv, q, ag, b, lr, lowrank_tiles.padded_up64(up, rowinv))
    return int4, e4m3


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r", [32, 64])
@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [2048, 4608])
def test_ss_kernel_equals_the_consumer_kernel_bit_for_bit(m, n, k, r, bias):
    """The automatic tiling (128 × 256 or its stream-K twin) on both sides, one and two low-rank
    k-tiles: the pre-converted kernel's output is the consumer kernel's, bit for bit."""
    int4, e4m3 = _both_inputs(m, n, k, r, bias=bias, seed=m + n + k + r)
    config = ss_lowrank_config(m, n=n, sms=cutlass_fast8._sm_count(None))
    twin = group64_config(m, n=n, sms=cutlass_fast8._sm_count(None), lowrank=True)
    assert config is not None and config.tiling() == (twin.tile_m, twin.tile_n, twin.tile_k, twin.schedule,
                                                      twin.scheduler)
    got = cutlass_fast8.ss_gemm_lowrank(*e4m3, config=config)
    want = cutlass_fast8.group64_gemm_lowrank(*int4, config=twin)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    diff = (got.float() - want.float()).abs().max().item()
    assert torch.equal(got, want), f"max |diff| {diff:.3e}, rel {_rel(got, want):.3e}"


@pytest.mark.parametrize("config", SS_LOWRANK_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m,r", [(4608, 16), (1000, 48), (300, 256), (17, 32)])
def test_every_ss_tiling_against_float64(config, m, r):
    """Each pre-converted kernel, forced, also where it is not chosen (partial tiles, eight low-rank
    k-tiles, a k-tile shared by two work units of stream-K): ``(Σ q · w8 + lr · l1ᵀ) · rowinv · a' +
    bias`` in float64, rounded to bf16 like the output (the consumer kernel's bound: Hopper's FP8
    MMAs accumulate with reduced precision), and the consumer twin's bits."""
    n, k = 3072, 3072
    int4, (w8, rowinv, q, ag, b, lr, l1) = _both_inputs(m, n, k, r, bias=True, seed=5 + r)
    out = cutlass_fast8.ss_gemm_lowrank(w8, rowinv, q, ag, b, lr, l1, config=config)
    acc = q.double() @ w8.double().t() + lr.double() @ l1.double().t()
    ref = (acc * rowinv.double() * ag.double().unsqueeze(1) + b.double()).to(torch.bfloat16)
    assert _rel(out.double(), ref) < 5e-3
    twin = next(c for c in AUTO_GROUP64_LR_CONFIGS
                if (c.tile_m, c.tile_n, c.tile_k, c.schedule, c.scheduler) == config.tiling())
    assert torch.equal(out, cutlass_fast8.group64_gemm_lowrank(*int4, config=twin))


def _cached(config) -> bool:
    from svdq_kernels import build

    return (build.cache_dir() / f"{config.name}-{build.cache_key(config, build.detect_toolchain())}.so").is_file()


@pytest.mark.parametrize("config", SS_LOWRANK_CANDIDATES, ids=lambda c: c.name)
@pytest.mark.parametrize("m,n,r", [(4608, 3072, 32), (1000, 3200, 48)])
def test_ss_candidate_tilings_against_float64_and_today_s_bits(config, m, n, r):
    """A candidate tiling (2 × 1 / 1 × 2 clusters multicasting the operands and the low-rank k-tiles,
    256 × 128, pingpong; not prebuilt: run where ``gpu_session.sh ssc`` unpacked them), also with 25
    weight tiles (a cluster half out of the matrix) and partial token tiles: within the float64 bound,
    and — one accumulation per output tile in the same k-tile order — today's persistent 128 × 256
    kernel's bits unless stream-K splits the k-tiles."""
    if not _cached(config):
        pytest.skip(f"{config.name} is not in the kernel cache (svdq kernels build --config {config.name})")
    k = 3072
    _, (w8, rowinv, q, ag, b, lr, l1) = _both_inputs(m, n, k, r, bias=True, seed=7 + r)
    out = cutlass_fast8.ss_gemm_lowrank(w8, rowinv, q, ag, b, lr, l1, config=config)
    acc = q.double() @ w8.double().t() + lr.double() @ l1.double().t()
    ref = (acc * rowinv.double() * ag.double().unsqueeze(1) + b.double()).to(torch.bfloat16)
    assert _rel(out.double(), ref) < 5e-3
    if config.scheduler == "persistent":
        want = cutlass_fast8.ss_gemm_lowrank(w8, rowinv, q, ag, b, lr, l1, config=SS_LOWRANK_CONFIGS[0])
        assert torch.equal(out, want), f"max |diff| {(out.float() - want.float()).abs().max().item():.3e}"


def test_e4m3_weights_are_the_consumer_conversions_bytes():
    """The pre-pass writes ``packing.fp8_weight_values`` of the layer's own scales."""
    x, qw, ws, smooth, down, up, b = _inputs(16, 3072, 3072, 32, bias=True, seed=2)
    scales16, _ = cutlass_fast8.fast8_weights(qw, ws)
    w8 = e4m3_weights(qw, scales16)
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qw))
    assert torch.equal(w8.float(), packing.fp8_weight_values(codes, scales16.t()).float())


@pytest.fixture()
def e4m3_weights_on(monkeypatch):
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", True)
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "e4m3")


@pytest.mark.parametrize("n,k", FLUX_NK[:3], ids=lambda v: str(v))
@pytest.mark.parametrize("m", [2048, 4608])  # (the references run on one CPU thread: tests/conftest.py)
def test_fast8_layer_with_e4m3_weights_matches_the_reference(e4m3_weights_on, m, n, k):
    """The whole layer (fused prologue, pre-pass, pre-converted GEMM) with ``WEIGHTS = "e4m3"``: within
    the fast8 layer's bound of ``reference_linear`` (fp8w), bit-equal to the int4 default, and the
    fast8_linear_fp8 entry (what a compiled graph calls) within the same bound of ``reference_linear_fp8``."""
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, 32, bias=True)
    args = (x, qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    out = cutlass_fast8.fast8_linear(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert _rel(out.cpu(), ops.reference_linear(*cpu)) < 5e-3
    cutlass_fast8.WEIGHTS = "int4"  # (restored by the fixture's monkeypatch)
    assert torch.equal(out, cutlass_fast8.fast8_linear(*args))
    cutlass_fast8.WEIGHTS = "e4m3"
    q, a = ops.quantize_fp8_rows(ops.smoothed(x, smooth, 0.0))
    got = cutlass_fast8.fast8_linear_fp8(x, q, a, *args[1:])
    ref = ops.reference_linear_fp8(cpu[0], q.cpu(), a.cpu(), *cpu[1:])
    assert _rel(got.cpu(), ref) < 5e-3


def test_e4m3_weights_zero_and_nan_rows(e4m3_weights_on):
    """A row of zeros gives the bias; a NaN row stays NaN and no other row moves (at M = 4608)."""
    lowrank_gpu.assert_zero_and_nan_rows(4608)


@pytest.mark.parametrize("weights", ["e4m3", "int4"])
@pytest.mark.parametrize("m", [64, 4608])
def test_rank0_layer_on_the_lowrank_kernels(e4m3_weights_on, weights, m):
    """A rank-0 layer (no low-rank branch) runs the low-rank kernels with one k-tile of zeros: the same
    bits as a zero-valued rank-32 branch, within the fast8 bound of the reference, bias included."""
    cutlass_fast8.WEIGHTS = weights  # (restored by the fixture's monkeypatch)
    x, qw, ws, smooth, down, up, b = _inputs(m, 3072, 3072, 32, bias=True)
    out = cutlass_fast8.fast8_linear(x, qw, ws, None, smooth, None, None, b, None, "int4", "fp8w")
    zero = cutlass_fast8.fast8_linear(x, qw, ws, None, smooth, torch.zeros_like(down), torch.zeros_like(up), b,
                                      None, "int4", "fp8w")
    assert torch.equal(out, zero)
    ref = ops.reference_linear(x.cpu(), qw.cpu(), ws.cpu(), None, smooth.cpu(), None, None, b.cpu(), None,
                               "int4", "fp8w")
    assert _rel(out.cpu(), ref) < 5e-3
