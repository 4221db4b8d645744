"""The Triton group-64 GEMM: int4 (or nvfp4) weights held packed, one 64-wide K group per MMA step.

``q`` (the prologue's activation codes) × the packed weights (canonical layout, no shuffle),
nibbles converted to e4m3/fp16 in registers — the weights are the MMA's register operand and
the tokens its N dimension (the "transposed" kernel: narrow token tiles for small M) — with
the group's weight scale applied once per group after promotion to fp32 (the format's group
64: exact, no rounding of ``scale × code``). The epilogue applies the token scale, adds
``lr · L1ᵀ`` (lr split into three 16-bit parts: ~fp32 accurate) and the bias, and writes the
16-bit output once. At small M, K is split over programs and the fp32 partials summed in
order by a second kernel (:func:`split_k_parts`).

* :func:`gemm` — the ``fast`` and W4A16 GEMM on a datapath of :data:`DATAPATHS`;
* :func:`gemm_exact` — the ``exact`` mode (int4 × int4 codes per group, × both scales);
* :func:`gemm_nvfp4` — nvfp4 weights decoded exactly into fp16.

Datapaths measured and not adopted (the first ``[M, N]``-tile kernel ``f16``/``fp8``, the
benchmark-only ``fp8s``, the untimed ``f16h``/``fp8h``) were removed; their numbers stay in
docs/benchmarks.md. Triton is imported when the kernels are first built.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from .tensor_cache import TensorCache
from .triton_prologue import SPLIT_K_MAX_M, cdiv, small_m_splits

__all__ = ["DATAPATHS", "gemm", "gemm_exact", "gemm_nvfp4", "gemm_t", "split_k_parts", "scales_t", "row_pow2",
           "kernels"]

#: The GEMM datapaths a layer takes (see :func:`gemm`): ``f16t`` / ``fp8t`` (the ``fast`` mode,
#: :func:`svdq_kernels.triton_fast.fast_datapath`) and ``f16s`` (W4A16).
DATAPATHS = ("f16t", "fp8t", "f16s")


@functools.lru_cache(maxsize=1)
def kernels() -> dict[str, Any]:
    """The GEMM kernels, built on first use (Triton imported then)."""
    import triton
    import triton.language as tl

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
                     key=["M_BUCKET", "N", "K", "F16", "HAS_LR", "SCALED", "EXACT", "NVFP4", "SPLIT_K"])
    @triton.jit
    def gemm_t_kernel(
        q_ptr, a_ptr, w_ptr, wst_ptr, pw_ptr, lr_ptr, lrs_ptr, l1_ptr, b_ptr, y_ptr, M, N, K, R, M_BUCKET, one,
        GPS, F16: tl.constexpr, SCALED: tl.constexpr, EXACT: tl.constexpr, NVFP4: tl.constexpr,
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
        if NVFP4:
            s_ptrs = wst_ptr + rn_c[:, None] * (K // 16) + tl.arange(0, 4)[None, :] + g0 * 4
        else:
            s_ptrs = wst_ptr + rn_c + g0 * N
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        if SCALED:
            pw = tl.load(pw_ptr + rn_c)
        for g in range(g0, G):
            wp = tl.load(w_ptrs)
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
                    # code × scale × 2^e is exact in fp16 (see row_pow2): one accumulation chain
                    wv = w8.to(tl.float32) * (sc * pw)[:, None]
                    acc = tl.dot(wv.to(tl.float16), xb, acc)
                elif EXACT:
                    # int4 × int4 codes summed over one group: exact; then × (weight scale ×
                    # token-group scale), groups summed in order — the reference's own association
                    part = tl.dot(w8.to(tl.float16), xb)
                    axg = tl.load(a_ptr + g * M + rm_c)
                    acc += part * (sc[:, None] * axg[None, :])
                else:
                    if F16:
                        part = tl.dot(w8.to(tl.float16), xb.to(tl.float16))
                    else:
                        part = tl.dot(w8.to(tl.float16).to(tl.float8e4nv), xb)
                    acc += part * sc[:, None]
                s_ptrs += N
            w_ptrs += 32
            x_ptrs += 64
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

    return {"gemm_t": gemm_t_kernel, "splitk_reduce": splitk_reduce_kernel}


_SCALES_T: TensorCache[torch.Tensor] = TensorCache()


def scales_t(wscales: torch.Tensor) -> torch.Tensor:
    """``wscales.t().contiguous()``, cached per tensor object until it is modified or freed."""
    return _SCALES_T.get((wscales,), lambda: wscales.t().contiguous())


_POW2: TensorCache[Optional[torch.Tensor]] = TensorCache()


def row_pow2(wscales: torch.Tensor) -> Optional[torch.Tensor]:
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


def rank_block(r: int) -> int:
    """The GEMM epilogue's low-rank tile: the rank's power of two, 16 to 128."""
    return max(16, min(128, 1 << max(0, math.ceil(math.log2(max(r, 1))))))


def split_k_parts(m: int, n: int, kk: int) -> int:
    """How many parts K is cut into: 1, except at small M (≤ :data:`SPLIT_K_MAX_M` tokens, where
    one program per 128 output features leaves most SMs idle and each streams all of K alone),
    with :func:`~svdq_kernels.triton_prologue.small_m_splits`: enough parts for ~2 programs per
    SM (132 on an H100), each at least 8 groups of 64."""
    if m > SPLIT_K_MAX_M or not small_m_splits():
        return 1
    programs = max(1, cdiv(n, 128))
    return max(1, min(cdiv(264, programs), (kk // 64) // 8))


def gemm_t(
    x: torch.Tensor, a: Optional[torch.Tensor], weight: torch.Tensor, wsc: torch.Tensor, pw: Optional[torch.Tensor],
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, f16: bool = True, scaled: bool = False,
    exact: bool = False, nvfp4: bool = False, split_k: Optional[int] = None,
) -> torch.Tensor:
    """Launch the transposed GEMM kernel (its weight decodings are described in the kernel).

    ``split_k``: K cut into that many parts, each its own program (default :func:`split_k_parts`);
    the fp32 partials are summed in order by a second kernel.
    """
    m, kk = x.shape
    n = weight.shape[0]
    r = 0 if (lr is None or lora_up is None) else lr.shape[1]
    groups = kk // 64
    splits = split_k_parts(m, n, kk) if split_k is None else max(1, min(int(split_k), groups))
    gps = cdiv(groups, splits)
    splits = cdiv(groups, gps)  # no empty split
    y = torch.empty(m, n, device=x.device, dtype=out_dtype)
    out = y if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    bucket = 1 << max(4, math.ceil(math.log2(max(m, 1))))
    grid = lambda meta: (cdiv(m, meta["BM"]) * cdiv(n, meta["BN"]), splits)  # noqa: E731
    unused = y  # for the pointers a call leaves out (never read: their flags are off)
    k = kernels()
    k["gemm_t"][grid](
        x, a if a is not None else unused, weight, wsc, pw if pw is not None else unused, lr if r else unused,
        lora_scales if lora_scales is not None else unused, lora_up if r else unused,
        bias if bias is not None else unused, out, m, n, kk, r, bucket, 1.0, gps,
        F16=f16, SCALED=scaled, EXACT=exact, NVFP4=nvfp4, HAS_A=a is not None and not exact,
        HAS_LR=bool(r),
        HAS_LRS=lora_scales is not None and bool(r), HAS_BIAS=bias is not None, SPLIT_K=splits,
        BR=rank_block(r) if r <= 64 else 64, GROUP_N=8,
    )
    if splits > 1:
        block = 1024
        k["splitk_reduce"][(cdiv(m * n, block),)](out, y, m * n, S=splits, BLOCK=block)
    return y


def gemm(
    q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor,
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, datapath: str = "f16t",
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = (q ⊛ W) · a + (lr · diag(lora_scales)) · L1ᵀ + b`` with group-64 promotion.

    ``weight`` is the packed uint8 ``[N, K/2]``; ``wscales`` the layer's ``[N, K/64]`` (the
    kernel reads a ``[K/64, N]`` copy, :func:`scales_t`). ``datapath`` (:data:`DATAPATHS`):
    ``"f16t"`` promotes every 64-group to fp32 with its scale after an fp16 MMA (e4m3 and int4
    codes are exact in fp16), ``"fp8t"`` the same with the group's MMA in FP8 (Hopper FP8 MMAs
    accumulate with reduced precision: ~4e-4 relative), ``"f16s"`` folds the bf16 group scales
    exactly into fp16 weights (:func:`row_pow2`; fp16 ``q``, or e4m3 codes converted here) and
    runs one MMA chain over K — ``f16t`` where the scales cannot be folded exactly.
    ``split_k``: see :func:`gemm_t`.
    """
    if datapath not in DATAPATHS:
        raise ValueError(f"datapath {datapath!r} is not one of {DATAPATHS}")
    pw = None
    if datapath == "f16s":
        pw = row_pow2(wscales)
        if pw is None:  # scales whose products are not exact in fp16: the per-group datapath
            datapath = "f16t"
        elif q.dtype != torch.float16:
            q = q.to(torch.float16)  # e4m3 codes are exact in fp16 (prologue(codes16=True) writes these)
    return gemm_t(q, a, weight, scales_t(wscales), pw, lr, lora_up, bias, lora_scales, out_dtype=out_dtype,
                  f16=datapath in ("f16t", "f16s"), scaled=pw is not None, split_k=split_k)


