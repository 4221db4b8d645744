"""The low-rank branch: top-r factors of the smoothed weight, exact or randomised SVD.

Shared by ``SVDQLinear.from_linear`` and the quantizer (``converters.quantize``), so both pick
the same method by the same ``"auto"`` rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["LOWRANK_METHODS", "lowrank_factors"]

LOWRANK_METHODS = ("auto", "svd", "randomized")


def lowrank_factors(
    w: torch.Tensor, rank: int, *, method: str = "auto", niter: int = 4, oversample: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation ``w ≈ up @ down`` (float32).

    Args:
        w: ``[N, K]`` matrix (any float dtype; computed in float32 on its device).
        rank: r (0 gives empty factors).
        method: ``"svd"`` (exact, ``torch.linalg.svd``), ``"randomized"``
            (``torch.svd_lowrank`` with ``oversample`` extra columns and ``niter`` power
            iterations: same error to well under 1 % on weight spectra, much faster on large
            layers), or ``"auto"`` (exact only when min(N, K) ≤ 4·(rank + oversample)).
        niter: Power iterations of the randomised method.
        oversample: Extra sketch columns of the randomised method.

    Returns:
        ``(up [N, r] = U·S, down [r, K] = Vᵀ)``. The randomised method draws from torch's
        global generator: seed it for determinism.
    """
    wf = w.float()
    n, k = wf.shape
    if rank <= 0:
        return wf.new_zeros(n, 0), wf.new_zeros(0, k)
    if method not in LOWRANK_METHODS:
        raise ValueError(f"low-rank method {method!r} is not one of {LOWRANK_METHODS}")
    if method == "auto":
        method = "svd" if min(n, k) <= 4 * (rank + oversample) else "randomized"
    with _small_cpu_threads(wf):
        if method == "svd" or rank + oversample >= min(n, k):
            u, s, vh = torch.linalg.svd(wf, full_matrices=False)
            return u[:, :rank] * s[:rank], vh[:rank]
        u, s, v = torch.svd_lowrank(wf, q=rank + oversample, niter=niter)
    return u[:, :rank] * s[:rank], v[:, :rank].T.contiguous()


@contextlib.contextmanager
def _small_cpu_threads(w: torch.Tensor) -> Iterator[None]:
    """One CPU thread for small CPU SVDs: LAPACK's threading only adds synchronisation there
    (10-100x slower on a busy machine), and the result does not depend on the thread count."""
    if w.device.type != "cpu" or w.numel() > (1 << 20) or torch.get_num_threads() == 1:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
