"""The 4-bit residual: fake-quantization through svdq_format.packing, int4 clipping search, GPTQ."""

from __future__ import annotations

import torch

from svdq_format import packing

__all__ = ["DEFAULT_CLIP_RATIOS", "dequantized_residual", "int4_clip_scales", "gptq_int4"]

#: Candidate clipping ratios of the int4 group scales (1.0 = plain absmax / 7).
DEFAULT_CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def dequantized_residual(
    r: torch.Tensor,
    precision: str,
    *,
    scale_dtype: torch.dtype = torch.bfloat16,
    int4_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q(R)`` as float32: quantize and dequantize with the format's own functions."""
    if precision == "int4":
        nib, scales = packing.quantize_int4(r, group_size=64, scale_dtype=scale_dtype, scales=int4_scales)
        return packing.dequantize_int4(nib, scales, group_size=64)
    nib, gs, ts = packing.quantize_nvfp4(r, group_size=16)
    return packing.dequantize_nvfp4(nib, gs, ts, group_size=16)


def int4_clip_scales(
    r: torch.Tensor,
    importance: torch.Tensor | None = None,
    *,
    ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Per-group int4 scales chosen among ``absmax·ratio/7`` to minimise the weighted error.

    Args:
        r: Residual ``[N, K]`` (smoothed domain).
        importance: Per-input-channel weight of the squared error ``[K]`` (e.g. mean x̂²);
            ``None`` = plain weight MSE.
        ratios: Candidate clipping ratios.
        scale_dtype: dtype the scales are stored in (rounding included in the search).

    Returns:
        Scales ``[N, K/64]`` in ``scale_dtype``, for ``SVDQLinear.set_residual(int4_scales=)``.
    """
    rf = r.float()
    n, k = rf.shape
    g = k // 64
    imp = torch.ones(k, device=rf.device) if importance is None else importance.float().to(rf.device)
    amax = packing.group_view(rf, 64).abs().amax(dim=-1)
    best_err = torch.full((n, g), float("inf"), device=rf.device)
    best = (amax / packing.INT4_MAX).to(scale_dtype)
    for ratio in ratios:
        scales = (amax * ratio / packing.INT4_MAX).to(scale_dtype)
        q = dequantized_residual(rf, "int4", scale_dtype=scale_dtype, int4_scales=scales)
        err = packing.group_view((q - rf).square() * imp, 64).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scales, best)
    return best


def gptq_int4(
    r: torch.Tensor,
    hessian: torch.Tensor,
    *,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on the residual: quantize columns in order, pushing each one's error onto the rest.

    Group scales (absmax/7 of the *updated* columns of a group, rounded to ``scale_dtype``) are
    fixed when the group starts. Returns the quantized-and-dequantized residual (exactly on
    the int4 grid of the returned scales, so ``set_residual(q, int4_scales=scales)`` stores
    the same codes) and the scales.

    Args:
        r: Residual ``[N, K]``.
        hessian: ``X̂ᵀX̂`` of the smoothed calibration inputs ``[K, K]``.
        scale_dtype: Scale dtype.
        damp: Diagonal dampening as a fraction of the mean diagonal.
        block: Columns per lazy-update block (a multiple of 64).
    """
    w = r.float().clone()
    n, k = w.shape
    h = hessian.float().clone().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, device=w.device) * (damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scales = torch.empty(n, k // 64, dtype=scale_dtype, device=w.device)
    q_all = torch.zeros_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        qb = torch.zeros_like(wb)
        errb = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % 64 == 0:
                grp = wb[:, j : j + 64]
                scales[:, col // 64] = (grp.abs().amax(dim=1) / packing.INT4_MAX).to(scale_dtype)
            s = scales[:, col // 64].float()
            # the same rounding as packing.quantize_int4 (round half even, clamp to −8..7)
            q = torch.where(s > 0, torch.round(wb[:, j] / torch.where(s > 0, s, 1.0)).clamp(-8, 7) * s, 0.0)
            qb[:, j] = q
            e = (wb[:, j] - q) / hb[j, j]
            wb[:, j:] -= e.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            errb[:, j] = e
        q_all[:, b0:b1] = qb
        w[:, b1:] -= errb @ hinv[b0:b1, b1:]
    return q_all, scales
