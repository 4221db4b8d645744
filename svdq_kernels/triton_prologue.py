"""The Triton prologues: what a layer computes from its input before the 4-bit GEMM.

Each prologue reads ``x`` once, split over K (up to 16 parts, finer at small M: even a few
tokens fill the GPU), and computes the smoothed input ``x̂ = (x + shift) / s`` (``· (1/s)`` in the
FP8 modes) quantized the way the layer's GEMM reads it, plus the low-rank down projection ``x · L2ᵀ`` (fp32, tensor
cores, on the raw input) summed over the splits in order (deterministic):

* :func:`prologue` — ``fast`` / ``fast8`` (float8_e4m3 codes with a per-token scale
  ``a = absmax / 448``; two kernels: the splits' absmax, then the codes) and W4A16 (``w16``:
  ``x̂`` in fp16 scaled by a per-token power of two);
* (``codes_tiles``: the second kernel of :func:`svdq_kernels.lowrank_tiles.quantize_lowrank`, the
  ``fast8`` codes and the GEMM's low-rank k-tiles after a stats pass that also computes ``x · L2ᵀ``);
* :func:`lowrank_down` — the low-rank part alone (the compiled ``fast8`` path);
  :func:`lowrank_partials` its per-split fp32 sums (the ``fast8`` GEMM's low-rank k-tiles);
* :func:`prologue_exact` — the format's int4 activation quantizer per 64-group (``exact``);
* :func:`prologue_nvfp4` — nvfp4 activations (E2M1 × e4m3 per 16), written dequantized.

Triton is imported when the kernels are first built, so importing this module is free on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from svdq_format import ops

__all__ = ["prologue", "lowrank_down", "lowrank_partials", "prologue_exact", "prologue_nvfp4",
           "SPLIT_K_MAX_M", "SMALL_M_SPLITS", "small_m_splits", "k_splits", "rank_tile", "cdiv", "kernels"]


#: Up to this many tokens, K is cut finer (:func:`small_m_splits`).
SPLIT_K_MAX_M = 64
#: Small-M calls cut K finer (GPU-tested and timed on an H100: 2× the one-pass kernels at
#: M ≤ 16, docs/benchmarks.md). Only the benchmarks turn it off, to time the one-pass kernels
#: (``benchmarks/gemm_datapaths.py --no-small-m-splits``).
SMALL_M_SPLITS = True

#: The k-tile store helper (:func:`svdq_kernels.prologue_helpers.store_k_tiles`) that ``codes_tiles`` calls,
#: bound here when the kernels are first built: Triton's interpreter resolves a kernel's callees among
#: its module's globals.
store_k_tiles: Any = None


def small_m_splits() -> bool:
    """Whether small-M calls (≤ :data:`SPLIT_K_MAX_M` tokens) cut K finer: split-K GEMMs
    (:func:`svdq_kernels.triton_gemm.split_k_parts`) and shorter prologue splits (:func:`k_splits`);
    :data:`SMALL_M_SPLITS`."""
    return SMALL_M_SPLITS


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def rank_tile(r: int) -> int:
    """The prologues' low-rank tile: the whole rank (a power of two, at least 16)."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(r, 1)))))


def k_splits(kk: int, m: int = 0) -> tuple[int, int]:
    """``(splits, 64-groups per split)``: the prologues cut K into at most 16 splits of at least
    8 groups, so that even a few tokens occupy many SMs. At small M (≤ :data:`SPLIT_K_MAX_M`,
    with :func:`small_m_splits`): up to 64 splits of at least 2 groups — a program's chain of
    dependent loads is then 2–3 groups long instead of 8+ (the prologue's 20 µs at M ≤ 16 become
    9–10 µs on an H100)."""
    blocks = kk // 64
    if 0 < m <= SPLIT_K_MAX_M and small_m_splits():
        per = max(2, cdiv(blocks, 64))
    else:
        per = cdiv(blocks, min(16, max(1, cdiv(blocks, 8))))
    return cdiv(blocks, per), per


