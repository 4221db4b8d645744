"""Expand packed int4 weights to the ``fast8`` mode's e4m3 weights ``[N, K]`` (one Triton kernel).

An alternative to converting the int4 codes inside the GEMM's mainloop
(:func:`svdq_kernels.cutlass_fast8.group64_gemm`): per call, a memory-bound pre-pass writes the
e4m3 weights ``w8[n, k] = e4m3(fp16(code[n, k] × scales16[k // 64, n]))`` as a dense
float8_e4m3fn tensor, so that a stock FP8 GEMM — torch's rowwise ``torch._scaled_mm`` with
``scale_a = a`` (per token) and ``scale_b = rowinv`` (per output row) — computes the layer
(``benchmarks/fast8_prepass.py`` times the two against each other). The bits equal
:func:`svdq_format.packing.fp8_weight_values` (``codes [N, K]`` with ``scales16.t()``): the product
is an fp16 multiply rounded once (exact for the bf16-born scales of
:func:`~svdq_kernels.cutlass_fast8.fast8_weights`), then rounded once to e4m3, nearest-even,
saturating at ±448.

Two conversions to e4m3, chosen by ``int_convert``:

* the hardware one (``.to(tl.float8e4nv)``: ``cvt.rn.satfinite.e4m3x2.f16x2`` on sm_89+), the
  default on a GPU;
* an integer one on the fp16 bit pattern, the default under Triton's interpreter, whose own
  fp16 → e4m3 cast is not IEEE (Triton 3.9: ties round away from zero, a rounding carry is lost
  — 1.9375 → 1.0 —, no saturation — 1000 → 256 —, subnormals truncate). It also runs on a GPU,
  where the tests check that the two agree bit for bit.

Triton is imported lazily, so importing this module is free on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

from ._device import device_guard

__all__ = ["expand_fp8_weights"]

#: Default tile: rows of the weight × 64-wide K groups per program (``BLOCK_K = 64 · groups``).
#: (16 × 512, 4 warps: within 5 % of the best of six tiles at every FLUX.1 weight shape on an H100.)
BLOCK_N = 16
GROUPS = 8
NUM_WARPS = 4


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def expand_fp8_kernel(
        w_ptr, s_ptr, o_ptr, N, K, stride_sg, stride_sn,
        BN: tl.constexpr, G: tl.constexpr, INT_CVT: tl.constexpr,
    ):
        # one [BN, 64·G] tile of the output, seen as [BN, G, 32] packed bytes (row, K group, byte
        # in the group); a byte's two nibbles are k = 2j (low) and k = 2j + 1 (high)
        pid = tl.program_id(0)
        kgroups = K // 64
        nkb = tl.cdiv(kgroups, G)
        pid_n = pid // nkb
        pid_k = pid % nkb
        rn = pid_n * BN + tl.arange(0, BN)
        rg = pid_k * G + tl.arange(0, G)
        rb = tl.arange(0, 32)
        n_ok = rn < N
        mask = n_ok[:, None, None] & (rg < kgroups)[None, :, None]
        rn64 = rn.to(tl.int64)
        byte = tl.load(w_ptr + rn64[:, None, None] * (K // 2) + rg[None, :, None] * 32 + rb[None, None, :],
                       mask=mask, other=0).to(tl.int32)
        scale = tl.load(s_ptr + rg[None, :, None] * stride_sg + rn[:, None, None] * stride_sn, mask=mask, other=0.0)
        nib = tl.join(byte & 0xF, byte >> 4)  # [BN, G, 32, 2]: k order within the group
        # code = (nib ^ 8) − 8 as fp16 without an int→float conversion: the fp16 with bits
        # 0x6400 | m is 1024 + m (exact); minus 1032
        code = ((nib ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
        prod = code.to(tl.float16) * scale[:, :, :, None]  # fp16 × fp16, one rounding, as the reference
        if INT_CVT:
            hb = prod.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            sign = (hb >> 8) & 0x80
            mag = hb & 0x7FFF
            # e4m3 normals (|v| ≥ 2^-6, fp16 bits ≥ 0x2400): drop 7 mantissa bits nearest-even,
            # rebias the exponent (15 → 7: minus 8 << 3); a rounding carry rolls into the exponent
            normal = ((mag + 0x3F + ((mag >> 7) & 1)) >> 7) - 64
            # e4m3 subnormals: |v| / 2^-9 = mant · 2^-sh rounded to an integer 0..8 (8 is the
            # smallest normal, whose bits are 0x08)
            exp = mag >> 10
            mant = (mag & 0x3FF) | tl.where(exp > 0, 0x400, 0)
            sh = 16 - tl.minimum(tl.maximum(exp, 1), 8)
            q = mant >> sh
            rem = mant & ((1 << sh) - 1)
            tie = 1 << (sh - 1)
            q += ((rem > tie) | ((rem == tie) & ((q & 1) == 1))).to(tl.int32)
            bits = tl.where(mag >= 0x2400, normal, q)
            bits = tl.where(mag >= 0x5F00, 0x7E, bits)  # ≥ 448 (inf included) saturates to 448
            bits = tl.where(mag > 0x7C00, 0x7F, bits)  # NaN
            w8 = (sign | bits).to(tl.uint8)
        else:
            w8 = prod.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        rk = pid_k * (G * 64) + tl.arange(0, G * 64)
        tl.store(o_ptr + rn64[:, None] * K + rk[None, :], tl.reshape(w8, [BN, G * 64]),
                 mask=n_ok[:, None] & (rk < K)[None, :])

    return expand_fp8_kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def expand_fp8_weights(
    qweight: torch.Tensor,
    scales16: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    int_convert: Optional[bool] = None,
    block_n: int = BLOCK_N,
    groups: int = GROUPS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The ``fast8`` e4m3 weights of a layer, ``e4m3(fp16(code × scale16))``, as a dense tensor.

    Bit-identical to ``packing.fp8_weight_values(codes, scales16.t())`` rounded to e4m3, where
    ``codes = nibbles_to_int4(unpack_nibbles(qweight))``: nearest-even, saturating at ±448,
    negative values that round to zero give −0. (NaN — only from a NaN or infinite scale, e.g.
    ``0 × inf`` — is NaN, its sign not guaranteed: the GPU gives 0x7F, the CPU reference 0xFF.)

    Args:
        qweight: Packed int4 codes, uint8 ``[N, K/2]`` contiguous (byte ``j`` of a row holds
            ``k = 2j`` in its low nibble, ``k = 2j + 1`` in its high one).
        scales16: The GEMM's float16 group scales ``[K/64, N]`` (the first output of
            :func:`svdq_kernels.cutlass_fast8.fast8_weights`); any strides.
        out: Optional float8_e4m3fn ``[N, K]`` contiguous buffer to write into (reuse across calls).
        int_convert: Round to e4m3 with integer arithmetic on the fp16 bits instead of the
            hardware conversion. ``None``: only under Triton's interpreter (``TRITON_INTERPRET=1``),
            whose own fp8 cast is not IEEE.
        block_n: Weight rows per program (power of two).
        groups: 64-wide K groups per program (power of two).
        num_warps: Warps per program.

    Returns:
        float8_e4m3fn ``[N, K]`` (``out`` when given); ``torch._scaled_mm(q, w8.t(), ...)`` takes
        its transpose as the column-major second operand.

    Raises:
        TypeError: On a wrong dtype.
        ValueError: On mismatched shapes, devices or layouts.
    """
    if qweight.dtype != torch.uint8:
        raise TypeError(f"qweight must be uint8 packed int4 codes, got {qweight.dtype}")
    if scales16.dtype != torch.float16:
        raise TypeError(f"scales16 must be float16, got {scales16.dtype}")
    if qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous [N, K/2] tensor, got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if k % 64:
        raise ValueError(f"K = {k} is not a multiple of the group size 64")
    if tuple(scales16.shape) != (k // 64, n):
        raise ValueError(f"scales16 must be [K/64, N] = [{k // 64}, {n}], got {tuple(scales16.shape)}")
    if scales16.device != qweight.device:
        raise ValueError(f"scales16 is on {scales16.device}, qweight on {qweight.device}")
    if out is None:
        out = torch.empty(n, k, device=qweight.device, dtype=torch.float8_e4m3fn)
    elif out.dtype != torch.float8_e4m3fn or tuple(out.shape) != (n, k) or not out.is_contiguous() \
            or out.device != qweight.device:
        raise ValueError(f"out must be a contiguous float8_e4m3fn [{n}, {k}] tensor on {qweight.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if n == 0 or k == 0:
        return out
    if int_convert is None:
        int_convert = _interpreting()
    grid = (-(-n // block_n) * -(-(k // 64) // groups),)
    args = (qweight, scales16, out.view(torch.uint8), n, k, scales16.stride(0), scales16.stride(1))
    meta = dict(BN=block_n, G=groups, INT_CVT=bool(int_convert), num_warps=num_warps)
    with device_guard(qweight.device):
        _kernel()[grid](*args, **meta)
    return out

