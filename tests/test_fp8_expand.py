"""``svdq_kernels.fp8_expand``: packed int4 → the ``fast8`` e4m3 weights, bit for bit.

The reference is :func:`svdq_format.packing.fp8_weight_values` (``e4m3(fp16(code × scale16))``,
nearest-even, saturating) on the CPU, compared as raw bytes. Scales are bf16-born as in a
layer (:func:`svdq_kernels.cutlass_fast8.fast8_weights`), and also spread over fp16's whole
range so products saturate (> 448, fp16 overflow included) and land in e4m3's subnormals (and
fp16's); one check runs every finite fp16 scale against every code.

On a machine without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, the
pattern of ``tests/test_kernels_interpreter.py``), where only the integer e4m3 conversion is
exact — the interpreter's own fp8 cast is not IEEE — and a child process checks that both
conversions compile for sm_90. On a GPU the interpreter checks skip and the ``gpu`` tests run
both conversions at FLUX.1 sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdq_format import packing

# Triton decides at import whether its own library functions (tl.cdiv, ...) are interpreted:
# the switch must be on before the first import, and only where no GPU will use Triton.
_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # an error, not a skip: CI would lose these checks
    raise RuntimeError("triton was imported in this test process before the interpreter could be switched on: "
                       "a test module collected earlier imports triton at import time")

from svdq_kernels.cutlass_fast8 import fast8_weights  # noqa: E402
from svdq_kernels.fp8_expand import expand_fp8_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

interpreter = pytest.mark.skipif(_CUDA, reason="interpreter checks are for machines without a GPU")
# numpy's fp16 multiply warns where a product overflows to inf, which the tests want
overflows = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
needs_fp8_gpu = pytest.mark.skipif(not (_CUDA and torch.cuda.get_device_capability() >= (8, 9)),
                                   reason="needs a GPU with FP8 conversions (sm_89+)")


def _reference_bits(qweight: torch.Tensor, scales16: torch.Tensor) -> torch.Tensor:
    """``fp8_weight_values`` (codes ``[N, K]``, scales ``[N, K/64]``) as e4m3 bytes, on the CPU."""
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight.cpu()))
    ref = packing.fp8_weight_values(codes, scales16.cpu().t())
    return packing.round_to_e4m3(ref).view(torch.uint8)


def _layer_scales(qweight: torch.Tensor, seed: int) -> torch.Tensor:
    """The GEMM's scales16 ``[K/64, N]`` of random bf16 group scales, as a layer gets them."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    g = torch.Generator().manual_seed(seed)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.004 + 0.001).to(torch.bfloat16)
    return fast8_weights(qweight.cpu(), wscales)[0].to(qweight.device)


