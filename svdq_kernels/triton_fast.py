"""The ``fast`` mode on Hopper: Triton kernels.

1. **Prologue** (two short kernels over ``x``, K split into up to 16 parts so even a few tokens
   fill the GPU): the first computes, per split, the row absmax of the smoothed input
   ``x̂ = (x + shift) / s`` and the partial low-rank down projection ``x · L2ᵀ`` (fp32, tensor
   cores, on the raw input); the second takes the token scale ``a = absmax / 448`` from all
   splits, writes the float8_e4m3 codes ``q = rne(x̂ / a)`` of its split and (split 0) the
   token scales and the low-rank sum in split order (deterministic).
2. **GEMM** — ``q`` (e4m3) × int4 weights held packed in memory (canonical layout, no
   shuffle), nibbles converted to e4m3/fp16 codes in the mainloop (exact: −8..7 are e4m3
   values), one 64-wide K group per MMA step with promotion to fp32 and the group's weight
   scale applied once per group (the format's group 64 — exact, no rounding of
   ``scale × code``). The epilogue applies the token scale ``a``, adds ``lr · L1ᵀ`` (lr split
   into three 16-bit parts: ~fp32 accurate) and the bias, and writes the 16-bit output once.
   Datapaths: ``f16``/``fp8`` (token × weight tiles) and ``f16t``/``fp8t`` (transposed: the
   converted weights are the MMA's register operand, tokens its N dimension — about twice as
   fast, and narrow token tiles for small M); ``f16*`` multiply exactly, ``fp8*`` accumulate
   inside a group with Hopper's reduced-precision FP8 MMA (~4e-4 relative).

The result equals :func:`svdq_format.ops.reference_linear` with ``act="fp8"`` up to fp32
summation order. Triton is imported lazily, so importing this module is free on CPU.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional

import torch

from ._device import device_guard
from .tensor_cache import TensorCache

__all__ = ["fast_linear", "exact_linear", "w4a16_linear", "nvfp4_linear", "prologue", "prologue_exact",
           "prologue_nvfp4", "gemm", "gemm_exact", "gemm_nvfp4",
           "triton_available", "experimental_kernels", "DATAPATHS", "PERMUTED_DATAPATHS", "fast_datapath"]

#: GEMM datapaths (see :func:`gemm`); ``*t``: the transposed kernel (weights as the MMA's
#: register operand, tokens as its N dimension); ``f16s``: the transposed kernel with the group
#: scales folded exactly into fp16 weights, one accumulation chain over K (bf16 scales only);
#: ``fp8s``: see :data:`BENCHMARK_ONLY_DATAPATHS`.
DATAPATHS = ("f16", "fp8", "f16t", "fp8t", "f16s", "fp8s", "f16h", "fp8h")
#: ``f16h``/``fp8h``: ``f16t``/``fp8t`` reading activations the prologue wrote permuted within
#: each 64-group (``prologue(perm=True)``: even k, then odd k), so the low and high nibbles of a
#: weight byte meet contiguous halves — two MMAs of K = 32, no interleave of the unpacked codes.
#: Written after the last GPU run and checked in Triton's interpreter only (not yet timed).
PERMUTED_DATAPATHS = ("f16h", "fp8h")
#: Datapaths that are not the fast mode's math, for speed comparisons only: ``fp8s`` is ``f16s``
#: with the weights ``code × scale × 2^e`` rounded to e4m3 (what stock CUTLASS's int4 × FP8 lookup
#: table does), an FP8 MMA chain over all of K.
BENCHMARK_ONLY_DATAPATHS = ("fp8s",)
#: Datapath of :func:`fast_linear`: ``"auto"`` (:func:`fast_datapath`) unless
#: ``SVDQ_FAST_DATAPATH`` names one.
DEFAULT_DATAPATH = os.environ.get("SVDQ_FAST_DATAPATH", "auto")
#: From this many tokens on, ``"auto"`` takes ``fp8t``: 10–21 % faster than ``f16t`` at M = 4608
#: on an H100 (two runs, benchmarks/results/gemm_datapaths_h100_run{2,3}.json), 3.6e-4 relative
#: from the exact products; below it the two trade places shape by shape, and ``f16t`` is exact.
FP8T_MIN_M = 1024


def fast_datapath(m: int) -> str:
    """The GEMM datapath :func:`fast_linear` uses for ``m`` tokens."""
    if DEFAULT_DATAPATH != "auto":
        return DEFAULT_DATAPATH
    return "fp8t" if m >= FP8T_MIN_M else "f16t"


def experimental_kernels() -> bool:
    """Whether ``SVDQ_EXPERIMENTAL_KERNELS=1``: also use kernels not yet validated on a GPU
    (``registry.EXPERIMENTAL_PATHS``)."""
    return os.environ.get("SVDQ_EXPERIMENTAL_KERNELS") == "1"


def small_m_splits() -> bool:
    """Whether small-M calls (≤ :data:`SPLIT_K_MAX_M` tokens) cut K finer: split-K GEMMs
    (:func:`_split_k`) and shorter prologue splits (:func:`_k_splits`). On by default (GPU-tested
    and timed on an H100: 2× the one-pass kernels at M ≤ 16, docs/benchmarks.md);
    ``SVDQ_SMALL_M_SPLITS=0`` turns it off."""
    return os.environ.get("SVDQ_SMALL_M_SPLITS", "1") != "0"


def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def prologue_stats_kernel(
        x_ptr, s_ptr, l2_ptr, pamax_ptr, plr_ptr, M, K, R, BPS, shift,
        HAS_LR: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, AMAX: tl.constexpr = True,
    ):
        # split s of K (BPS blocks of 64): partial row absmax of x̂ (AMAX) and partial x · L2ᵀ
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BR)
        amax = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        kb0 = split * BPS
        kb1 = tl.minimum(kb0 + BPS, K // 64)
        for kb in range(kb0, kb1):
            rk = kb * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :])
            if AMAX:
                s = tl.load(s_ptr + rk).to(tl.float32)
                xs = tl.math.div_rn(x.to(tl.float32) + shift, s[None, :])
                ax = tl.where(xs == xs, tl.abs(xs), float("inf"))  # NaN -> inf -> row not ok
                amax = tl.maximum(amax, tl.max(ax, axis=1))
            if HAS_LR:
                l2 = tl.load(l2_ptr + rr[:, None] * K + rk[None, :], mask=(rr < R)[:, None], other=0.0)
                acc += tl.dot(x, tl.trans(l2))
        if AMAX:
            tl.store(pamax_ptr + split * M + rm, amax, mask=m_ok)
        if HAS_LR:
            tl.store(plr_ptr + (split * M + rm_c[:, None]) * BR + rr[None, :], acc, mask=m_ok[:, None])

    @triton.jit
    def prologue_quant_kernel(
        x_ptr, s_ptr, pamax_ptr, plr_ptr, q_ptr, a_ptr, lr_ptr, lrs_ptr, M, K, R, BPS, NSPLIT, shift,
        HAS_LR: tl.constexpr, Q16: tl.constexpr, W16: tl.constexpr, PERM: tl.constexpr, BM: tl.constexpr,
        BR: tl.constexpr, LR16: tl.constexpr = False, HAS_LRS: tl.constexpr = False,
    ):
        # split s of K: the rows' scale from every split's absmax, then FP8 codes of this split
        # (W16: x̂ itself in fp16, scaled by a power of two that keeps the row below 2^15);
        # split 0 also writes the token scales and sums the low-rank partials in split order
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        amax = tl.zeros([BM], dtype=tl.float32)
        for t in range(0, NSPLIT):
            amax = tl.maximum(amax, tl.load(pamax_ptr + t * M + rm_c))
        if W16:
            # a = 2^(E − 141) for amax in [2^(E−127), 2^(E−126)): |x̂ / a| < 2^15, bit-built (no
            # log/exp rounding); zero, NaN/inf (stats map NaN to inf) and tiny rows keep a = 1
            ebits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
            okw = (amax > 0) & (ebits < 255) & (ebits > 14)
            a = tl.where(okw, ((ebits - 14) << 23).to(tl.float32, bitcast=True), 1.0)
            ok = a == a
            a_div = a
        else:
            a = tl.math.div_rn(amax, tl.full([BM], 448.0, tl.float32))
            ok = (a > 0) & (a < float("inf"))
            a_div = tl.where(ok, a, 1.0)
        kb0 = split * BPS
        kb1 = tl.minimum(kb0 + BPS, K // 64)
        for kb in range(kb0, kb1):
            rk = kb * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :])
            s = tl.load(s_ptr + rk).to(tl.float32)
            xs = tl.math.div_rn(x.to(tl.float32) + shift, s[None, :])
            q = tl.math.div_rn(xs, a_div[:, None])
            if PERM:  # within each 64-group: the even k first, then the odd k (the "h" GEMMs)
                ar = tl.arange(0, 64)
                rk_out = kb * 64 + (ar % 2) * 32 + ar // 2
            else:
                rk_out = rk
            if W16:  # a power of two: exact; the one rounding is to fp16
                tl.store(q_ptr + rm_c[:, None] * K + rk_out[None, :], q.to(tl.float16), mask=m_ok[:, None])
            else:
                q = tl.minimum(tl.maximum(q, -448.0), 448.0)
                q = tl.where(ok[:, None], q, 0.0)
                q8 = q.to(tl.float8e4nv)
                if Q16:  # the same e4m3 values, stored as fp16 (exact) for the f16s GEMM
                    tl.store(q_ptr + rm_c[:, None] * K + rk_out[None, :], q8.to(tl.float16), mask=m_ok[:, None])
                else:
                    tl.store(q_ptr + rm_c[:, None] * K + rk_out[None, :], q8, mask=m_ok[:, None])
        if split == 0:
            tl.store(a_ptr + rm, a, mask=m_ok)
            if HAS_LR:
                rr = tl.arange(0, BR)
                lr = tl.zeros([BM, BR], dtype=tl.float32)
                for t in range(0, NSPLIT):
                    lr += tl.load(plr_ptr + (t * M + rm_c[:, None]) * BR + rr[None, :])
                lr_mask = m_ok[:, None] & (rr < R)[None, :]
                if LR16:  # (lr · lora_scales) as bf16 hi | lo in [M, 2R]: hi + lo = lr to ~2^-17
                    if HAS_LRS:
                        lr = lr * tl.load(lrs_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
                    hi = lr.to(tl.bfloat16)
                    lo = (lr - hi.to(tl.float32)).to(tl.bfloat16)
                    tl.store(lr_ptr + rm_c[:, None] * (2 * R) + rr[None, :], hi, mask=lr_mask)
                    tl.store(lr_ptr + rm_c[:, None] * (2 * R) + R + rr[None, :], lo, mask=lr_mask)
                else:
                    tl.store(lr_ptr + rm_c[:, None] * R + rr[None, :], lr, mask=lr_mask)

    @triton.jit
    def lowrank_sum_kernel(plr_ptr, lr_ptr, lrs_ptr, M, R, NSPLIT, HAS_LRS: tl.constexpr, BM: tl.constexpr,
                           BR: tl.constexpr):
        # the low-rank partials of the stats kernel summed in split order (as the quant kernel
        # does), times the per-rank scales, stored as bf16 hi | lo in [M, 2R]
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BR)
        lr = tl.zeros([BM, BR], dtype=tl.float32)
        for t in range(0, NSPLIT):
            lr += tl.load(plr_ptr + (t * M + rm_c[:, None]) * BR + rr[None, :])
        if HAS_LRS:
            lr = lr * tl.load(lrs_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
        lr_mask = m_ok[:, None] & (rr < R)[None, :]
        hi = lr.to(tl.bfloat16)
        lo = (lr - hi.to(tl.float32)).to(tl.bfloat16)
        tl.store(lr_ptr + rm_c[:, None] * (2 * R) + rr[None, :], hi, mask=lr_mask)
        tl.store(lr_ptr + rm_c[:, None] * (2 * R) + R + rr[None, :], lo, mask=lr_mask)

    @triton.jit
    def prologue_exact_kernel(
        x_ptr, s_ptr, l2_ptr, c_ptr, ax_ptr, plr_ptr, M, K, R, BPS, shift,
        UNSIGNED: tl.constexpr, HAS_LR: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
    ):
        # the format's int4 activation quantizer (docs/format.md §5) per (token, 64-group) of
        # split s: codes (−8..7, or 0..15 unsigned) as fp16 into c, scales into ax [K/64, M];
        # and this split's part of x · L2ᵀ
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BR)
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        kb0 = split * BPS
        kb1 = tl.minimum(kb0 + BPS, K // 64)
        for kb in range(kb0, kb1):
            rk = kb * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :])
            s = tl.load(s_ptr + rk).to(tl.float32)
            xs = tl.math.div_rn(x.to(tl.float32) + shift, s[None, :])
            if UNSIGNED:
                xs = tl.where(xs == xs, tl.maximum(xs, 0.0), xs)  # clamp_min(0), NaN kept
                mag = xs
                qmax = 15.0
                qmin = 0.0
            else:
                mag = tl.abs(xs)
                qmax = 7.0
                qmin = -8.0
            amax = tl.max(tl.where(mag == mag, mag, float("inf")), axis=1)  # NaN -> inf: output NaN
            a = tl.math.div_rn(amax, tl.full([BM], qmax, tl.float32))
            ok = (a > 0) & (a < float("inf"))
            q = tl.math.div_rn(xs, tl.where(ok, a, 1.0)[:, None])
            # round half to even (torch.round): adding and removing 1.5·2^23 leaves the nearest
            # integer, ties to even, for |q| < 2^22 (|q| ≤ 15.5 here); plain fp32 adds, no fast-math
            q = (q + 12582912.0) - 12582912.0
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            q = tl.where(ok[:, None], q, 0.0)
            tl.store(c_ptr + rm_c[:, None] * K + rk[None, :], q.to(tl.float16), mask=m_ok[:, None])
            tl.store(ax_ptr + kb * M + rm, a, mask=m_ok)
            if HAS_LR:
                l2 = tl.load(l2_ptr + rr[:, None] * K + rk[None, :], mask=(rr < R)[:, None], other=0.0)
                acc += tl.dot(x, tl.trans(l2))
        if HAS_LR:
            tl.store(plr_ptr + (split * M + rm_c[:, None]) * BR + rr[None, :], acc, mask=m_ok[:, None])

    gemm_configs = [
        triton.Config({"BM": 128, "BN": 128}, num_warps=8, num_stages=4),
        triton.Config({"BM": 128, "BN": 256}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=5),
        triton.Config({"BM": 128, "BN": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 256}, num_warps=8, num_stages=3),
    ]

    @triton.autotune(configs=gemm_configs, key=["M_BUCKET", "N", "K", "PACKED", "F16", "HAS_LR"])
    @triton.jit
    def gemm_kernel(
        q_ptr, a_ptr, w_ptr, wst_ptr, lr_ptr, lrs_ptr, l1_ptr, b_ptr, y_ptr, M, N, K, R, M_BUCKET, one,
        PACKED: tl.constexpr, F16: tl.constexpr, HAS_LR: tl.constexpr, HAS_LRS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsz
        pid_n = (pid % width) // gsz
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
        rk = tl.arange(0, 64)
        rkp = tl.arange(0, 32)
        G = K // 64
        a_ptrs = q_ptr + rm_c[:, None] * K + rk[None, :]
        if PACKED:
            w_ptrs = w_ptr + rn_c[:, None] * (K // 2) + rkp[None, :]
        else:
            w_ptrs = w_ptr + rn_c[:, None] * K + rk[None, :]
        s_ptrs = wst_ptr + rn_c
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for g in range(0, G):
            a = tl.load(a_ptrs)
            if PACKED:
                wp = tl.load(w_ptrs)
                lo = ((wp & 0xF).to(tl.int8) ^ 8) - 8
                hi = ((wp >> 4).to(tl.int8) ^ 8) - 8
                w8 = tl.join(lo, hi).reshape(BN, 64)
                w_ptrs += 32
            else:
                w8 = tl.load(w_ptrs)
                w_ptrs += 64
            sc = tl.load(s_ptrs).to(tl.float32)
            # one 64-group per MMA step, promoted to fp32 with the group's weight scale
            if F16:
                part = tl.dot(a.to(tl.float16), tl.trans(w8.to(tl.float16)))
            else:
                part = tl.dot(a, tl.trans(w8.to(tl.float16).to(tl.float8e4nv)))
            acc += part * sc[None, :]
            a_ptrs += 64
            s_ptrs += N
        asc = tl.load(a_ptr + rm_c)
        acc = acc * asc[:, None]
        if HAS_LR:
            lacc = tl.zeros([BM, BN], dtype=tl.float32)
            for r0 in range(0, R, BR):
                rr = r0 + tl.arange(0, BR)
                r_ok = rr < R
                lr = tl.load(lr_ptr + rm_c[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
                if HAS_LRS:
                    lrs = tl.load(lrs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
                    lr = lr * lrs[None, :]
                l1 = tl.load(l1_ptr + rn_c[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
                # lr (fp32) = hi + mid + lo (16-bit parts); smallest first so the tensor-core
                # accumulator never truncates the small parts against a large running sum
                lr_hi = lr.to(l1.dtype)
                rest = lr - lr_hi.to(tl.float32)
                lr_mid = rest.to(l1.dtype)
                lr_lo = (rest - lr_mid.to(tl.float32)).to(l1.dtype)
                l1t = tl.trans(l1)
                part = tl.dot(lr_lo, l1t)
                part = tl.dot(lr_mid, l1t, part)
                part = tl.dot(lr_hi, l1t, part)
                lacc += part * one
            acc += lacc
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn_c).to(tl.float32)
            acc += bias[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(y_ptr + rm_c[:, None] * N + rn_c[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    gemm_t_configs = [
        triton.Config({"BN": 128, "BM": 128}, num_warps=8, num_stages=4),
        triton.Config({"BN": 128, "BM": 256}, num_warps=8, num_stages=3),
        triton.Config({"BN": 256, "BM": 128}, num_warps=8, num_stages=3),
        triton.Config({"BN": 128, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BN": 64, "BM": 64}, num_warps=4, num_stages=5),
        triton.Config({"BN": 128, "BM": 32}, num_warps=4, num_stages=5),
        triton.Config({"BN": 128, "BM": 16}, num_warps=4, num_stages=5),
        triton.Config({"BN": 64, "BM": 16}, num_warps=4, num_stages=6),
    ]

    @triton.autotune(configs=gemm_t_configs,
                     key=["M_BUCKET", "N", "K", "F16", "HAS_LR", "SCALED", "EXACT", "NVFP4", "SPLIT_K", "HALVES"])
    @triton.jit
    def gemm_t_kernel(
        q_ptr, a_ptr, w_ptr, wst_ptr, pw_ptr, lr_ptr, lrs_ptr, l1_ptr, b_ptr, y_ptr, M, N, K, R, M_BUCKET, one,
        GPS, F16: tl.constexpr, SCALED: tl.constexpr, EXACT: tl.constexpr, NVFP4: tl.constexpr, HALVES: tl.constexpr,
        HAS_A: tl.constexpr, HAS_LR: tl.constexpr, HAS_LRS: tl.constexpr, HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_N: tl.constexpr,
    ):
        # yᵀ tile [BN, BM] = W (int4 → e4m3/f16 in registers: the MMA's A operand, no shared-memory
        # round trip) × qᵀ (activations, K-contiguous: the B operand straight from shared memory).
        # Weight decoding: int4 codes with per-group promotion (f16/fp8, EXACT: × token-group
        # scales too), int4 with the scales folded exactly into fp16 (SCALED; pw_ptr: the rows'
        # powers of two), or NVFP4 (E2M1 × e4m3 built exactly in fp16; wst_ptr: the scale bytes
        # [N, K/16], pw_ptr: the per-tensor scale). HAS_A: × the per-token scales a_ptr.
        # SPLIT_K > 1 (small M): program_id(1) takes GPS groups of K and stores its fp32 partial
        # tile at y_ptr + split·M·N; split 0 adds the low-rank branch and the bias;
        # splitk_reduce_kernel sums the splits in order.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_N * num_m
        first_n = (pid // width) * GROUP_N
        gsz = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % width) % gsz
        pid_m = (pid % width) // gsz
        rn = pid_n * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
        rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
        rk = tl.arange(0, 64)
        rkp = tl.arange(0, 32)
        pid_k = tl.program_id(1)
        g0 = pid_k * GPS
        G = tl.minimum(K // 64, g0 + GPS)
        w_ptrs = w_ptr + rn_c[:, None] * (K // 2) + rkp[None, :] + g0 * 32
        x_ptrs = q_ptr + rm_c[None, :] * K + rk[:, None] + g0 * 64
        xh_ptrs = q_ptr + rm_c[None, :] * K + rkp[:, None] + g0 * 64  # (HALVES: 32 rows of K)
        if NVFP4:
            s_ptrs = wst_ptr + rn_c[:, None] * (K // 16) + tl.arange(0, 4)[None, :] + g0 * 4
        else:
            s_ptrs = wst_ptr + rn_c + g0 * N
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        if SCALED:
            pw = tl.load(pw_ptr + rn_c)
        for g in range(g0, G):
            wp = tl.load(w_ptrs)
            if not HALVES:  # (HALVES loads its two half tiles below)
                xb = tl.load(x_ptrs)
            if NVFP4:
                nib = tl.join(wp & 0xF, wp >> 4).reshape(BN, 64).to(tl.int32)
                e2 = (nib >> 1) & 3
                man = nib & 1
                # E2M1 → fp16 bits: normal 2^(e2−1)·(1 + man/2); e2 = 0: man · 0.5
                bits = tl.where(e2 > 0, ((e2 + 14) << 10) | (man << 9), tl.where(man > 0, 14 << 10, 0))
                bits = bits | ((nib >> 3) << 15)
                w = bits.to(tl.int16).to(tl.float16, bitcast=True)
                sb = tl.load(s_ptrs).to(tl.int32)  # e4m3 bytes, decoded exactly
                se = (sb >> 3) & 0xF
                sm = sb & 7
                normal = (8 + sm).to(tl.float32) * ((se + 117) << 23).to(tl.float32, bitcast=True)
                sc4 = tl.where(se > 0, normal, sm.to(tl.float32) * 0.001953125)  # subnormal: sm · 2^-9
                sc4 = tl.where((sb >> 7) > 0, -sc4, sc4)
                sc64 = tl.reshape(tl.broadcast_to(sc4[:, :, None], [BN, 4, 16]), [BN, 64])
                acc = tl.dot((w.to(tl.float32) * sc64).to(tl.float16), xb, acc)
                s_ptrs += 4
            else:
                lo = ((wp & 0xF).to(tl.int8) ^ 8) - 8
                hi = ((wp >> 4).to(tl.int8) ^ 8) - 8
                w8 = tl.join(lo, hi).reshape(BN, 64)
                sc = tl.load(s_ptrs).to(tl.float32)
                if SCALED:
                    # code × scale × 2^e is exact in fp16 (see _row_pow2): one accumulation chain.
                    # Not F16 (fp8s, benchmark only): rounded to e4m3, an FP8 MMA chain
                    wv = w8.to(tl.float32) * (sc * pw)[:, None]
                    if F16:
                        acc = tl.dot(wv.to(tl.float16), xb, acc)
                    else:
                        acc = tl.dot(wv.to(tl.float8e4nv), xb, acc)
                elif EXACT:
                    # int4 × int4 codes summed over one group: exact; then × (weight scale ×
                    # token-group scale), groups summed in order — the reference's own association
                    part = tl.dot(w8.to(tl.float16), xb)
                    axg = tl.load(a_ptr + g * M + rm_c)
                    acc += part * (sc[:, None] * axg[None, :])
                elif HALVES:
                    # activations permuted by the prologue (even k, then odd k): the low nibbles
                    # meet the first half, the high nibbles the second — no interleave of codes
                    x_lo = tl.load(xh_ptrs)
                    x_hi = tl.load(xh_ptrs + 32)
                    if F16:
                        part = tl.dot(lo.to(tl.float16), x_lo.to(tl.float16))
                        part = tl.dot(hi.to(tl.float16), x_hi.to(tl.float16), part)
                    else:
                        part = tl.dot(lo.to(tl.float16).to(tl.float8e4nv), x_lo)
                        part = tl.dot(hi.to(tl.float16).to(tl.float8e4nv), x_hi, part)
                    acc += part * sc[:, None]
                else:
                    if F16:
                        part = tl.dot(w8.to(tl.float16), xb.to(tl.float16))
                    else:
                        part = tl.dot(w8.to(tl.float16).to(tl.float8e4nv), xb)
                    acc += part * sc[:, None]
                s_ptrs += N
            w_ptrs += 32
            x_ptrs += 64
            xh_ptrs += 64
        if SCALED:
            acc = acc / pw[:, None]  # a power of two: exact
        if NVFP4:
            acc = acc * tl.load(pw_ptr)
        if HAS_A:
            asc = tl.load(a_ptr + rm_c)
            acc = acc * asc[None, :]
        if HAS_LR and pid_k == 0:
            lacc = tl.zeros([BN, BM], dtype=tl.float32)
            for r0 in range(0, R, BR):
                rr = r0 + tl.arange(0, BR)
                r_ok = rr < R
                lrt = tl.load(lr_ptr + rm_c[None, :] * R + rr[:, None], mask=r_ok[:, None], other=0.0)
                if HAS_LRS:
                    lrs = tl.load(lrs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
                    lrt = lrt * lrs[:, None]
                l1 = tl.load(l1_ptr + rn_c[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
                lr_hi = lrt.to(l1.dtype)
                rest = lrt - lr_hi.to(tl.float32)
                lr_mid = rest.to(l1.dtype)
                lr_lo = (rest - lr_mid.to(tl.float32)).to(l1.dtype)
                part = tl.dot(l1, lr_lo)
                part = tl.dot(l1, lr_mid, part)
                part = tl.dot(l1, lr_hi, part)
                lacc += part * one
            acc += lacc
        if HAS_BIAS and pid_k == 0:
            bias = tl.load(b_ptr + rn_c).to(tl.float32)
            acc += bias[:, None]
        mask = (rn < N)[:, None] & (rm < M)[None, :]
        out_ptr = y_ptr + pid_k.to(tl.int64) * M * N if SPLIT_K > 1 else y_ptr
        tl.store(out_ptr + rm_c[None, :] * N + rn_c[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def splitk_reduce_kernel(ws_ptr, y_ptr, total, S: tl.constexpr, BLOCK: tl.constexpr):
        # y = Σ_s ws[s] in split order (deterministic), rounded once to y's dtype
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
        for sp in range(1, S):
            acc += tl.load(ws_ptr + sp * total + offs, mask=ok, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def prologue_nvfp4_kernel(
        x_ptr, s_ptr, l2_ptr, c_ptr, plr_ptr, M, K, R, BPS, shift,
        HAS_LR: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
    ):
        # the format's nvfp4 activation quantizer per (token, 16-group) of split s, written
        # dequantized: E2M1 value × its e4m3 scale is exact in fp16 (≤ 6 significant bits, within
        # 2^-10 .. 2688); and this split's part of x · L2ᵀ
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BR)
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        kb0 = split * BPS
        kb1 = tl.minimum(kb0 + BPS, K // 64)
        for kb in range(kb0, kb1):
            rk = kb * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :])
            s = tl.load(s_ptr + rk).to(tl.float32)
            xs = tl.math.div_rn(x.to(tl.float32) + shift, s[None, :])
            xg = tl.reshape(xs, [BM, 4, 16])
            amax = tl.max(tl.where(xg == xg, tl.abs(xg), float("inf")), axis=2)  # NaN -> inf
            # a = round_to_e4m3(amax / 6): nearest-even on e4m3's grid, saturating at 448;
            # the grid step is 2^(e − 3) for normal values (e = the value's exponent), 2^-9 below 2^-6
            v = tl.minimum(tl.math.div_rn(amax, tl.full([BM, 4], 6.0, tl.float32)), 448.0)
            ebits = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
            step = ((tl.maximum(ebits, 121) - 3) << 23).to(tl.float32, bitcast=True)
            r = tl.math.div_rn(v, step)
            r = (r + 12582912.0) - 12582912.0  # round half to even (|r| ≤ 16)
            a = tl.where(amax < float("inf"), r * step, amax)
            ok = (a > 0) & (a < float("inf"))
            t = tl.math.div_rn(xg, tl.where(ok, a, 1.0)[:, :, None])
            m = tl.abs(t)
            mag = tl.where(m > 0.25, 0.5, 0.0)
            mag = tl.where(m >= 0.75, 1.0, mag)
            mag = tl.where(m > 1.25, 1.5, mag)
            mag = tl.where(m >= 1.75, 2.0, mag)
            mag = tl.where(m > 2.5, 3.0, mag)
            mag = tl.where(m >= 3.5, 4.0, mag)
            mag = tl.where(m > 5.0, 6.0, mag)
            val = tl.where(t < 0, -mag, mag)
            val = tl.where(ok[:, :, None], val, 0.0)
            deq = tl.reshape(val * a[:, :, None], [BM, 64])  # 0 × inf = NaN for a NaN/inf group
            tl.store(c_ptr + rm_c[:, None] * K + rk[None, :], deq.to(tl.float16), mask=m_ok[:, None])
            if HAS_LR:
                l2 = tl.load(l2_ptr + rr[:, None] * K + rk[None, :], mask=(rr < R)[:, None], other=0.0)
                acc += tl.dot(x, tl.trans(l2))
        if HAS_LR:
            tl.store(plr_ptr + (split * M + rm_c[:, None]) * BR + rr[None, :], acc, mask=m_ok[:, None])

    return {"triton": triton, "prologue_stats": prologue_stats_kernel, "prologue_quant": prologue_quant_kernel,
            "prologue_exact": prologue_exact_kernel, "prologue_nvfp4": prologue_nvfp4_kernel,
            "lowrank_sum": lowrank_sum_kernel,
            "gemm": gemm_kernel, "gemm_configs": gemm_configs,
            "gemm_t": gemm_t_kernel, "splitk_reduce": splitk_reduce_kernel}


_SCALES_T: TensorCache[torch.Tensor] = TensorCache()


def _scales_t(wscales: torch.Tensor) -> torch.Tensor:
    """``wscales.t().contiguous()``, cached per tensor object until it is modified or freed."""
    return _SCALES_T.get((wscales,), lambda: wscales.t().contiguous())


_POW2: TensorCache[Optional[torch.Tensor]] = TensorCache()


def _row_pow2(wscales: torch.Tensor) -> Optional[torch.Tensor]:
    """Per output row, a power of two ``2^e`` (fp32 ``[N]``) such that every ``code × scale × 2^e``
    (code −8..7, scale a bf16 group scale of that row) is exactly an fp16 number — so the GEMM can
    fold the group scales into fp16 weights and accumulate all of K in one chain (datapath
    ``f16s``). None when that is impossible (fp16 scales: 11 significant bits, too many with a
    3-bit code; or a row whose scales span more than fp16's exponent range).

    A bf16 scale has 8 significant bits, so ``code × scale`` has at most 11: exact in fp16 if it
    is neither above the largest finite fp16 (max |code × scale| · 2^e ≤ 2^15) nor subnormal
    (min nonzero |scale| · 2^e ≥ 2^-14). Cached per scales tensor and version.
    """
    return _POW2.get((wscales,), lambda: _make_row_pow2(wscales))


def _make_row_pow2(wscales: torch.Tensor) -> Optional[torch.Tensor]:
    if wscales.dtype != torch.bfloat16:
        return None
    s = wscales.float().abs()
    big = s.amax(dim=1)
    small = torch.where(s > 0, s, torch.full_like(s, float("inf"))).amin(dim=1)
    # 8 · max · 2^e ≤ 2^15  →  e = 12 − ceil(log2(max)); rows of zeros: e = 0
    e = torch.where(big > 0, 12 - torch.ceil(torch.log2(big)), torch.zeros_like(big))
    ok = (small == float("inf")) | (small * torch.exp2(e) >= 2.0**-14)
    return torch.exp2(e).contiguous() if bool(ok.all()) else None


def _rank_block(r: int) -> int:
    return max(16, min(128, 1 << max(0, math.ceil(math.log2(max(r, 1))))))


def _rank_tile(r: int) -> int:
    """The prologues' low-rank tile: the whole rank (a power of two, at least 16)."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(r, 1)))))


#: Up to this many tokens, K is cut finer (:func:`small_m_splits`).
SPLIT_K_MAX_M = 64


def _k_splits(kk: int, m: int = 0) -> tuple[int, int]:
    """``(splits, 64-groups per split)``: the prologues cut K into at most 16 splits of at least
    8 groups, so that even a few tokens occupy many SMs. At small M (≤ :data:`SPLIT_K_MAX_M`,
    unless ``SVDQ_SMALL_M_SPLITS=0``): up to 64 splits of at least 2 groups — a program's chain of
    dependent loads is then 2–3 groups long instead of 8+ (the prologue's 20 µs at M ≤ 16 become
    9–10 µs on an H100)."""
    blocks = kk // 64
    if 0 < m <= SPLIT_K_MAX_M and small_m_splits():
        per = max(2, triton_cdiv(blocks, 64))
    else:
        per = triton_cdiv(blocks, min(16, max(1, triton_cdiv(blocks, 8))))
    return triton_cdiv(blocks, per), per


def _layer_inputs(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """A layer call's tensors as the kernels take them: ``x`` as a contiguous ``[M, K]``; the
    low-rank factors (and per-rank scales) only when both exist with a rank, ``L2`` in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    lr_on = lora_down is not None and lora_up is not None and lora_down.shape[0] > 0
    return (x2, smooth.contiguous(),
            lora_down.to(x2.dtype).contiguous() if lr_on else None,  # type: ignore[union-attr]
            lora_up.contiguous() if lr_on else None,  # type: ignore[union-attr]
            bias.contiguous() if bias is not None else None,
            lora_scales.contiguous() if (lr_on and lora_scales is not None) else None)


def _gemm_t(
    x: torch.Tensor, a: Optional[torch.Tensor], weight: torch.Tensor, wsc: torch.Tensor, pw: Optional[torch.Tensor],
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, f16: bool = True, scaled: bool = False,
    exact: bool = False, nvfp4: bool = False, halves: bool = False, split_k: Optional[int] = None,
) -> torch.Tensor:
    """Launch the transposed GEMM kernel (its weight decodings are described in the kernel).

    ``split_k``: K cut into that many parts, each its own program (default :func:`_split_k`);
    the fp32 partials are summed in order by a second kernel.
    """
    m, kk = x.shape
    n = weight.shape[0]
    r = 0 if (lr is None or lora_up is None) else lr.shape[1]
    groups = kk // 64
    splits = _split_k(m, n, kk) if split_k is None else max(1, min(int(split_k), groups))
    gps = triton_cdiv(groups, splits)
    splits = triton_cdiv(groups, gps)  # no empty split
    y = torch.empty(m, n, device=x.device, dtype=out_dtype)
    out = y if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    bucket = 1 << max(4, math.ceil(math.log2(max(m, 1))))
    grid = lambda meta: (triton_cdiv(m, meta["BM"]) * triton_cdiv(n, meta["BN"]), splits)  # noqa: E731
    unused = y  # for the pointers a call leaves out (never read: their flags are off)
    k = _kernels()
    k["gemm_t"][grid](
        x, a if a is not None else unused, weight, wsc, pw if pw is not None else unused, lr if r else unused,
        lora_scales if lora_scales is not None else unused, lora_up if r else unused,
        bias if bias is not None else unused, out, m, n, kk, r, bucket, 1.0, gps,
        F16=f16, SCALED=scaled, EXACT=exact, NVFP4=nvfp4, HALVES=halves, HAS_A=a is not None and not exact,
        HAS_LR=bool(r),
        HAS_LRS=lora_scales is not None and bool(r), HAS_BIAS=bias is not None, SPLIT_K=splits,
        BR=_rank_block(r) if r <= 64 else 64, GROUP_N=8,
    )
    if splits > 1:
        block = 1024
        k["splitk_reduce"][(triton_cdiv(m * n, block),)](out, y, m * n, S=splits, BLOCK=block)
    return y


def _split_k(m: int, n: int, kk: int) -> int:
    """How many parts K is cut into: 1, except at small M (≤ :data:`SPLIT_K_MAX_M` tokens, where
    one program per 128 output features leaves most SMs idle and each streams all of K alone),
    unless ``SVDQ_SMALL_M_SPLITS=0``: enough parts for ~2 programs per SM (132 on an H100), each
    at least 8 groups of 64."""
    if m > SPLIT_K_MAX_M or not small_m_splits():
        return 1
    programs = max(1, triton_cdiv(n, 128))
    return max(1, min(triton_cdiv(264, programs), (kk // 64) // 8))


def prologue(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], *, act_shift: float = 0.0,
    codes16: bool = False, w16: bool = False, perm: bool = False, lr16: bool = False,
    lora_scales: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused smooth + FP8 per-token quantization + ``x · L2ᵀ``.

    Args:
        x: ``[M, K]`` contiguous, bf16 or fp16.
        smooth: ``[K]``.
        lora_down: ``[r, K]`` in ``x.dtype`` or ``None``.
        act_shift: Added to ``x`` before smoothing.

    Returns:
        ``(q [M, K] float8_e4m3fn, a [M] float32, lr [M, r] float32 or None)``; with
        ``codes16`` the same code values as float16 (what the ``f16s`` GEMM reads). With
        ``w16`` (W4A16 layers) no quantization: ``q = fp16(x̂ / a)`` with ``a`` a per-token power
        of two (``|q| < 2^15``), so ``q · a`` is ``x̂`` rounded to fp16's precision. With ``perm``
        the columns of ``q`` are permuted within each 64-group — the 32 even k, then the 32 odd k
        — the order the ``*h`` GEMM datapaths read (:data:`PERMUTED_DATAPATHS`). With ``lr16``
        (the ``fast8`` path) ``lr`` is ``lr · lora_scales`` as bf16 ``[M, 2r]``: its ``hi`` part,
        then ``lo = bf16(lr − hi)``, so ``[hi | lo] · [L1 | L1]ᵀ`` is one bf16 GEMM that keeps
        fp32-level accuracy.
    """
    k = _kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    q = torch.empty(m, kk, device=x.device, dtype=torch.float16 if (codes16 or w16) else torch.float8_e4m3fn)
    a = torch.empty(m, device=x.device, dtype=torch.float32)
    if lr16:
        lr = torch.empty(m, 2 * r, device=x.device, dtype=torch.bfloat16) if r else None
    else:
        lr = torch.empty(m, max(r, 1), device=x.device, dtype=torch.float32) if r else None
    has_lrs = lr16 and r > 0 and lora_scales is not None
    br = _rank_tile(r)
    nsplit, bps = _k_splits(kk, m)
    pamax = torch.empty(nsplit, m, device=x.device, dtype=torch.float32)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else pamax
    # (Autotuning rows/warps/stages here was tried on the H100: Triton's autotuner doubled the
    # host time per call, ~100 → ~210 µs, and the eager layer is host-bound; fixed tiles it is.)
    bm = 32
    grid = (triton_cdiv(m, bm), nsplit)
    warps = 4 if br <= 64 else 8
    k["prologue_stats"][grid](x, smooth, lora_down if r else x, pamax, plr, m, kk, r, bps, float(act_shift),
                              HAS_LR=bool(r), BM=bm, BR=br, num_warps=warps, num_stages=3)
    k["prologue_quant"][grid](x, smooth, pamax, plr, q, a, lr if r else a, lora_scales if has_lrs else a, m, kk,
                              r, bps, nsplit, float(act_shift), HAS_LR=bool(r), Q16=codes16, W16=w16, PERM=perm,
                              BM=bm, BR=br, LR16=lr16, HAS_LRS=has_lrs, num_warps=4, num_stages=3)
    return q, a, lr


def lowrank_down(
    x: torch.Tensor, lora_down: torch.Tensor, *, lora_scales: Optional[torch.Tensor] = None,
    block_m: int = 64, num_warps: Optional[int] = 8, num_stages: int = 4,
    groups_per_split: Optional[int] = None,
) -> torch.Tensor:
    """``lr = (x · L2ᵀ) · lora_scales`` as bf16 ``[hi | lo]`` ``[M, 2r]`` — :func:`prologue`'s
    ``lr16`` output alone (same kernels and K splits; with the prologue's tiles, ``block_m=32,
    num_warps=4, num_stages=3``, the same bits), for callers whose activations are quantized
    elsewhere (the compiled ``fast8`` path).

    Args:
        x: ``[M, K]`` contiguous, bf16 or fp16.
        lora_down: ``[r, K]`` in ``x.dtype``, r ≥ 1.
        lora_scales: Optional per-rank multipliers ``[r]``.
        block_m, num_warps, num_stages, groups_per_split: Tiling (rows per program, Triton
            warps and pipeline stages, 64-wide K groups per split — by default the prologue's
            K splits). The other defaults are the best all-round tiling of benchmarks/lowrank_down.py on an H100
            (never slower than the prologue's tiles, 1.9× faster at 4608 × 3072). Other tiles
            change the fp32 summation order, not the math.
    """
    m = x.shape[0]
    r = lora_down.shape[0]
    lr = torch.empty(m, 2 * r, device=x.device, dtype=torch.bfloat16)
    plr = lowrank_partials(x, lora_down, block_m=block_m, num_warps=num_warps, num_stages=num_stages,
                           groups_per_split=groups_per_split)
    _kernels()["lowrank_sum"][(triton_cdiv(m, 32),)](
        plr, lr, lora_scales if lora_scales is not None else plr, m, r, plr.shape[0],
        HAS_LRS=lora_scales is not None, BM=32, BR=plr.shape[2], num_warps=4)
    return lr


def lowrank_partials(
    x: torch.Tensor, lora_down: torch.Tensor, *, block_m: int = 64, num_warps: Optional[int] = 8,
    num_stages: int = 4, groups_per_split: Optional[int] = None,
) -> torch.Tensor:
    """The fp32 partial sums of ``x · L2ᵀ`` over :func:`lowrank_down`'s K splits, ``[splits, M, BR]``
    (``BR``: the rank rounded up to a power of two ≥ 16, columns ≥ r zero); summing them in split
    order gives :func:`lowrank_down`'s bits. Same arguments."""
    m, kk = x.shape
    r = lora_down.shape[0]
    br = _rank_tile(r)
    if groups_per_split is None:
        nsplit, bps = _k_splits(kk, m)
    else:
        bps = max(1, min(int(groups_per_split), kk // 64))
        nsplit = triton_cdiv(kk // 64, bps)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32)
    warps = num_warps or (4 if br <= 64 else 8)
    _kernels()["prologue_stats"][(triton_cdiv(m, block_m), nsplit)](
        x, x, lora_down, plr, plr, m, kk, r, bps, 0.0, HAS_LR=True, BM=block_m, BR=br, AMAX=False,
        num_warps=warps, num_stages=num_stages)
    return plr


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(
    q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor,
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, packed: bool = True,
    datapath: str = "f16t", split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = (q ⊛ W) · a + (lr · diag(lora_scales)) · L1ᵀ + b`` with group-64 promotion.

    ``weight`` is the packed uint8 ``[N, K/2]`` (``packed=True``) or int8 codes ``[N, K]``.
    ``wscales`` is the layer's ``[N, K/64]``; the kernel reads a ``[K/64, N]`` copy (contiguous
    per-group loads) made once per scales tensor and version (:func:`_scales_t`).
    ``datapath``: both promote every 64-group to fp32 with the group scale; ``"f16"`` runs
    the group's MMA in fp16 (e4m3 and int4 codes are exact in fp16), ``"fp8"`` in FP8
    (Hopper FP8 MMAs accumulate with reduced precision: ~1e-4 relative). ``split_k``: the
    transposed datapaths only (see :func:`_gemm_t`). ``f16h``/``fp8h`` need ``q`` from
    ``prologue(perm=True)``.
    """
    if datapath not in DATAPATHS:
        raise ValueError(f"datapath {datapath!r} is not one of {DATAPATHS}")
    wst = _scales_t(wscales)
    if datapath.endswith(("t", "s", "h")):
        if not packed:
            raise ValueError("the transposed datapaths read packed int4 weights only")
        pw = None
        if datapath in ("f16s", "fp8s"):
            pw = _row_pow2(wscales)
            if pw is None:  # scales whose products are not exact in fp16: the per-group datapath
                datapath = datapath[:-1] + "t"
            elif datapath == "fp8s":
                pw = pw * 2.0**-7  # products ≤ 2^8: inside e4m3's range (448)
            elif q.dtype != torch.float16:
                q = q.to(torch.float16)  # e4m3 codes are exact in fp16 (prologue(codes16=True) writes these)
        return _gemm_t(q, a, weight, wst, pw, lr, lora_up, bias, lora_scales, out_dtype=out_dtype,
                       f16=datapath in ("f16t", "f16s", "f16h"), scaled=pw is not None,
                       halves=datapath in PERMUTED_DATAPATHS, split_k=split_k)
    m, kk = q.shape
    n = weight.shape[0]
    r = 0 if (lr is None or lora_up is None) else lr.shape[1]
    y = torch.empty(m, n, device=q.device, dtype=out_dtype)
    bucket = 1 << max(4, math.ceil(math.log2(max(m, 1))))
    grid = lambda meta: (triton_cdiv(m, meta["BM"]) * triton_cdiv(n, meta["BN"]),)  # noqa: E731
    _kernels()["gemm"][grid](
        q, a, weight, wst, lr if r else a, lora_scales if lora_scales is not None else a,
        lora_up if r else wscales, bias if bias is not None else wscales, y, m, n, kk, r, bucket, 1.0,
        PACKED=packed, F16=datapath == "f16", HAS_LR=bool(r), HAS_LRS=lora_scales is not None and bool(r),
        HAS_BIAS=bias is not None, BR=_rank_block(r) if r <= 64 else 64, GROUP_M=8,
    )
    return y


def prologue_exact(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], *, act_shift: float = 0.0,
    unsigned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The ``exact`` mode's prologue: the format's int4 activation quantizer + ``x · L2ᵀ``.

    Returns:
        ``(codes [M, K] float16 holding −8..7 (0..15 unsigned), scales [K/64, M] float32,
        lr [M, r] float32 or None)``. A group with a NaN/inf input gets scale inf and zero
        codes (the reference keeps NaN; either way the token's output is NaN).
    """
    k = _kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    codes = torch.empty(m, kk, device=x.device, dtype=torch.float16)
    scales = torch.empty(kk // 64, m, device=x.device, dtype=torch.float32)
    bm = 32
    br = _rank_tile(r)
    nsplit, bps = _k_splits(kk, m)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else scales
    k["prologue_exact"][(triton_cdiv(m, bm), nsplit)](
        x, smooth, lora_down if r else x, codes, scales, plr, m, kk, r, bps, float(act_shift),
        UNSIGNED=bool(unsigned), HAS_LR=bool(r), BM=bm, BR=br, num_warps=4 if br <= 64 else 8, num_stages=3)
    lr = plr.sum(dim=0)[:, :r].contiguous() if r else None
    return codes, scales, lr


def gemm_exact(
    codes: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor,
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = Σ_g (codes_g · W_gᵀ) · (scales_g ⊗ wscales_g) + (lr · diag(lora_scales)) · L1ᵀ + b``
    (the transposed kernel; int4 codes multiply exactly in fp16, one promotion per 64-group)."""
    return _gemm_t(codes, scales, weight, _scales_t(wscales), None, lr, lora_up, bias, lora_scales,
                   out_dtype=out_dtype, exact=True, split_k=split_k)


def exact_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """The ``exact`` int4 W4A4 mode (signature of :func:`svdq_format.ops.reference_linear`)."""
    x2, smooth, down, up, bias, lora_scales = _layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    with device_guard(x2.device):
        codes, scales, lr = prologue_exact(x2, smooth, down, act_shift=act_shift, unsigned=act_unsigned)
        y = gemm_exact(codes, scales, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                       out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def prologue_nvfp4(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], *, act_shift: float = 0.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """nvfp4 W4A4 prologue: ``(x̂ quantized per 16-group to E2M1 × e4m3 scale and written
    dequantized in fp16 [M, K] — exact —, lr [M, r] float32 or None)``."""
    k = _kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    deq = torch.empty(m, kk, device=x.device, dtype=torch.float16)
    bm = 32
    br = _rank_tile(r)
    nsplit, bps = _k_splits(kk, m)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else deq
    k["prologue_nvfp4"][(triton_cdiv(m, bm), nsplit)](
        x, smooth, lora_down if r else x, deq, plr, m, kk, r, bps, float(act_shift),
        HAS_LR=bool(r), BM=bm, BR=br, num_warps=4 if br <= 64 else 8, num_stages=3)
    return deq, (plr.sum(dim=0)[:, :r].contiguous() if r else None)


def gemm_nvfp4(
    xq: torch.Tensor, a: Optional[torch.Tensor], weight: torch.Tensor, wscales: torch.Tensor,
    wtscale: torch.Tensor, lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = (xq · Wᵀ) · wtscale · diag(a) + (lr · diag(lora_scales)) · L1ᵀ + b`` for nvfp4 weights
    (E2M1 nibbles, e4m3 scales per 16, fp32 per-tensor scale); ``xq`` fp16 ``[M, K]``."""
    wt = wtscale.reshape(1).to(device=xq.device, dtype=torch.float32)
    return _gemm_t(xq, a, weight, wscales.contiguous().view(torch.uint8), wt, lr, lora_up, bias, lora_scales,
                   out_dtype=out_dtype, nvfp4=True, split_k=split_k)


def nvfp4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """nvfp4 layers on Hopper (``act="nvfp4"`` W4A4 or ``"none"`` W4A16): both operands are
    dequantized exactly into fp16 (E2M1 × e4m3 needs ≤ 6 significant bits), so a plain fp16
    MMA with fp32 accumulation computes the format's math up to summation order."""
    x2, smooth, down, up, bias, lora_scales = _layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    wt = wtscale if wtscale is not None else torch.ones((), device=x2.device)
    with device_guard(x2.device):
        if act == "nvfp4":
            xq, lr = prologue_nvfp4(x2, smooth, down, act_shift=act_shift)
            a = None
        else:
            xq, a, lr = prologue(x2, smooth, down, act_shift=act_shift, w16=True)
        y = gemm_nvfp4(xq, a, qweight.contiguous(), wscales, wt, lr, up, bias, lora_scales, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """int4 weight-only layers (``act="none"``): ``x̂`` in fp16 (per-token power-of-two scale) ×
    int4 weights, on the ``f16s`` GEMM (``f16t`` when the scales cannot be folded exactly).
    Differs from the reference only by the rounding of ``x̂`` to fp16 (~1e-4 relative)."""
    x2, smooth, down, up, bias, lora_scales = _layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    with device_guard(x2.device):
        q, a, lr = prologue(x2, smooth, down, act_shift=act_shift, w16=True)
        y = gemm(q, a, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                 out_dtype=x.dtype, datapath="f16s")
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def fast_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """The backend entry point (signature of :func:`svdq_format.ops.reference_linear`)."""
    if DEFAULT_DATAPATH in BENCHMARK_ONLY_DATAPATHS or DEFAULT_DATAPATH not in (*DATAPATHS, "auto"):
        raise ValueError(f"SVDQ_FAST_DATAPATH={DEFAULT_DATAPATH}: not a fast-mode datapath; use auto, f16t, "
                         "fp8t, f16s, f16 or fp8 (fp8s is a benchmark datapath: weights rounded to e4m3)")
    x2, smooth, down, up, bias, lora_scales = _layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    datapath = fast_datapath(x2.shape[0])
    codes16 = datapath == "f16s" and _row_pow2(wscales) is not None
    with device_guard(x2.device):  # Triton launches on the current device
        q, a, lr = prologue(x2, smooth, down, act_shift=act_shift, codes16=codes16,
                            perm=datapath in PERMUTED_DATAPATHS)
        y = gemm(q, a, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                 out_dtype=x.dtype, datapath=datapath)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
