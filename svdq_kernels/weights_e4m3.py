"""The ``fast8`` weights as a plain e4m3 matrix, made per call (issue 23, lever 5).

The ``fast8`` GEMM multiplies ``w8 = e4m3(fp16(code × scales16))`` (docs/format.md §6;
:func:`svdq_format.packing.fp8_weight_values`): an exact elementwise function of the packed int4
codes and the fp16 group scales (times the row's power of two, :func:`svdq_kernels.cutlass_fast8.
fast8_weights`). Our CUTLASS mainloop computes it in the MMA warps for every tile, and that
conversion is what keeps it at 0.70–0.79× a dense FP8 GEMM (docs/kernels.md). :func:`e4m3_weights`
computes it instead in one memory-bound pass per layer call — ``N·K/2`` bytes of codes and
``N·K/32`` of scales read, ``N·K`` written — so a dense shared-memory-sourced FP8 GEMM can run on
it. The e4m3 matrix lives only for the call: the model stays 4-bit in memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["e4m3_weights"]

#: Rows and columns per program: 64 rows × 256 codes (four groups of 64).
_BLOCK_N = 64
_BLOCK_K = 256


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_weights_kernel(codes_ptr, scales_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
        # codes: [N, K/2] bytes, byte j = nibble 2j | nibble 2j+1 << 4 (two's-complement int4);
        # scales: [K/64, N] fp16; out: [N, K] e4m3 bytes
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
        rb = tl.arange(0, 32)
        for g in tl.static_range(BK // 64):
            k0 = tl.program_id(1) * BK + g * 64
            byte = tl.load(codes_ptr + rn64[:, None] * (K // 2) + (k0 // 2 + rb)[None, :], mask=n_ok[:, None])
            s = tl.load(scales_ptr + (k0 // 64) * N + rn64, mask=n_ok)[:, None]
            lo = ((byte & 15).to(tl.int32) ^ 8) - 8
            hi = ((byte >> 4).to(tl.int32) ^ 8) - 8
            # fp16 product (exact int4 × fp16, rounded once), then e4m3 nearest-even, saturating
            wlo = tl.clamp((lo.to(tl.float16) * s).to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
            whi = tl.clamp((hi.to(tl.float16) * s).to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
            w = tl.join(wlo.to(tl.uint8, bitcast=True), whi.to(tl.uint8, bitcast=True)).reshape(BN, 64)
            rk = tl.arange(0, 64)
            tl.store(out_ptr + rn64[:, None] * K + (k0 + rk)[None, :], w, mask=n_ok[:, None])

    return e4m3_weights_kernel


def e4m3_weights(qweight: torch.Tensor, scales16: torch.Tensor) -> torch.Tensor:
    """``w8 = e4m3(fp16(code × scales16))`` as a float8_e4m3fn ``[N, K]`` tensor (one Triton kernel).

    Args:
        qweight: Packed int4 codes ``[N, K/2]`` uint8, as stored (docs/format.md §3).
        scales16: The ``fast8`` group scales ``[K/64, N]`` float16
            (:func:`svdq_kernels.cutlass_fast8.fast8_weights`), contiguous.

    Returns:
        The e4m3 weights, equal bit for bit to :func:`svdq_format.packing.fp8_weight_values`.

    Raises:
        ValueError: On a dtype or shape that does not fit the packing.
    """
    if qweight.dtype != torch.uint8 or scales16.dtype != torch.float16:
        raise ValueError(f"e4m3_weights wants uint8 codes and float16 scales, got {qweight.dtype} and {scales16.dtype}")
    n, half_k = qweight.shape
    k = 2 * half_k
    if k % _BLOCK_K or tuple(scales16.shape) != (k // 64, n):
        raise ValueError(f"e4m3_weights: codes {tuple(qweight.shape)} and scales {tuple(scales16.shape)} do not "
                         f"make [N, K] weights with K a multiple of {_BLOCK_K} and [K/64, N] scales")
    out = torch.empty(n, k, device=qweight.device, dtype=torch.float8_e4m3fn)
    grid = (-(-n // _BLOCK_N), k // _BLOCK_K)
    _kernel()[grid](qweight.contiguous(), scales16.contiguous(), out.view(torch.uint8), n, k,
                    BN=_BLOCK_N, BK=_BLOCK_K, num_warps=4)
    return out
