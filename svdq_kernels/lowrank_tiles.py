"""The ``fast8`` layer's low-rank branch as k-tiles of the GEMM (``Group64GemmConfig.lowrank``).

The CUTLASS group-64 mainloop can finish each output tile with bf16 MMAs of the low-rank up
projection into the same fp32 accumulator as the FP8 k-tiles (``csrc/svdq_sm90_mixed_input_g64.hpp``,
``LowRankUp``). Its epilogue multiplies the accumulator by ``rowinv[n] · a[m]``, so the branch
arrives pre-divided:

* ``lr [M, 64·t]`` bf16 — ``(x · L2ᵀ · lora_scales) / a'`` with ``a' = a`` where ``a > 0``, else 1
  (a row of zeros then still gets its low-rank term; the kernel takes ``a'`` as token scale). Low-rank
  k-tile ``j`` reads ranks ``32j … 32j+31`` from columns ``64j … 64j+31``; the other 32 columns
  of each 64 fill the B tile's 128-byte rows and are zero.
* ``l1 [N, 32·t]`` bf16 — ``L1 · p`` (``p = 1 / rowinv``, a power of two: exact), ranks padded
  with zeros to ``32·t``.
* the group scales get ``2·t`` extra rows holding the mainloop's sentinel (an fp16 NaN pattern no
  quantizer writes), by which the consumer warps recognise a low-rank k-tile.

:func:`quantize_lowrank` makes these and the FP8 activations from ``x`` in two kernels
(the default, ``SVDQ_FAST8_PROLOGUE=fused``; docs/kernels.md, "The fused prologue").

Against the two-step branch (a cuBLAS GEMM writing ``c = bias + lr · L1ᵀ`` in bf16, which the
epilogue reads back) this removes a kernel and an ``[M, N]`` bf16 write and read per layer; the
products are summed in fp32 and rounded once, with the output, instead of once into ``c`` and
again with the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch

from svdq_format.ops import smooth_reciprocal

from .tensor_cache import TensorCache

__all__ = ["LR_K", "LowrankStats", "lowrank_k_tiles", "lowrank_tiles", "quantize_lowrank", "quantize_lowrank_stats",
           "quantize_lowrank_codes", "padded_up", "padded_up64",
           "sentinel_scale_rows"]

#: Ranks per low-rank k-tile (the mainloop's ``LrK``).
LR_K = 32
#: The fp16 bit pattern of the mainloop's ``LrScaleSentinel``.
SENTINEL_BITS = 0x7E5B

_UPS: TensorCache[torch.Tensor] = TensorCache()

#: The shared Triton helpers (:mod:`svdq_kernels.prologue_helpers`), bound here when the kernels are
#: first built: Triton's interpreter resolves a kernel's callees among its module's globals.
store_k_tiles: Any = None
_UPS64: TensorCache[torch.Tensor] = TensorCache()


def lowrank_k_tiles(rank: int) -> int:
    """How many low-rank k-tiles a rank takes (``ceil(rank / 32)``)."""
    return -(-rank // LR_K)


def sentinel_scale_rows(tiles: int, n: int, *, device: torch.device) -> torch.Tensor:
    """``[2·tiles, n]`` fp16 rows of the sentinel (appended to the ``[K/64, N]`` group scales)."""
    bits = torch.full((2 * tiles, n), SENTINEL_BITS, dtype=torch.int16, device=device)
    return bits.view(torch.float16)


def padded_up(lora_up: torch.Tensor, rowinv: torch.Tensor) -> torch.Tensor:
    """``l1``: bf16 ``L1 / rowinv`` ``[N, 32·t]``, zero-padded ranks; cached per tensor and version."""
    def make() -> torch.Tensor:
        n, r = lora_up.shape
        out = torch.zeros(n, LR_K * lowrank_k_tiles(r), device=lora_up.device, dtype=torch.bfloat16)
        out[:, :r] = (lora_up.float() / rowinv.float().unsqueeze(1)).to(torch.bfloat16)
        return out

    return _UPS.get((lora_up, rowinv), make)


def padded_up64(lora_up: torch.Tensor, rowinv: torch.Tensor) -> torch.Tensor:
    """``l1`` of the pre-converted kernels (:class:`svdq_kernels.configs.SsLowrankGemmConfig`): bf16
    ``L1 / rowinv`` ``[N, 64·t]`` laid out like ``lr`` — ranks ``32j … 32j+31`` in columns
    ``64j … 64j+31``, zeros in the other 32 of each 64 (a low-rank k-tile of their A buffer holds
    64 bf16 per row, like the B buffer's ``lr``). The values are :func:`padded_up`'s; cached per
    tensor and version."""
    def make() -> torch.Tensor:
        up = padded_up(lora_up, rowinv)  # [N, 32·t]
        n, cols = up.shape
        out = torch.zeros(n, cols // LR_K, 2 * LR_K, device=up.device, dtype=torch.bfloat16)
        out[:, :, :LR_K] = up.view(n, cols // LR_K, LR_K)
        return out.view(n, 2 * cols)

    return _UPS64.get((lora_up, rowinv), make)


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    from . import prologue_helpers

    global store_k_tiles
    store_k_tiles = prologue_helpers.store_k_tiles

    @triton.jit
    def lowrank_tiles_kernel(plr_ptr, lr_ptr, a_ptr, ag_ptr, lrs_ptr, M, R, NSPLIT, HAS_LRS: tl.constexpr,
                             BM: tl.constexpr, PBR: tl.constexpr, BR: tl.constexpr, RT: tl.constexpr):
        # the low-rank partials summed in split order (as lowrank_sum does), times the per-rank
        # scales, divided by a' = (a > 0 ? a : 1); ranks 32j + c to column 64j + c, zeros to
        # 64j + 32 + c; a' to ag
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        m_ok = rm < M
        rm_c = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BR)
        lr = tl.zeros([BM, BR], dtype=tl.float32)
        for t in range(0, NSPLIT):
            lr += tl.load(plr_ptr + (t * M + rm_c[:, None]) * PBR + rr[None, :], mask=(rr < PBR)[None, :], other=0.0)
        a = tl.load(a_ptr + rm_c, mask=m_ok, other=1.0)
        store_k_tiles(lr, a, rr, rm_c, m_ok, lr_ptr, ag_ptr, lrs_ptr, R, RT, HAS_LRS)

    return lowrank_tiles_kernel


def lowrank_tiles(
    x: torch.Tensor, lora_down: torch.Tensor, a: torch.Tensor, *, lora_scales: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr [M, 64·t] bf16, a' [M] fp32)`` for the low-rank k-tiles (module docstring).

    Args:
        x: ``[M, K]`` contiguous bf16/fp16, the layer's raw input.
        lora_down: ``[r, K]`` in ``x.dtype``.
        a: ``[M]`` fp32 token scales of the FP8 activations.
        lora_scales: Optional per-rank multipliers ``[r]``.
    """
    from .triton_prologue import cdiv, lowrank_partials

    m = x.shape[0]
    r = lora_down.shape[0]
    rt = LR_K * lowrank_k_tiles(r)
    plr = lowrank_partials(x, lora_down)
    lr = torch.empty(m, 2 * rt, device=x.device, dtype=torch.bfloat16)
    ag = torch.empty(m, device=x.device, dtype=torch.float32)
    pbr = plr.shape[2]  # a power of two >= r, so max(pbr, 32) >= rt
    _kernel()[(cdiv(m, 32),)](
        plr, lr, a, ag, lora_scales if lora_scales is not None else plr, m, r, plr.shape[0],
        HAS_LRS=lora_scales is not None, BM=32, PBR=pbr, BR=max(pbr, LR_K), RT=rt, num_warps=4)
    return lr, ag


def quantize_lowrank(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, *, act_shift: float = 0.0,
    lora_scales: Optional[torch.Tensor] = None, codes_block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fast8`` activations and the GEMM's low-rank k-tiles with ``x`` read twice, not three
    times: :func:`svdq_kernels.triton_prologue.prologue`'s ``q`` and ``a`` and :func:`lowrank_tiles`'s
    ``lr``/``a'``, bit for bit, from two kernels — the stats kernel computes each split's absmax and
    its ``x · L2ᵀ`` partial in one pass (with the tiling of
    :func:`~svdq_kernels.triton_prologue.lowrank_partials`, so the same partial bits), then
    ``codes_tiles`` writes the codes and, from split 0, ``a``, ``a'`` and the k-tiles.

    Args:
        x: ``[M, K]`` contiguous, bf16 or fp16.
        smooth: ``[K]`` (its reciprocal is cached, :func:`svdq_format.ops.smooth_reciprocal`).
        lora_down: ``[r, K]`` in ``x.dtype``, r ≥ 1.
        act_shift: Added to ``x`` before smoothing (not on the low-rank branch).
        lora_scales: Optional per-rank multipliers ``[r]``.
        codes_block: Columns per step of the codes kernel (a power of two ≥ 64; elementwise, so
            the same bits whatever it is). 256: on an H100 at M = 4608 the prologue takes 29.4–145 µs
            against 32.0–150 µs at 64 (benchmarks/fast8_prologue.py, ``fast8_prologue_h100.json``).

    Returns:
        ``(q [M, K] float8_e4m3fn, a [M] float32, lr [M, 64·t] bf16, a' [M] float32)``.
    """
    stats = quantize_lowrank_stats(x, smooth, lora_down, act_shift=act_shift)
    return quantize_lowrank_codes(x, stats, lora_scales=lora_scales, codes_block=codes_block)


@dataclasses.dataclass(frozen=True)
class LowrankStats:
    """What :func:`quantize_lowrank`'s first kernel leaves for its second: per K split, each row's
    absmax of ``x̂`` and its ``x · L2ᵀ`` partial."""

    pamax: torch.Tensor  #: ``[splits, M]`` fp32
    plr: torch.Tensor  #: ``[splits, M, BR]`` fp32 (``BR``: the rank tile, ``triton_prologue.rank_tile``)
    rcp: torch.Tensor  #: ``1/s``, the cached reciprocal of the smoothing vector
    rank: int
    groups_per_split: int
    act_shift: float


def quantize_lowrank_stats(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, *, act_shift: float = 0.0,
) -> LowrankStats:
    """:func:`quantize_lowrank`'s first kernel (x read once: absmax and ``x · L2ᵀ`` per split), alone
    so that benchmarks can time it; same arguments."""
    from .triton_prologue import cdiv, k_splits, kernels, rank_tile

    m, kk = x.shape
    r = lora_down.shape[0]
    rcp = smooth_reciprocal(smooth)
    br = rank_tile(r)
    nsplit, bps = k_splits(kk, m)
    pamax = torch.empty(nsplit, m, device=x.device, dtype=torch.float32)
    plr = torch.empty(nsplit, m, br, device=x.device, dtype=torch.float32)
    # lowrank_partials' tiling (block_m 64, 8 warps, 4 stages): the same x · L2ᵀ partial bits
    kernels()["prologue_stats"][(cdiv(m, 64), nsplit)](
        x, rcp, lora_down, pamax, plr, m, kk, r, bps, float(act_shift), HAS_LR=True, BM=64, BR=br, RCP=True,
        num_warps=8, num_stages=4)
    return LowrankStats(pamax, plr, rcp, r, bps, float(act_shift))


def quantize_lowrank_codes(
    x: torch.Tensor, stats: LowrankStats, *, lora_scales: Optional[torch.Tensor] = None, codes_block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_lowrank`'s second kernel (x read again for the codes; the k-tiles from the
    partials), alone so that benchmarks can time it: ``(q, a, lr, a')`` as :func:`quantize_lowrank`."""
    from .triton_prologue import cdiv, kernels

    m, kk = x.shape
    nsplit, br = stats.pamax.shape[0], stats.plr.shape[2]
    rt = LR_K * lowrank_k_tiles(stats.rank)
    q = torch.empty(m, kk, device=x.device, dtype=torch.float8_e4m3fn)
    a = torch.empty(m, device=x.device, dtype=torch.float32)
    ag = torch.empty(m, device=x.device, dtype=torch.float32)
    lr = torch.empty(m, 2 * rt, device=x.device, dtype=torch.bfloat16)
    kernels()["codes_tiles"][(cdiv(m, 32), nsplit)](
        x, stats.rcp, stats.pamax, stats.plr, q, a, lr, ag, lora_scales if lora_scales is not None else a, m, kk,
        stats.rank, stats.groups_per_split, nsplit, stats.act_shift, HAS_LRS=lora_scales is not None, BM=32, PBR=br,
        BR=max(br, LR_K), RT=rt, BK=codes_block, num_warps=4, num_stages=3)
    return q, a, lr, ag