def gemm_exact(
    codes: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor,
    lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype, split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = Σ_g (codes_g · W_gᵀ) · (scales_g ⊗ wscales_g) + (lr · diag(lora_scales)) · L1ᵀ + b``
    (the transposed kernel; int4 codes multiply exactly in fp16, one promotion per 64-group)."""
    return gemm_t(codes, scales, weight, scales_t(wscales), None, lr, lora_up, bias, lora_scales,
                   out_dtype=out_dtype, exact=True, split_k=split_k)


def gemm_nvfp4(
    xq: torch.Tensor, a: Optional[torch.Tensor], weight: torch.Tensor, wscales: torch.Tensor,
    wtscale: torch.Tensor, lr: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor], *, out_dtype: torch.dtype,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = (xq · Wᵀ) · wtscale · diag(a) + (lr · diag(lora_scales)) · L1ᵀ + b`` for nvfp4 weights
    (E2M1 nibbles, e4m3 scales per 16, fp32 per-tensor scale); ``xq`` fp16 ``[M, K]``."""
    wt = wtscale.reshape(1).to(device=xq.device, dtype=torch.float32)
    return gemm_t(xq, a, weight, wscales.contiguous().view(torch.uint8), wt, lr, lora_up, bias, lora_scales,
                   out_dtype=out_dtype, nvfp4=True, split_k=split_k)
