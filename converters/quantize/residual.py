"""The 4-bit residual: fake-quantization through svdq_format.packing, int4 clipping search, GPTQ."""

from __future__ import annotations

import torch

from svdq_format import packing

__all__ = ["DEFAULT_CLIP_RATIOS", "DEFAULT_GPTQ_DAMP", "dequantized_residual", "int4_clip_scales", "gptq_int4"]

#: Candidate clipping ratios of the int4 group scales (1.0 = plain absmax / 7).
DEFAULT_CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)

#: GPTQ's diagonal damping as a fraction of the Hessian's mean diagonal (the paper: 0.01).
DEFAULT_GPTQ_DAMP = 1.0


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
    scales: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = DEFAULT_GPTQ_DAMP,
    act_order: bool = True,
    block: int = 128,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022) on an int4 residual with fixed group scales.

    Columns are quantized one at a time (in decreasing order of the Hessian's diagonal with
    ``act_order``), each one's rounding error pushed onto the columns not yet quantized through
    the upper Cholesky factor of ``H⁻¹``; inside a block of ``block`` columns the update is
    applied column by column, to the rest of the matrix once per block (the lazy batch
    updates of the paper). The group scales are fixed beforehand (the format's groups are 64
    consecutive input channels, which act-order visits out of order); pass the clipping
    search's scales, or absmax/7 is used.

    ``damp`` adds ``damp · mean(diag H)`` to the diagonal. With few calibration rows per input
    channel (X̂ᵀX̂ rank-deficient), the paper's 1 % overfits those rows and makes held-out
    outputs worse; 1.0 measured best on MiniLM from 16 to 512 rows (docs/quantization.md).

    Args:
        r: Residual ``[N, K]`` (smoothed domain).
        hessian: ``X̂ᵀX̂`` of the smoothed calibration inputs ``[K, K]`` (any positive scale).
        scales: Group scales ``[N, K/64]`` (stored dtype), or None for absmax/7.
        scale_dtype: dtype of computed scales.
        damp: Diagonal damping, a fraction of the mean diagonal.
        act_order: Quantize columns in decreasing order of ``diag(H)``.
        block: Columns per lazy-update block (≤ 128 with the Triton kernel).
        kernel: The column loop: ``"torch"`` (a few operations per column), ``"triton"`` (one
            launch per block: :mod:`converters.quantize.gptq_triton`) or ``"auto"`` (Triton on
            CUDA when installed; the environment variable ``SVDQ_GPTQ_KERNEL=torch`` or
            ``triton`` overrides it). Both give the same result.

    Returns:
        ``(q, scales)``: the quantized-and-dequantized residual (float32, exactly on the int4
        grid of ``scales``, so ``set_residual(q, int4_scales=scales)`` stores these codes) and
        the scales.
    """
    n, k = r.shape
    dev = r.device
    if scales is None:
        scales = (packing.group_view(r.float(), 64).abs().amax(dim=-1) / packing.INT4_MAX).to(scale_dtype)
    h = hessian.to(dev, torch.float32, copy=True)
    diag = torch.diagonal(h)
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = mean  # channels calibration never saw: quantized by rounding, no error pushed through them
    diag += damp * mean
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k, device=dev)
    h = h[perm][:, perm]
    hinv = _upper_inverse_cholesky(h)
    if kernel == "auto":
        import os

        from . import gptq_triton

        kernel = os.environ.get("SVDQ_GPTQ_KERNEL", "auto")
        if kernel not in ("torch", "triton"):
            kernel = "triton" if r.device.type == "cuda" and gptq_triton.available(r.device) else "torch"
    if kernel == "triton":
        q = _columns_triton(r.float()[:, perm].contiguous(), scales.float().repeat_interleave(64, dim=1)[:, perm],
                            hinv, block)
    else:
        q = _columns_torch(r.float().T[perm].contiguous(), scales.float().T.repeat_interleave(64, dim=0)[perm],
                           hinv, block).T
    out = torch.empty_like(q)
    out[:, perm] = q
    return out, scales


def _inverse_scales(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)


def _columns_torch(w: torch.Tensor, s: torch.Tensor, hinv: torch.Tensor, block: int) -> torch.Tensor:
    """GPTQ's column loop on the transposed residual ``[K, N]`` (column j = row j: contiguous
    updates); ``s``: the scale of every element ``[K, N]``. Returns ``Q(R)ᵀ``."""
    k, n = w.shape
    inv = _inverse_scales(s)
    q = torch.empty_like(w)
    err = torch.empty(min(block, k), n, device=w.device)
    code = torch.empty(n, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, hb, eb = w[b0:b1], hinv[b0:b1, b0:b1], err[: b1 - b0]
        for j in range(b1 - b0):
            torch.mul(wb[j], inv[b0 + j], out=code).round_().clamp_(-8.0, float(packing.INT4_MAX))
            torch.mul(code, s[b0 + j], out=q[b0 + j])
            torch.sub(wb[j], q[b0 + j], out=eb[j]).div_(hb[j, j])
            if j + 1 < b1 - b0:
                wb[j + 1 :].addr_(hb[j, j + 1 :], eb[j], alpha=-1.0)
        if b1 < k:
            w[b1:].addmm_(hinv[b0:b1, b1:].T, eb, alpha=-1.0)
    return q


def _columns_triton(w: torch.Tensor, s: torch.Tensor, hinv: torch.Tensor, block: int) -> torch.Tensor:
    """The same loop on the row-major residual ``[N, K]``, one Triton launch per block of columns."""
    from .gptq_triton import gptq_block

    n, k = w.shape
    block = min(block, 128)
    s = s.contiguous()
    inv = _inverse_scales(s)
    q = torch.empty_like(w)
    err = torch.empty_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        gptq_block(w[:, b0:b1], s[:, b0:b1], inv[:, b0:b1], hinv[b0:b1, b0:b1].contiguous(), q[:, b0:b1],
                   err[:, b0:b1])
        if b1 < k:
            w[:, b1:].addmm_(err[:, b0:b1], hinv[b0:b1, b1:], alpha=-1.0)
    return q


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h⁻¹`` (GPTQ's form), with more damping if ``h`` is numerically
    not positive definite."""
    extra = 0.0
    mean = float(torch.diagonal(h).mean())
    for _ in range(6):
        hh = h if not extra else h + extra * mean * torch.eye(h.shape[0], device=h.device)
        low, info = torch.linalg.cholesky_ex(hh)
        if int(info) == 0:
            inv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return up
        extra = 0.01 if not extra else extra * 10
    raise torch.linalg.LinAlgError("GPTQ: the damped Hessian is not positive definite")
