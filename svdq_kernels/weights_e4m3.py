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

import dataclasses
import functools
from typing import Any, Optional

import torch

__all__ = ["e4m3_weights", "PassBlocking", "TUNED_BLOCKINGS", "PASS_CANDIDATES", "default_blocking"]

@dataclasses.dataclass(frozen=True)
class PassBlocking:
    """How :func:`e4m3_weights` cuts the work: ``block_n`` rows × ``block_k`` codes per program,
    ``groups_per_step`` 64-groups loaded and stored at once (``block_k / 64`` of them: a single step
    of whole rows of ``block_k / 2`` bytes), ``num_warps``. Elementwise: every blocking writes the
    same bytes."""

    block_n: int = 64
    block_k: int = 256
    groups_per_step: int = 1
    num_warps: int = 4

    def check(self) -> None:
        """Raise ValueError unless the blocking is one the kernel takes."""
        pow2 = (self.block_n, self.block_k, self.groups_per_step, self.num_warps)
        if any(v < 1 or v & (v - 1) for v in pow2) or self.block_k < 64 or self.block_n < 16:
            raise ValueError(f"e4m3_weights blocking {self}: powers of two, block_n >= 16, block_k >= 64")
        if self.block_k % (64 * self.groups_per_step):
            raise ValueError(f"e4m3_weights blocking {self}: block_k is not a multiple of 64 x groups_per_step")


#: The blockings :func:`e4m3_weights` takes unless told, widest first: the first whose ``block_k``
#: divides K. Timed on an H100 (``fast8_preconverted.py --pass-sweep``,
#: ``benchmarks/results/fast8_pass_blockings_h100.json``) on the five FLUX.1 weight shapes:
#: 16 rows × 1024 codes, 16 groups a step, is 1.18–1.23× the first blocking (64 × 256, one group a step:
#: 1.8–2.0 TB/s → 2.2–2.3 TB/s); 32 × 512 (1.18–1.23×) and 64 × 256 with 4 groups (1.16–1.20×) take
#: the K that 1024 does not divide.
TUNED_BLOCKINGS: tuple[PassBlocking, ...] = (
    PassBlocking(16, 1024, 16), PassBlocking(32, 512, 8), PassBlocking(64, 256, 4),
)


def default_blocking(k: int) -> PassBlocking:
    """The widest of :data:`TUNED_BLOCKINGS` whose ``block_k`` divides ``k``.

    Raises:
        ValueError: When 256 does not divide ``k`` (no blocking fits).
    """
    for b in TUNED_BLOCKINGS:
        if k % b.block_k == 0:
            return b
    raise ValueError(f"e4m3_weights: K = {k} is not a multiple of 256")


#: The blockings ``benchmarks/fast8_preconverted.py --pass-sweep`` times beside the first one
#: (``PassBlocking()``: 64 × 256, one group a step, 55–60 % of HBM3's bandwidth): wider contiguous rows
#: per load and store, more rows; :data:`TUNED_BLOCKINGS` are three of them.
PASS_CANDIDATES: tuple[PassBlocking, ...] = (
    PassBlocking(64, 256, 4), PassBlocking(32, 512, 8), PassBlocking(64, 512, 8), PassBlocking(64, 512, 4),
    PassBlocking(128, 256, 4, 8), PassBlocking(32, 1024, 8), PassBlocking(64, 1024, 8, 8), PassBlocking(16, 1024, 16),
)


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_weights_kernel(codes_ptr, scales_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr,
                            GS: tl.constexpr):
        # codes: [N, K/2] bytes, byte j = nibble 2j | nibble 2j+1 << 4 (two's-complement int4);
        # scales: [K/64, N] fp16; out: [N, K] e4m3 bytes. GS 64-groups per step: [BN, GS, 32] bytes
        # in, each group's scale broadcast over its 32 bytes, [BN, 64·GS] e4m3 out
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = rn < N
        rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
        rg = tl.arange(0, GS)
        rb = tl.arange(0, 32)
        for step in tl.static_range(BK // (64 * GS)):
            k0 = tl.program_id(1) * BK + step * 64 * GS
            cols = k0 // 2 + rg[:, None] * 32 + rb[None, :]  # [GS, 32] byte columns
            byte = tl.load(codes_ptr + rn64[:, None, None] * (K // 2) + cols[None, :, :], mask=n_ok[:, None, None])
            s = tl.load(scales_ptr + (k0 // 64 + rg)[None, :] * N + rn64[:, None], mask=n_ok[:, None])[:, :, None]
            lo = ((byte & 15).to(tl.int32) ^ 8) - 8
            hi = ((byte >> 4).to(tl.int32) ^ 8) - 8
            # fp16 product (exact int4 × fp16, rounded once), then e4m3 nearest-even, saturating
            wlo = tl.clamp((lo.to(tl.float16) * s).to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
            whi = tl.clamp((hi.to(tl.float16) * s).to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
            w = tl.join(wlo.to(tl.uint8, bitcast=True), whi.to(tl.uint8, bitcast=True)).reshape(BN, 64 * GS)
            rk = tl.arange(0, 64 * GS)
            tl.store(out_ptr + rn64[:, None] * K + (k0 + rk)[None, :], w, mask=n_ok[:, None])

    return e4m3_weights_kernel


def e4m3_weights(qweight: torch.Tensor, scales16: torch.Tensor, *, blocking: Optional[PassBlocking] = None
                 ) -> torch.Tensor:
    """``w8 = e4m3(fp16(code × scales16))`` as a float8_e4m3fn ``[N, K]`` tensor (one Triton kernel).

    Args:
        qweight: Packed int4 codes ``[N, K/2]`` uint8, as stored (docs/format.md §3).
        scales16: The ``fast8`` group scales ``[K/64, N]`` float16
            (:func:`svdq_kernels.cutlass_fast8.fast8_weights`), contiguous.
        blocking: How the kernel cuts the work (:func:`default_blocking` of K unless given; every
            blocking writes the same bytes).

    Returns:
        The e4m3 weights, equal bit for bit to :func:`svdq_format.packing.fp8_weight_values`.

    Raises:
        ValueError: On a dtype or shape that does not fit the packing.
    """
    if qweight.dtype != torch.uint8 or scales16.dtype != torch.float16:
        raise ValueError(f"e4m3_weights wants uint8 codes and float16 scales, got {qweight.dtype} and {scales16.dtype}")
    n, half_k = qweight.shape
    k = 2 * half_k
    b = blocking or default_blocking(k)
    b.check()
    if k % b.block_k or tuple(scales16.shape) != (k // 64, n):
        raise ValueError(f"e4m3_weights: codes {tuple(qweight.shape)} and scales {tuple(scales16.shape)} do not "
                         f"make [N, K] weights with K a multiple of {b.block_k} and [K/64, N] scales")
    out = torch.empty(n, k, device=qweight.device, dtype=torch.float8_e4m3fn)
    grid = (-(-n // b.block_n), k // b.block_k)
    _kernel()[grid](qweight.contiguous(), scales16.contiguous(), out.view(torch.uint8), n, k,
                    BN=b.block_n, BK=b.block_k, GS=b.groups_per_step, num_warps=b.num_warps)
    return out