@functools.lru_cache(maxsize=1)
def kernels() -> dict[str, Any]:
    """The prologue kernels, built on first use (Triton imported then)."""
    import triton
    import triton.language as tl

    from . import prologue_helpers

    global store_k_tiles
    store_k_tiles = prologue_helpers.store_k_tiles

    @triton.jit
    def prologue_stats_kernel(
        x_ptr, s_ptr, l2_ptr, pamax_ptr, plr_ptr, M, K, R, BPS, shift,
        HAS_LR: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, AMAX: tl.constexpr = True,
        RCP: tl.constexpr = False,
    ):
        # split s of K (BPS blocks of 64): partial row absmax of x̂ (AMAX) and partial x · L2ᵀ;
        # RCP: s_ptr holds 1/s in fp32 and x̂ = (x + shift) · (1/s) (the fast modes), else x̂ = (x + shift) / s
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
                if RCP:
                    xs = (x.to(tl.float32) + shift) * s[None, :]
                else:
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
        HAS_LR: tl.constexpr, Q16: tl.constexpr, W16: tl.constexpr, BM: tl.constexpr,
        BR: tl.constexpr, LR16: tl.constexpr = False, HAS_LRS: tl.constexpr = False, RCP: tl.constexpr = False,
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
        ra = tl.math.div_rn(tl.full([BM], 1.0, tl.float32), a_div)  # RCP: codes = x̂ · (1/a)
        kb0 = split * BPS
        kb1 = tl.minimum(kb0 + BPS, K // 64)
        for kb in range(kb0, kb1):
            rk = kb * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :])
            s = tl.load(s_ptr + rk).to(tl.float32)
            if RCP:
                q = ((x.to(tl.float32) + shift) * s[None, :]) * ra[:, None]
            else:
                xs = tl.math.div_rn(x.to(tl.float32) + shift, s[None, :])
                q = tl.math.div_rn(xs, a_div[:, None])
            if W16:  # a power of two: exact; the one rounding is to fp16
                tl.store(q_ptr + rm_c[:, None] * K + rk[None, :], q.to(tl.float16), mask=m_ok[:, None])
            else:
                q = tl.minimum(tl.maximum(q, -448.0), 448.0)
                q = tl.where(ok[:, None], q, 0.0)
                q8 = q.to(tl.float8e4nv)
                if Q16:  # the same e4m3 values, stored as fp16 (exact) for the f16s GEMM
                    tl.store(q_ptr + rm_c[:, None] * K + rk[None, :], q8.to(tl.float16), mask=m_ok[:, None])
                else:
                    tl.store(q_ptr + rm_c[:, None] * K + rk[None, :], q8, mask=m_ok[:, None])
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
    def codes_tiles_kernel(
        x_ptr, rs_ptr, pamax_ptr, plr_ptr, q_ptr, a_ptr, lr_ptr, ag_ptr, lrs_ptr, M, K, R, BPS, NSPLIT, shift,
        HAS_LRS: tl.constexpr, BM: tl.constexpr, PBR: tl.constexpr, BR: tl.constexpr, RT: tl.constexpr,
        BK: tl.constexpr = 64,
    ):
        # quantize_lowrank's second kernel, split s of K: the rows' scale from every split's absmax
        # and the e4m3 codes of this split (as prologue_quant with RCP; BK columns per step, the
        # split's end masked); split 0 also writes a and
        # the low-rank k-tiles from the stats kernel's partials, as lowrank_tiles does: summed in
        # split order, times the per-rank scales, divided by a' = (a > 0 ? a : 1), ranks 32j + c to
        # column 64j + c and zeros to 64j + 32 + c; a' to ag
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        amax = tl.zeros([BM], dtype=tl.float32)
        for t in range(0, NSPLIT):
            amax = tl.maximum(amax, tl.load(pamax_ptr + t * M + rm_c))
        k0 = split * BPS * 64
        a = tl.math.div_rn(amax, tl.full([BM], 448.0, tl.float32))
        ok = (a > 0) & (a < float("inf"))
        ra = tl.math.div_rn(tl.full([BM], 1.0, tl.float32), tl.where(ok, a, 1.0))
        k1 = tl.minimum(k0 + BPS * 64, K)
        for c0 in range(k0, k1, BK):
            rk = c0 + tl.arange(0, BK)
            k_ok = rk < k1
            x = tl.load(x_ptr + rm_c[:, None] * K + rk[None, :], mask=k_ok[None, :], other=0.0)
            rs = tl.load(rs_ptr + rk, mask=k_ok, other=0.0)
            q = ((x.to(tl.float32) + shift) * rs[None, :]) * ra[:, None]
            q = tl.minimum(tl.maximum(q, -448.0), 448.0)
            q = tl.where(ok[:, None], q, 0.0)
            tl.store(q_ptr + rm_c[:, None] * K + rk[None, :], q.to(tl.float8e4nv), mask=m_ok[:, None] & k_ok[None, :])
        if split == 0:
            tl.store(a_ptr + rm, a, mask=m_ok)
            rr = tl.arange(0, BR)
            lr = tl.zeros([BM, BR], dtype=tl.float32)
            for t in range(0, NSPLIT):
                lr += tl.load(plr_ptr + (t * M + rm_c[:, None]) * PBR + rr[None, :], mask=(rr < PBR)[None, :],
                              other=0.0)
            store_k_tiles(lr, a, rr, rm_c, m_ok, lr_ptr, ag_ptr, lrs_ptr, R, RT, HAS_LRS)

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

    return {"prologue_stats": prologue_stats_kernel, "prologue_quant": prologue_quant_kernel,
            "prologue_exact": prologue_exact_kernel, "prologue_nvfp4": prologue_nvfp4_kernel,
            "lowrank_sum": lowrank_sum_kernel, "codes_tiles": codes_tiles_kernel}


