"""The W4A16 GEMV: int4 weight-only layers at a few tokens (the AdaLN modulations of a batch-1 step).

At M ≤ :data:`GEMV_MAX_M` a weight-only layer is a matrix-vector product: it reads every weight byte
once and does two FLOPs per weight, so its time is the weight bytes over the memory bandwidth. The
transposed GEMM (:func:`svdq_kernels.triton_gemm.gemm_t`) pads the tokens to an MMA tile of 16 and walks
K one 64-group (32 bytes of each weight row) at a time; this kernel reads ``block_k / 2`` contiguous
bytes of ``block_n`` rows a step, decodes them in registers, multiplies by the group scales (the
canonical ``[N, K/64]`` layout: each row's scales are contiguous too) and by ``x̂`` in fp32, and sums
along K; no MMA.

Same inputs and meaning as :func:`svdq_kernels.triton_gemm.gemm` on the ``f16s`` datapath (``q`` the
W4A16 prologue's fp16 ``x̂ / a``, ``a`` its per-token power of two, ``lr`` its fp32 ``x̂ · L2ᵀ``):

    y = (Σ_k code · wscale · q) · a + (lr · diag(lora_scales)) · L1ᵀ + b

in fp32 (the products ``code · wscale · q`` are rounded to fp32 where the MMA's fp16 × fp16 products
are exact: ~1e-7 relative), rounded once to the output dtype. Triton is imported when the kernel is
first built.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Optional

import torch

__all__ = ["GEMV_MAX_M", "GemvBlocking", "GEMV_CANDIDATES", "default_gemv_blocking", "gemv"]

def _max_m_setting(default: int) -> int:
    """``SVDQ_GEMV_MAX_M`` as a token count; ``default`` when unset or empty, and (with a warning) when
    it is not a count: a typo must not stop a model from running."""
    raw = os.environ.get("SVDQ_GEMV_MAX_M", "").strip()
    if not raw:
        return default
    if raw.isdigit():
        return int(raw)
    warnings.warn(f"SVDQ_GEMV_MAX_M={raw!r} is not a token count; using {default}", stacklevel=2)
    return default


#: Up to this many tokens a W4A16 layer takes :func:`gemv` (``triton_fast.w4a16_linear``): one, the case
#: timed on an H100 (1.28–1.32× the ``f16s`` GEMM on the AdaLN shapes; :func:`default_gemv_blocking`);
#: ``SVDQ_GEMV_MAX_M`` sets it (0: the transposed GEMM at every M; the kernel takes any M, its GPU test
#: runs 1–4 tokens).
GEMV_MAX_M = _max_m_setting(1)


@dataclasses.dataclass(frozen=True)
class GemvBlocking:
    """How :func:`gemv` cuts the work: ``block_n`` weight rows per program, ``block_k`` codes
    (``block_k / 2`` bytes of each row) per step, ``num_warps``, and where the K sum happens."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    #: Sum along K once at the end (an fp32 ``[block_n, tokens, block_k]`` accumulator of products)
    #: rather than at every step (a ``[block_n, tokens]`` one, a cross-thread reduction per step).
    tile_accumulator: bool = True

    def check(self) -> None:
        """Raise ValueError unless the blocking is one the kernel takes."""
        v = (self.block_n, self.block_k, self.num_warps)
        if any(x < 1 or x & (x - 1) for x in v) or self.block_k < 64 or self.block_n < 4:
            raise ValueError(f"gemv blocking {self}: powers of two, block_n >= 4, block_k >= 64")


#: The blockings ``benchmarks/w4a16_gemv.py`` times beside the transposed GEMM: 16–64 weight codes a
#: thread a step, the K sum per tile or per step.
GEMV_CANDIDATES: tuple[GemvBlocking, ...] = (
    GemvBlocking(8, 1024, 8), GemvBlocking(16, 512, 8), GemvBlocking(8, 512, 4), GemvBlocking(4, 1024, 4),
    GemvBlocking(16, 256, 4), GemvBlocking(8, 512, 8), GemvBlocking(32, 512, 8), GemvBlocking(16, 512, 4),
    GemvBlocking(8, 1024, 8, False), GemvBlocking(16, 512, 8, False), GemvBlocking(8, 512, 4, False),
)


