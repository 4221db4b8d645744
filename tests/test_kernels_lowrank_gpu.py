"""The ``fast8`` layer with its low-rank up projection inside the GEMM (``Group64GemmConfig.lowrank``,
:mod:`svdq_kernels.lowrank_tiles`) on a Hopper GPU.

The kernel adds ``lr · l1ᵀ`` (bf16 MMAs, fp32 accumulation) to the FP8 k-tiles' accumulator, so
against the float64 evaluation of its own inputs it carries only the FP8 MMAs' accumulation error
(as the plain kernel); against the ``fast8`` reference layer it adds the bf16 rounding of
``lr / a'`` and ``L1 / rowinv`` (the plain path rounds ``c = bias + lr · L1ᵀ`` to bf16 instead).
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
from svdq_kernels.configs import AUTO_GROUP64_LR_CONFIGS  # noqa: E402

FLUX_NK = [(3072, 3072), (12288, 3072), (3072, 12288)]


def _inputs(m, n, k, r, *, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g, device=dev) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g, device=dev) * 1.5 + 0.25).to(torch.bfloat16)
    down = (torch.randn(r, k, generator=g, device=dev) / k**0.5).to(torch.bfloat16) if r else None
    up = (torch.randn(n, r, generator=g, device=dev) * 0.5).to(torch.bfloat16) if r else None
    b = (torch.randn(n, generator=g, device=dev) * 0.1).to(torch.bfloat16) if bias else None
    x = torch.randn(m, k, generator=g, device=dev)
    x[:, :: max(1, k // 16)] *= 20.0  # outlier channels
    return x.to(torch.bfloat16), qweight, wscales, smooth, down, up, b


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _reference(*args):
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return ops.reference_linear(*cpu).float()


@pytest.fixture()
def lowrank_in_gemm(monkeypatch):
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", True)


@pytest.mark.parametrize("config", AUTO_GROUP64_LR_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m,r", [(1000, 32), (16, 48), (1, 32), (4608, 16)])
def test_lowrank_gemm_against_float64(config, m, r):
    """The GEMM alone, every automatic tiling: ``(Σ q · w8 + lr · l1ᵀ) · rowinv · a' + bias`` in
    float64, rounded to bf16 like the output; one and two low-rank k-tiles."""
    n, k = 3072, 3072
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, r, bias=True, seed=5)
    q, a = ops.fp8_activations(x, smooth)
    a = a.reshape(m).float()
    lr, ag = lowrank_tiles.lowrank_tiles(x, down, a)
    t = lowrank_tiles.lowrank_k_tiles(r)
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(qw, ws, t)
    l1 = lowrank_tiles.padded_up(up, rowinv)
    out = cutlass_fast8.group64_gemm_lowrank(qw, scales, rowinv, q, ag, b, lr, l1, config=config).double()
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qw))
    w8 = packing.fp8_weight_values(codes, scales[: k // 64].t()).double()
    lr_used = lr.double().view(m, t, 2, 32)[:, :, 0].reshape(m, 32 * t)
    acc = q.double() @ w8.t() + lr_used @ l1.double().t()
    ref = (acc * rowinv.double() * ag.double().unsqueeze(1) + b.double()).to(torch.bfloat16)
    assert _rel(out, ref) < 5e-3


@pytest.mark.parametrize("n,k", FLUX_NK)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 64, 255, 256, 4096, 4608])
def test_fast8_layer_with_lowrank_k_tiles_matches_the_reference(lowrank_in_gemm, m, n, k):
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, 32, bias=True)
    args = (x, qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    out = cutlass_fast8.fast8_linear(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert _rel(out.cpu(), _reference(*args)) < 5e-3


@pytest.mark.parametrize("r,bias,strengths", [(16, False, False), (32, True, True), (48, True, False),
                                               (256, True, True)])
def test_lowrank_k_tiles_ranks_bias_and_lora_strengths(lowrank_in_gemm, r, bias, strengths):
    x, qw, ws, smooth, down, up, b = _inputs(300, 3072, 3072, r, bias=bias, seed=3)
    ls = torch.linspace(0.0, 2.0, r, device="cuda") if strengths else None
    args = (x, qw, ws, None, smooth, down, up, b, ls, "int4", "fp8w")
    assert _rel(cutlass_fast8.fast8_linear(*args).cpu(), _reference(*args)) < 5e-3


def test_lowrank_k_tiles_zero_and_nan_rows(lowrank_in_gemm):
    """A row of zeros (token scale 0) gives the bias; a NaN row stays NaN and no other row moves."""
    assert_zero_and_nan_rows(64)


def assert_zero_and_nan_rows(m: int) -> None:
    """The fast8 layer at ``m`` tokens (FLUX 3072 × 3072, rank 32, bias): row 5 zero gives exactly
    the bias, a NaN in row 7 makes that row NaN and leaves every other row's bits unchanged.
    (Also test_kernels_producer_gpu's check of the producer conversion.)"""
    x, qw, ws, smooth, down, up, b = _inputs(m, 3072, 3072, 32, bias=True, seed=9)
    x[5] = 0
    args = (x, qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    clean = cutlass_fast8.fast8_linear(*args)
    assert torch.equal(clean[5], b)
    x2 = x.clone()
    x2[7, 100] = float("nan")
    dirty = cutlass_fast8.fast8_linear(x2, *args[1:])
    assert torch.isnan(dirty[7]).all()
    rows = [i for i in range(m) if i != 7]
    assert torch.equal(dirty[rows], clean[rows])


def test_lowrank_k_tiles_agree_with_the_two_step_branch():
    """Same layer, both ways (low-rank GEMM + bf16 source tensor, and the k-tiles): within the
    bf16 rounding that each puts in a different place."""
    x, qw, ws, smooth, down, up, b = _inputs(4608, 3072, 12288, 32, bias=True, seed=13)
    args = (x, qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    default = cutlass_fast8.LOWRANK_IN_GEMM
    try:
        cutlass_fast8.LOWRANK_IN_GEMM = False
        two_step = cutlass_fast8.fast8_linear(*args)
        cutlass_fast8.LOWRANK_IN_GEMM = True
        fused = cutlass_fast8.fast8_linear(*args)
    finally:
        cutlass_fast8.LOWRANK_IN_GEMM = default
    assert not torch.equal(fused, two_step)  # two different kernels ran
    assert _rel(fused, two_step) < 3e-3


def test_compiled_path_with_lowrank_k_tiles(lowrank_in_gemm):
    """``svdquant::linear_fp8`` (activations quantized by Inductor) runs the k-tiles too and
    equals the eager layer within the quantizers' rounding difference."""
    x, qw, ws, smooth, down, up, b = _inputs(512, 3072, 3072, 32, bias=True, seed=17)
    q, a = ops.fp8_activations(x, smooth)
    args = (qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    got = cutlass_fast8.fast8_linear_fp8(x, q, a, *args)
    want = cutlass_fast8.fast8_linear(x, *args)
    assert _rel(got, want) < 1e-3