def prologue(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], *, act_shift: float = 0.0,
    codes16: bool = False, w16: bool = False, lr16: bool = False,
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
        of two (``|q| < 2^15``), so ``q · a`` is ``x̂`` rounded to fp16's precision. With ``lr16``
        (the ``fast8`` path) ``lr`` is ``lr · lora_scales`` as bf16 ``[M, 2r]``: its ``hi`` part,
        then ``lo = bf16(lr − hi)``, so ``[hi | lo] · [L1 | L1]ᵀ`` is one bf16 GEMM that keeps
        fp32-level accuracy.
    """
    k = kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    rcp = not w16  # the FP8 modes multiply by 1/s and 1/a (svdq_format.ops.quantize_fp8_rows)
    s_in = ops.smooth_reciprocal(smooth) if rcp else smooth
    q = torch.empty(m, kk, device=x.device, dtype=torch.float16 if (codes16 or w16) else torch.float8_e4m3fn)
    a = torch.empty(m, device=x.device, dtype=torch.float32)
    if lr16:
        lr = torch.empty(m, 2 * r, device=x.device, dtype=torch.bfloat16) if r else None
    else:
        lr = torch.empty(m, max(r, 1), device=x.device, dtype=torch.float32) if r else None
    has_lrs = lr16 and r > 0 and lora_scales is not None
    br = rank_tile(r)
    nsplit, bps = k_splits(kk, m)
    pamax = torch.empty(nsplit, m, device=x.device, dtype=torch.float32)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else pamax
    # (Autotuning rows/warps/stages here was tried on the H100: Triton's autotuner doubled the
    # host time per call, ~100 → ~210 µs, and the eager layer is host-bound; fixed tiles it is.)
    bm = 32
    grid = (cdiv(m, bm), nsplit)
    warps = 4 if br <= 64 else 8
    k["prologue_stats"][grid](x, s_in, lora_down if r else x, pamax, plr, m, kk, r, bps, float(act_shift),
                              HAS_LR=bool(r), BM=bm, BR=br, RCP=rcp, num_warps=warps, num_stages=3)
    k["prologue_quant"][grid](x, s_in, pamax, plr, q, a, lr if r else a, lora_scales if has_lrs else a, m, kk,
                              r, bps, nsplit, float(act_shift), HAS_LR=bool(r), Q16=codes16, W16=w16, BM=bm,
                              BR=br, LR16=lr16, HAS_LRS=has_lrs, RCP=rcp, num_warps=4, num_stages=3)
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
    kernels()["lowrank_sum"][(cdiv(m, 32),)](
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
    br = rank_tile(r)
    if groups_per_split is None:
        nsplit, bps = k_splits(kk, m)
    else:
        bps = max(1, min(int(groups_per_split), kk // 64))
        nsplit = cdiv(kk // 64, bps)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32)
    warps = num_warps or (4 if br <= 64 else 8)
    kernels()["prologue_stats"][(cdiv(m, block_m), nsplit)](
        x, x, lora_down, plr, plr, m, kk, r, bps, 0.0, HAS_LR=True, BM=block_m, BR=br, AMAX=False,
        num_warps=warps, num_stages=num_stages)
    return plr


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
    k = kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    codes = torch.empty(m, kk, device=x.device, dtype=torch.float16)
    scales = torch.empty(kk // 64, m, device=x.device, dtype=torch.float32)
    bm = 32
    br = rank_tile(r)
    nsplit, bps = k_splits(kk, m)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else scales
    k["prologue_exact"][(cdiv(m, bm), nsplit)](
        x, smooth, lora_down if r else x, codes, scales, plr, m, kk, r, bps, float(act_shift),
        UNSIGNED=bool(unsigned), HAS_LR=bool(r), BM=bm, BR=br, num_warps=4 if br <= 64 else 8, num_stages=3)
    lr = plr.sum(dim=0)[:, :r].contiguous() if r else None
    return codes, scales, lr


def prologue_nvfp4(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], *, act_shift: float = 0.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """nvfp4 W4A4 prologue: ``(x̂ quantized per 16-group to E2M1 × e4m3 scale and written
    dequantized in fp16 [M, K] — exact —, lr [M, r] float32 or None)``."""
    k = kernels()
    m, kk = x.shape
    r = 0 if lora_down is None else lora_down.shape[0]
    deq = torch.empty(m, kk, device=x.device, dtype=torch.float16)
    bm = 32
    br = rank_tile(r)
    nsplit, bps = k_splits(kk, m)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32) if r else deq
    k["prologue_nvfp4"][(cdiv(m, bm), nsplit)](
        x, smooth, lora_down if r else x, deq, plr, m, kk, r, bps, float(act_shift),
        HAS_LR=bool(r), BM=bm, BR=br, num_warps=4 if br <= 64 else 8, num_stages=3)
    return deq, (plr.sum(dim=0)[:, :r].contiguous() if r else None)