def default_gemv_blocking(m: int) -> GemvBlocking:
    """The blocking :func:`gemv` takes for ``m`` tokens: 16 weight rows and ``256 / m_pow2`` codes a step
    over 4 warps, the K sum per tile (``16 × m_pow2 × block_k`` fp32 products: 32 a thread). At one token
    on an H100 (``benchmarks/results/w4a16_gemv_h100.json``) 16 × 256 was the fastest of the
    candidates: 33.8 µs against the ``f16s`` GEMM's 44.7 at 3072 → 18432 (1.32×), 19.1 against 24.5
    at 3072 → 9216 (1.28×); 8 × 1024 over 8 warps, the first pick, was 0.88–0.90×."""
    return GemvBlocking(16, max(64, 256 // _pow2(m)), 4)


def _pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(q_ptr, a_ptr, w_ptr, s_ptr, lr_ptr, lrs_ptr, up_ptr, b_ptr, y_ptr, M, N, K, R,
                    MB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, TILE_ACC: tl.constexpr,
                    HAS_LR: tl.constexpr, HAS_LRS: tl.constexpr, HAS_BIAS: tl.constexpr):
        # w: [N, K/2] bytes (byte j: code 2j low nibble, 2j+1 high, two's complement); s: [N, K/64]
        # group scales; q: [M, K] fp16; a: [M] fp32; lr: [M, R] fp32; up: [N, R]; y: [M, N]
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
        rm = tl.arange(0, MB)
        m_ok = rm < M
        rb = tl.arange(0, BK // 2)
        rg = tl.arange(0, BK // 64)
        rk = tl.arange(0, BK)
        acc = tl.zeros([BN, MB], dtype=tl.float32)
        acc3 = tl.zeros([BN, MB, BK if TILE_ACC else 1], dtype=tl.float32)
        for k0 in range(0, K, BK):
            byte = tl.load(w_ptr + rn64[:, None] * (K // 2) + (k0 // 2 + rb)[None, :],
                           mask=n_ok[:, None] & (k0 // 2 + rb < K // 2)[None, :], other=0)
            lo = ((byte & 15).to(tl.int32) ^ 8) - 8
            hi = ((byte >> 4).to(tl.int32) ^ 8) - 8
            code = tl.join(lo, hi).reshape(BN, BK).to(tl.float32)
            sc = tl.load(s_ptr + rn64[:, None] * (K // 64) + (k0 // 64 + rg)[None, :],
                         mask=n_ok[:, None] & (k0 // 64 + rg < K // 64)[None, :], other=0.0).to(tl.float32)
            w = (code.reshape(BN, BK // 64, 64) * sc[:, :, None]).reshape(BN, BK)
            x = tl.load(q_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None] & (k0 + rk < K)[None, :],
                        other=0.0).to(tl.float32)
            if TILE_ACC:
                acc3 += w[:, None, :] * x[None, :, :]
            else:
                acc += tl.sum(w[:, None, :] * x[None, :, :], axis=2)
        if TILE_ACC:
            acc = tl.sum(acc3, axis=2)
        acc = acc * tl.load(a_ptr + rm, mask=m_ok, other=0.0)[None, :]
        if HAS_LR:
            for r0 in range(0, R, BR):
                rr = r0 + tl.arange(0, BR)
                r_ok = rr < R
                lr = tl.load(lr_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                if HAS_LRS:
                    lr = lr * tl.load(lrs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
                up = tl.load(up_ptr + rn64[:, None] * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                             other=0.0).to(tl.float32)
                acc += tl.sum(up[:, None, :] * lr[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn64[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])

    return gemv_kernel


def gemv(
    q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, wscales: torch.Tensor, lr: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor], *,
    out_dtype: torch.dtype, blocking: Optional[GemvBlocking] = None,
) -> torch.Tensor:
    """``y = (q ⊛ W) · a + (lr · diag(lora_scales)) · L1ᵀ + b`` for a few tokens (one Triton kernel).

    Args:
        q: ``[M, K]`` fp16 (the W4A16 prologue's ``x̂ / a``), M ≥ 1.
        a: ``[M]`` float32 token scales.
        weight: Packed int4 codes ``[N, K/2]`` uint8 (docs/format.md §3).
        wscales: Group scales ``[N, K/64]`` (the layer's, any float dtype).
        lr: ``[M, r]`` float32 ``x̂ · L2ᵀ`` or None.
        lora_up: ``[N, r]`` (``L1``) or None.
        bias: ``[N]`` or None.
        lora_scales: ``[r]`` per-rank strengths or None.
        out_dtype: The output's dtype.
        blocking: How the kernel cuts the work (:func:`default_gemv_blocking` unless given).

    Returns:
        ``[M, N]`` in ``out_dtype``.

    Raises:
        ValueError: On shapes or dtypes that do not fit.
    """
    m, kk = q.shape
    n = weight.shape[0]
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (n, kk // 2) or kk % 64:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} {weight.dtype} does not pack K = {kk} "
                         "(uint8 [N, K/2], K a multiple of 64)")
    if tuple(wscales.shape) != (n, kk // 64):
        raise ValueError(f"gemv: scales {tuple(wscales.shape)} are not [N, K/64] = [{n}, {kk // 64}]")
    b = blocking or default_gemv_blocking(m)
    b.check()
    y = torch.empty(m, n, device=q.device, dtype=out_dtype)
    unused = y  # for the pointers a call leaves out (never read: their flags are off)
    lr_t, up_t, r = unused, unused, 0
    if lr is not None and lora_up is not None:
        lr_t, up_t, r = lr.contiguous(), lora_up.contiguous(), lr.shape[1]
    _kernel()[(-(-n // b.block_n),)](
        q.contiguous(), a.contiguous(), weight.contiguous(), wscales.contiguous(), lr_t,
        lora_scales if (r and lora_scales is not None) else unused, up_t, bias if bias is not None else unused,
        y, m, n, kk, r,
        MB=_pow2(m), BN=b.block_n, BK=b.block_k, BR=min(32, _pow2(max(r, 1))) if r else 16, TILE_ACC=b.tile_accumulator,
        HAS_LR=bool(r), HAS_LRS=bool(r) and lora_scales is not None, HAS_BIAS=bias is not None,
        num_warps=b.num_warps,
    )
    return y
