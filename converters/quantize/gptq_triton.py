"""GPTQ's column loop as one Triton kernel per block of columns (CUDA; Triton's interpreter on the CPU).

In :func:`converters.quantize.residual.gptq_int4` the columns of a block are quantized one after
the other, each pushing its error onto the block's later columns: a handful of small torch
operations per column, which on a GPU cost their launch overhead (~7 launches, tens of
microseconds, per column: ≈ 90 s over the 1.75 M columns of FLUX.1-dev). The rows of the
residual are independent of each other, so :func:`gptq_block` gives each program ``BN`` rows
and runs the block's whole column loop in registers: one launch per block of 128 columns.
The arithmetic is the torch loop's (same rounding: ``rint`` = round half to even, clamp to
−8..7, zero where the scale is zero); tests/test_gptq_interpreter.py checks them equal.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["available", "gptq_block"]


def available(device: torch.device) -> bool:
    """Whether :func:`gptq_block` runs for tensors on ``device`` (CUDA with Triton, or the CPU
    under Triton's interpreter, ``TRITON_INTERPRET=1``)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def gptq_block_kernel(w_ptr, q_ptr, e_ptr, s_ptr, inv_ptr, h_ptr, n, bs, stride_w, stride_s,
                          BN: tl.constexpr, BS: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.arange(0, BS)
        rmask = rows < n
        cmask = cols < bs
        m2 = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
        s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m2, other=0.0)
        inv = tl.load(inv_ptr + rows[:, None] * stride_s + cols[None, :], mask=m2, other=0.0)
        q = tl.zeros([BN, BS], dtype=tl.float32)
        e = tl.zeros([BN, BS], dtype=tl.float32)
        for j in range(0, bs):
            sel = cols[None, :] == j
            wj = tl.sum(tl.where(sel, w, 0.0), axis=1)
            sj = tl.sum(tl.where(sel, s, 0.0), axis=1)
            ij = tl.sum(tl.where(sel, inv, 0.0), axis=1)
            # round half to even, as torch.round (written out: no libdevice in the interpreter)
            x = wj * ij
            f = tl.floor(x)
            d = x - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
            code = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
            code = tl.minimum(tl.maximum(code, -8.0), 7.0)
            qj = code * sj
            hrow = tl.load(h_ptr + j * BS + cols, mask=cmask & (cols > j), other=0.0)
            djj = tl.load(h_ptr + j * BS + j)
            ej = (wj - qj) / djj
            w = w - ej[:, None] * hrow[None, :]
            q = tl.where(sel, qj[:, None], q)
            e = tl.where(sel, ej[:, None], e)
        tl.store(q_ptr + rows[:, None] * stride_w + cols[None, :], q, mask=m2)
        tl.store(e_ptr + rows[:, None] * stride_w + cols[None, :], e, mask=m2)

    return gptq_block_kernel


def gptq_block(w: torch.Tensor, s: torch.Tensor, inv: torch.Tensor, h: torch.Tensor,
               q: torch.Tensor, e: torch.Tensor, *, rows_per_program: int = 32) -> None:
    """One block of GPTQ columns, in place into ``q`` (quantized values) and ``e`` (scaled errors).

    Args:
        w: The block's columns ``[N, bs]`` (row-major, updated as the torch loop would leave
            them only in ``q``/``e``: ``w`` itself is not written).
        s: Their scales ``[N, bs]``; ``inv``: ``1/s`` (0 where ``s`` is 0).
        h: The block's ``[bs, bs]`` upper Cholesky factor of ``H⁻¹`` (padded to a power of two
            internally: pass it contiguous, ``bs`` ≤ 128).
        q, e: Outputs ``[N, bs]``, same strides as ``w``.
    """
    import triton

    n, bs = w.shape
    block = max(16, triton.next_power_of_2(bs))
    hp = torch.zeros(block, block, dtype=torch.float32, device=h.device)
    hp[:bs, :bs] = h
    hp[bs:, bs:].fill_diagonal_(1.0)
    grid = (triton.cdiv(n, rows_per_program),)
    _kernel()[grid](w, q, e, s, inv, hp, n, bs, w.stride(0), s.stride(0), BN=rows_per_program, BS=block)