def _wide_scales(n: int, k: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """bf16-born fp16 scales ``[K/64, N]`` with magnitudes about 2^-26..2^15 and both signs:
    products saturate (above 448, up to fp16 overflow) and fall into e4m3's and fp16's
    subnormals. All finite: an infinite scale makes ``0 × inf`` a NaN, whose sign differs between
    the CPU reference (negative) and the GPU (positive)."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randn(k // 64, n, generator=g).to(torch.bfloat16).float()
    exp = torch.randint(-26, 14, (k // 64, n), generator=g).float()
    scales = mant * torch.exp2(exp)
    scales[0, 0], scales[-1, 0], scales[0, -1] = 30000.0, 1.5 * 2**-11, -200.0  # at least one of each
    return scales.to(torch.float16).to(device)


def _codes(n: int, k: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device)


def _all_scales_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite fp16 scale (both signs) against every code: one 64-group per scale, its codes
    −8..7 four times over. ``(qweight [N, 64], scales16 [2, N])`` (two groups per row)."""
    bits = torch.cat([torch.arange(0, 0x7C00), torch.arange(0x8000, 0xFC00)]).to(torch.int16)
    scales = bits.view(torch.float16)
    n = scales.numel() // 2
    nib = torch.arange(16, dtype=torch.uint8).repeat(8)  # 128 = two groups of 64
    qweight = packing.pack_nibbles(nib.expand(n, 128).contiguous())
    return qweight, scales.reshape(2, n).contiguous()


@interpreter
@overflows
@pytest.mark.parametrize("n, k", [(32, 128), (40, 384), (96, 256), (7, 640), (64, 1152)])
@pytest.mark.parametrize("kind", ["layer", "wide"])
def test_expand_equals_the_reference_in_the_interpreter(n, k, kind) -> None:
    """Random codes, layer-like and saturating/subnormal scales, tiles cut at N and K."""
    seed = n * 7919 + k
    qweight = _codes(n, k, seed)
    scales16 = _layer_scales(qweight, seed) if kind == "layer" else _wide_scales(n, k, seed)
    out = expand_fp8_weights(qweight, scales16)
    assert out.dtype == torch.float8_e4m3fn and out.shape == (n, k)
    ref = _reference_bits(qweight, scales16)
    assert torch.equal(out.view(torch.uint8), ref)
    if kind == "wide":  # the inputs do reach the edge cases: fp16 overflow, saturation, subnormals
        codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight)).half().reshape(n, k // 64, 64)
        assert torch.isinf(codes * scales16.t().unsqueeze(-1)).any()
        ref_vals = ref.view(torch.float8_e4m3fn).float().abs()
        assert (ref_vals == 448).any() and ((ref_vals > 0) & (ref_vals < 2**-6)).any()


@interpreter
@overflows
def test_every_fp16_scale_and_code_in_the_interpreter() -> None:
    """All 63 488 finite fp16 scales × all 16 codes: every rounding tie, carry and saturation case."""
    qweight, scales16 = _all_scales_layer()
    out = expand_fp8_weights(qweight, scales16, block_n=64, groups=2)
    assert torch.equal(out.view(torch.uint8), _reference_bits(qweight, scales16))


@interpreter
@overflows
def test_out_buffer_strides_and_tiles_in_the_interpreter() -> None:
    """``out`` is written in place and returned; scales16 as a transposed ``[N, K/64]`` view; other tiles."""
    n, k = 48, 512
    qweight = _codes(n, k, 3)
    scales16 = _wide_scales(n, k, 3)
    ref = _reference_bits(qweight, scales16)
    buf = torch.full((n, k), float("nan")).to(torch.float8_e4m3fn)
    got = expand_fp8_weights(qweight, scales16.t().contiguous().t(), out=buf, block_n=16, groups=8, num_warps=2)
    assert got is buf and torch.equal(buf.view(torch.uint8), ref)


def test_bad_inputs_are_refused() -> None:
    qweight = torch.zeros(8, 64, dtype=torch.uint8)
    scales16 = torch.zeros(2, 8, dtype=torch.float16)
    with pytest.raises(TypeError):
        expand_fp8_weights(qweight.to(torch.int8), scales16)
    with pytest.raises(TypeError):
        expand_fp8_weights(qweight, scales16.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[K/64, N\]"):
        expand_fp8_weights(qweight, scales16.t())
    with pytest.raises(ValueError, match="multiple of the group size"):
        expand_fp8_weights(torch.zeros(8, 48, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        expand_fp8_weights(qweight, scales16, out=torch.empty(8, 128, dtype=torch.uint8))


_CHILD = r'''
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from svdq_kernels import fp8_expand

sig = dict(w_ptr="*u8", s_ptr="*fp16", o_ptr="*u8", N="i32", K="i32", stride_sg="i32", stride_sn="i32",
           BN="constexpr", G="constexpr", INT_CVT="constexpr")
attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}  # as the JIT specializes aligned pointers, N, K
for int_cvt in (False, True):
    k = triton.compile(ASTSource(fn=fp8_expand._kernel(), signature=sig, attrs=attrs,
                                 constexprs=dict(BN=fp8_expand.BLOCK_N, G=fp8_expand.GROUPS, INT_CVT=int_cvt)),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": fp8_expand.NUM_WARPS})
    ptx = k.asm["ptx"]
    print(int_cvt, "cvt.rn.satfinite.e4m3x2.f16x2" in ptx, "st.global.v4.b32" in ptx)
'''


def test_both_conversions_compile_for_sm90() -> None:
    """Without a GPU: both variants lower to sm_90; the hardware one is the saturating RNE
    ``cvt.rn.satfinite.e4m3x2.f16x2`` and the stores are 16-byte vectors (in a child process: this
    one's Triton may be in interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
    proc = subprocess.run([sys.executable, "-c", _CHILD], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0, out
    assert proc.stdout.split("\n")[:2] == ["False True True", "True False True"], out


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("n, k", [(3072, 3072), (12288, 3072), (3072, 12288)])
@pytest.mark.parametrize("int_convert", [False, True])
@pytest.mark.parametrize("kind", ["layer", "wide"])
def test_expand_equals_the_reference_on_the_gpu(n, k, int_convert, kind) -> None:
    """FLUX.1 sizes on the GPU, the hardware e4m3 conversion and the integer one."""
    qweight = _codes(n, k, n + k, device="cuda")
    scales16 = _layer_scales(qweight, n) if kind == "layer" else _wide_scales(n, k, n, device="cuda")
    out = expand_fp8_weights(qweight, scales16, int_convert=int_convert)
    assert torch.equal(out.view(torch.uint8).cpu(), _reference_bits(qweight, scales16))


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("int_convert", [False, True])
def test_every_fp16_scale_and_code_on_the_gpu(int_convert) -> None:
    """The exhaustive check of the interpreter test, both conversions on the hardware."""
    qweight, scales16 = _all_scales_layer()
    out = expand_fp8_weights(qweight.cuda(), scales16.cuda(), int_convert=int_convert)
    assert torch.equal(out.view(torch.uint8).cpu(), _reference_bits(qweight, scales16))
