"""The ``fast8`` GEMM with the producer conversion (``Group64GemmConfig(convert="producer")``,
``csrc/svdq_sm90_gemm_producer_convert.hpp``) on a Hopper GPU.

The producer warpgroup's idle warps write the same e4m3 bytes as the consumer conversion (the
same table built from the same fp16 scale, the same byte permutes), and the consumers issue the
same wgmma sequence — per k-tile four FP8 ``m64nNk32`` (or two bf16 ``k16`` on a low-rank
k-tile) into the same accumulator, in the same order — with A read from shared memory instead
of registers. Operand source does not change a tensor core's arithmetic, so the outputs must be
**bit-identical** to the consumer-conversion kernel of the same tiling, stream-K splits included
(same scheduler, same fixup order). Against the float64 evaluation of the kernel's own inputs
and the ``fast8`` reference layer they get the consumer kernel's bounds
(``tests/test_kernels_lowrank_gpu.py``).
"""

from __future__ import annotations

import dataclasses

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
from svdq_kernels.configs import PRODUCER_CONVERT_CONFIGS  # noqa: E402
from tests import test_kernels_lowrank_gpu as lowrank_gpu  # noqa: E402

#: FLUX.1-dev's K → N at 4608 tokens (single blocks: fused q|k|v+MLP up, proj_out; double blocks:
#: q/k/v/out, MLP up, MLP down) as (N, K).
FLUX_NK = [(3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360), (9216, 3072)]


_inputs = lowrank_gpu._inputs  # the same random layer (outlier channels, FLUX scales)


def _gemm_inputs(m, n, k, r, *, seed):
    """The low-rank GEMM's operands for a random layer: ``(qw, scales, rowinv, q, a', bias, lr, l1)``."""
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, r, bias=True, seed=seed)
    q, a = ops.quantize_fp8_rows(ops.smoothed(x, smooth, 0.0))
    lr, ag = lowrank_tiles.lowrank_tiles(x, down, a.reshape(m).float())
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(qw, ws, lowrank_tiles.lowrank_k_tiles(r))
    return qw, scales, rowinv, q, ag, b, lr, lowrank_tiles.padded_up(up, rowinv)


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _consumer_twin(config):
    return dataclasses.replace(config, convert="consumer")


@pytest.mark.parametrize("config", PRODUCER_CONVERT_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 17, 4608])
def test_producer_conversion_equals_the_consumer_kernel_bit_for_bit(config, m, n, k):
    """Same tiling, same inputs (one low-rank k-tile): the two kernels' outputs are equal."""
    args = _gemm_inputs(m, n, k, 32, seed=m + n + k)
    got = cutlass_fast8.group64_gemm_lowrank(*args, config=config)
    want = cutlass_fast8.group64_gemm_lowrank(*args, config=_consumer_twin(config))
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    diff = (got.float() - want.float()).abs().max().item()
    assert torch.equal(got, want), f"max |diff| {diff:.3e}, rel {_rel(got, want):.3e}"


@pytest.mark.parametrize("config", PRODUCER_CONVERT_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m,r", [(4608, 16), (1000, 48), (300, 256), (64, 32)])
def test_producer_conversion_equals_the_consumer_kernel_for_other_ranks(config, m, r):
    """Two and eight low-rank k-tiles, and token counts that leave partial tiles."""
    args = _gemm_inputs(m, 3072, 3072, r, seed=r)
    got = cutlass_fast8.group64_gemm_lowrank(*args, config=config)
    assert torch.equal(got, cutlass_fast8.group64_gemm_lowrank(*args, config=_consumer_twin(config)))


@pytest.mark.parametrize("config", PRODUCER_CONVERT_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m", [1, 17, 4608])
def test_producer_conversion_against_float64(config, m):
    """``(Σ q · w8 + lr · l1ᵀ) · rowinv · a' + bias`` in float64, rounded to bf16 like the output
    (the consumer kernel's bound: Hopper's FP8 MMAs accumulate with reduced precision)."""
    n, k, r = 3072, 3072, 32
    qw, scales, rowinv, q, ag, b, lr, l1 = _gemm_inputs(m, n, k, r, seed=5)
    out = cutlass_fast8.group64_gemm_lowrank(qw, scales, rowinv, q, ag, b, lr, l1, config=config).double()
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qw))
    w8 = packing.fp8_weight_values(codes, scales[: k // 64].t()).double()
    lr_used = lr.double().view(m, 1, 2, 32)[:, :, 0].reshape(m, 32)
    acc = q.double() @ w8.t() + lr_used @ l1.double().t()
    ref = (acc * rowinv.double() * ag.double().unsqueeze(1) + b.double()).to(torch.bfloat16)
    assert _rel(out, ref) < 5e-3


@pytest.fixture()
def producer_convert(monkeypatch):
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", True)
    monkeypatch.setattr(cutlass_fast8, "CONVERT", "producer")


@pytest.mark.parametrize("n,k", FLUX_NK[:3], ids=lambda v: str(v))
@pytest.mark.parametrize("m", [4608])  # (the references run on one CPU thread: tests/conftest.py)
def test_fast8_layer_with_the_producer_conversion_matches_the_reference(producer_convert, m, n, k):
    """The whole layer (prologue, low-rank k-tiles, bias) with ``CONVERT = "producer"``: within the
    fast8 layer's bound of ``reference_linear`` (fp8w), and the fast8_linear_fp8 entry (what a
    compiled graph calls) within the same bound of ``reference_linear_fp8``."""
    x, qw, ws, smooth, down, up, b = _inputs(m, n, k, 32, bias=True)
    args = (x, qw, ws, None, smooth, down, up, b, None, "int4", "fp8w")
    assert cutlass_fast8.group64_config(m, n=n, lowrank=True, convert="producer") in PRODUCER_CONVERT_CONFIGS
    out = cutlass_fast8.fast8_linear(*args)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    assert _rel(out.cpu(), ops.reference_linear(*cpu)) < 5e-3
    q, a = ops.quantize_fp8_rows(ops.smoothed(x, smooth, 0.0))
    got = cutlass_fast8.fast8_linear_fp8(x, q, a, *args[1:])
    ref = ops.reference_linear_fp8(cpu[0], q.cpu(), a.cpu(), *cpu[1:])
    assert _rel(got.cpu(), ref) < 5e-3


def test_producer_conversion_zero_and_nan_rows(producer_convert):
    """A row of zeros gives the bias; a NaN row stays NaN and no other row moves (at M = 4608)."""
    lowrank_gpu.assert_zero_and_nan_rows(4608)
