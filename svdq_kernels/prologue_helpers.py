"""The Triton helpers (``@triton.jit`` functions called from inside kernels) that the ``fast8``
prologues' kernels share: the low-rank k-tile store (:mod:`svdq_kernels.lowrank_tiles`,
:mod:`svdq_kernels.triton_prologue`).

This module imports Triton: the kernel builders import it when they first build their kernels
(so importing the package stays free of Triton, and Triton's interpreter mode can still be chosen
before). A kernel that calls a helper binds it to a global of its own module first: Triton's
interpreter resolves a kernel's callees among its module's globals only.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["store_k_tiles"]


@triton.jit
def store_k_tiles(lr, a, rr, rm_c, m_ok, lr_ptr, ag_ptr, lrs_ptr, R, RT: tl.constexpr, HAS_LRS: tl.constexpr):
    """Write the low-rank k-tiles and ``a'`` of a block of rows, in the layout of
    :mod:`svdq_kernels.lowrank_tiles`, for the two kernels that make them
    (:func:`~svdq_kernels.lowrank_tiles.lowrank_tiles`, :func:`~svdq_kernels.lowrank_tiles.quantize_lowrank`'s
    second kernel): ``lr`` ``[BM, BR]`` fp32
    (``x · L2ᵀ``) times the per-rank scales (``HAS_LRS``), divided by ``a' = (a > 0 ? a : 1)``; ranks
    ``32j + c`` to column ``64j + c``, zeros to ``64j + 32 + c``; ``a'`` to ``ag_ptr``."""
    if HAS_LRS:
        lr = lr * tl.load(lrs_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
    ag = tl.where(a > 0, a, 1.0)
    val = tl.where((rr < R)[None, :], tl.math.div_rn(lr, ag[:, None]), 0.0).to(tl.bfloat16)
    col = (rr // 32) * 64 + rr % 32
    mask = m_ok[:, None] & (rr < RT)[None, :]
    tl.store(lr_ptr + rm_c[:, None] * (2 * RT) + col[None, :], val, mask=mask)
    tl.store(lr_ptr + rm_c[:, None] * (2 * RT) + 32 + col[None, :], tl.zeros_like(val), mask=mask)
    tl.store(ag_ptr + rm_c, ag, mask=m_ok)
