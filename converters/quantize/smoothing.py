"""Smoothing search and the per-layer SVDQ construction it scores.

For an input group (one linear, or several reading the same input, e.g. q/k/v) the search
tries ``s = 1`` and ``s(α) = amax_x^α / amax_w^(1−α)`` (clamped, normalised to geometric mean 1)
for every α of the grid, builds the *whole* SVDQ approximation of each member for that ``s``
(low-rank branch from the SVD of ``W·diag(s)``, 4-bit residual, 4-bit activations) and scores
the summed relative output error on the calibration rows. The best ``s`` is shared by the group.

Scoring uses :func:`simulated_output`: the layer output computed from dequantized tensors,
``(Q(x/s) values·scales) @ Q(R)ᵀ + (x·L2ᵀ)·L1ᵀ``, which equals ``SVDQLinear.forward`` up to
float32 summation order (tests/test_quantize_layer.py checks it) and is one matmul instead of
one per K-group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from svdq_format import packing
from svdq_format.spec import KSegment

from .lowrank import lowrank_factors
from .residual import dequantized_residual

__all__ = [
    "smoothing_vector",
    "Approximation",
    "approximate",
    "refit_lowrank",
    "simulated_output",
    "relative_error",
    "shift_correction",
    "search_smoothing",
    "group_smoothing_vector",
    "SmoothingChoice",
]


def smoothing_vector(
    amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float, *, beta: float | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """``s = amax_x^α / amax_w^β`` (β = 1 − α by default), clamped, normalised to geometric mean 1."""
    beta = 1.0 - alpha if beta is None else beta
    ax = amax_x.float().clamp_min(eps)
    aw = amax_w.float().clamp_min(eps)
    s = (ax.pow(alpha) / aw.pow(beta)).clamp(min=eps, max=1.0 / eps)
    s = s / torch.exp(torch.log(s).mean())
    return s.clamp(min=eps, max=1.0 / eps)


@dataclasses.dataclass
class Approximation:
    """An SVDQ layer as float tensors, with every stored value already rounded as stored.

    Attributes:
        smooth: ``s`` as stored (compute dtype → float32) ``[K]``.
        up: ``L1`` ``[N, r]`` (stored rounding).
        down: ``L2`` on the raw input, ``[r, K]`` (stored rounding).
        residual: ``R = W·diag(s) − L1·L2·diag(s)`` (float32, before 4-bit quantization).
    """

    smooth: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    residual: torch.Tensor


def approximate(
    w: torch.Tensor,
    smooth: torch.Tensor | None,
    rank: int,
    *,
    precision: str,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    lowrank: str = "auto",
    refine_iters: int = 0,
    niter: int = 4,
) -> Approximation:
    """Low-rank + residual decomposition of ``W·diag(s)`` (what ``SVDQLinear.from_linear`` does,
    with a choice of SVD method and optional refinement ``L1·L2 ← SVD_r(Ŵ − Q(R))``)."""
    wf = w.float()
    k = wf.shape[1]
    s = torch.ones(k, device=wf.device) if smooth is None else smooth.to(wf.device)
    s = s.to(dtype).float()
    w_hat = wf * s
    up, vh = lowrank_factors(w_hat, rank, method=lowrank, niter=niter)
    for _ in range(refine_iters):
        q = dequantized_residual(w_hat - up @ vh, precision, scale_dtype=scale_dtype)
        up, vh = lowrank_factors(w_hat - q, rank, method=lowrank, niter=niter)
    return _stored(w_hat, s, up, vh, dtype)


def refit_lowrank(
    w: torch.Tensor, smooth: torch.Tensor, qres: torch.Tensor, rank: int, *, dtype: torch.dtype,
    lowrank: str = "auto", niter: int = 4,
) -> Approximation:
    """The low-rank branch re-fitted to what a fixed 4-bit residual leaves: ``L1·L2 ←
    SVD_r(Ŵ − Q(R))`` (``smooth`` as stored, e.g. ``Approximation.smooth``); the returned
    ``residual`` is ``Ŵ − L1·L2`` with the new factors as stored."""
    w_hat = w.float() * smooth
    up, vh = lowrank_factors(w_hat - qres, rank, method=lowrank, niter=niter)
    return _stored(w_hat, smooth, up, vh, dtype)


def _stored(w_hat: torch.Tensor, s: torch.Tensor, up: torch.Tensor, vh: torch.Tensor,
            dtype: torch.dtype) -> Approximation:
    """Factors rounded as stored (``down`` on the raw input) and the residual they leave."""
    up_st = up.to(dtype).float()
    down_st = (vh / s).to(dtype).float()
    residual = w_hat - up_st @ (down_st * s) if up.shape[1] > 0 else w_hat
    return Approximation(s, up_st, down_st, residual)


def simulated_output(
    x: torch.Tensor,
    *,
    smooth: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    qres: torch.Tensor,
    precision: str,
    act_quant: bool,
    act_shift: float = 0.0,
    k_segments: tuple[KSegment, ...] = (),
) -> torch.Tensor:
    """SVDQ layer output (no bias) from dequantized tensors, float32 ``[M, N]``.

    With ``act_shift`` (post-GELU inputs), the 4-bit branch sees ``(x + shift) / s`` with
    unsigned int4 codes, and the output includes the bias correction ``−Q(R)·(shift/s)`` that
    the stored bias carries (docs/format.md §7.2). With ``k_segments`` (then ``act_shift`` is 0)
    each segment of the input channels has its own shift and signedness (§7.4).

    Args:
        x: Raw inputs ``[M, K]``.
        smooth: ``s`` ``[K]``.
        up, down: Low-rank factors (``down`` on the raw input).
        qres: Dequantized residual ``Q(R)`` ``[N, K]`` (smoothed domain).
        precision: Activation quantizer (``"int4"``/``"nvfp4"``).
        act_quant: Quantize activations (W4A4) or not (W4A16).
    """
    xf = x.float()
    shift = segment_shift(k_segments, device=xf.device) if k_segments else act_shift
    xs = (xf + shift) / smooth if k_segments or act_shift else xf / smooth
    if act_quant:
        g = packing.GROUP_SIZES[precision]
        parts, lo = [], 0
        for seg in k_segments or (KSegment(xs.shape[1], act_shift, bool(act_shift)),):
            vals, scales = packing.quantize_activations(xs[:, lo : lo + seg.size], precision,
                                                        unsigned=seg.act_unsigned)
            parts.append((packing.group_view(vals, g) * scales.unsqueeze(-1)).reshape(vals.shape))
            lo += seg.size
        xs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    y = xs @ qres.T
    if k_segments or act_shift:
        y = y - shift_correction(qres, smooth, shift)
    if up.shape[1]:
        y = y + (xf @ down.T) @ up.T
    return y


def shift_correction(qres: torch.Tensor, smooth: torch.Tensor, act_shift: float | torch.Tensor) -> torch.Tensor:
    """``Q(R) · (shift / s)`` ``[N]``: what the shifted 4-bit branch adds, removed via the bias
    (``act_shift``: a number, or the per-channel vector of a layer with k-segments)."""
    return qres @ (act_shift / smooth)


def segment_shift(k_segments: tuple[KSegment, ...], *, device: torch.device | None = None) -> torch.Tensor:
    """The per-channel float32 shift vector ``[K]`` of a layer's k-segments."""
    return torch.cat([torch.full((seg.size,), float(seg.act_shift), device=device) for seg in k_segments])


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖y − ref‖_F / ‖ref‖_F`` (float; 0 when both are zero)."""
    num = (y.float() - ref.float()).norm()
    den = ref.float().norm()
    return float(num / den) if float(den) > 0 else float(num)


def search_smoothing(
    weights: list[torch.Tensor],
    rows: list[torch.Tensor],
    amax_x: torch.Tensor,
    *,
    rank: int,
    precision: str,
    act_quant: bool,
    alphas: tuple[float, ...],
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    lowrank: str = "auto",
    shifts: tuple[float, ...] = (0.0,),
    activation_alphas: tuple[float, ...] = (),
    k_segments: tuple[KSegment, ...] = (),
) -> tuple[torch.Tensor | None, tuple[float, float] | None, float, list[tuple[Any, float, float]]]:
    """Pick the smoothing vector of an input group by the whole-layer output error.

    Args:
        weights: The members' weights ``[N_i, K]``.
        rows: Calibration rows per member ``[m_i, K]`` (float32, on the weights' device).
        amax_x: Per-channel input absmax ``[K]``.
        rank, precision, act_quant, dtype, scale_dtype, lowrank: As for the final layer.
        alphas: Grid of migration strengths, candidates ``(α, 1 − α)`` (``s = 1`` is always one).
        activation_alphas: Extra candidates ``(α, 0)``: ``s = amax_x^α`` (weights ignored).
        shifts: Activation shifts to try (``0.0``; plus the GELU shift for layers whose
            inputs never go below it, scored with unsigned int4 codes).
        k_segments: Per-segment activation handling the layers will have (then ``shifts`` must
            be ``(0.0,)``): the candidates are scored with it.

    Returns:
        ``(smooth or None, best (α, β) or None, best shift, [((α, β), shift, error), ...])``;
        ``None`` means no smoothing won.
    """
    amax_w = _amax_w(weights)
    refs = [x @ w.float().T for x, w in zip(rows, weights)]
    tried: list[tuple[Any, float, float]] = []
    best: tuple[float, torch.Tensor | None, tuple[float, float] | None, float] = (float("inf"), None, None, 0.0)
    candidates: list[tuple[float, float] | None] = [None, *((a, 1.0 - a) for a in alphas),
                                                     *((a, 0.0) for a in activation_alphas)]
    for alpha in candidates:
        s = None if alpha is None else smoothing_vector(amax_x.to(amax_w.device), amax_w, alpha[0], beta=alpha[1])
        errs = dict.fromkeys(shifts, 0.0)
        for w, x, ref in zip(weights, rows, refs):
            # candidates are only compared: 2 power iterations rank them like the exact SVD
            ap = approximate(w, s, rank, precision=precision, dtype=dtype, scale_dtype=scale_dtype,
                             lowrank=lowrank, niter=2)
            q = dequantized_residual(ap.residual, precision, scale_dtype=scale_dtype)
            for shift in shifts:
                y = simulated_output(x, smooth=ap.smooth, up=ap.up, down=ap.down, qres=q,
                                     precision=precision, act_quant=act_quant, act_shift=shift,
                                     k_segments=k_segments)
                errs[shift] += relative_error(y, ref) ** 2
        for shift, total in errs.items():
            err = total ** 0.5
            tried.append((alpha, shift, err))
            if err < best[0]:
                best = (err, s, alpha, shift)
    return best[1], best[2], best[3], tried


def _amax_w(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def group_smoothing_vector(
    weights: list[torch.Tensor], amax_x: torch.Tensor, alpha: tuple[float, float] | None
) -> torch.Tensor | None:
    """The smoothing vector :func:`search_smoothing` builds for candidate ``alpha`` (bit for bit),
    so a search result kept as ``(α, β)`` gives the same ``s`` again; None for ``s = 1``."""
    if alpha is None:
        return None
    amax_w = _amax_w(weights)
    return smoothing_vector(amax_x.to(amax_w.device), amax_w, alpha[0], beta=alpha[1])


@dataclasses.dataclass(frozen=True)
class SmoothingChoice:
    """What the smoothing search chose for an input group (kept so it is not searched twice).

    Attributes:
        alpha: ``(α, β)`` of the winning candidate, None for ``s = 1``.
        shift: Activation shift (the GELU shift with unsigned codes, or 0).
        tried: ``[((α, β) or None, shift, error), ...]`` as :func:`search_smoothing` returns it.
        searched: False when no search ran (no calibration rows, or nothing to search).
    """

    alpha: tuple[float, float] | None = None
    shift: float = 0.0
    tried: tuple[tuple[Any, float, float], ...] = ()
    searched: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"alpha": None if self.alpha is None else list(self.alpha), "shift": self.shift,
                "tried": [[None if a is None else list(a), sh, e] for a, sh, e in self.tried],
                "searched": self.searched}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SmoothingChoice:
        """Inverse of :meth:`to_json`."""
        alpha = None if d.get("alpha") is None else (float(d["alpha"][0]), float(d["alpha"][1]))
        tried = tuple((None if a is None else (float(a[0]), float(a[1])), float(sh), float(e))
                      for a, sh, e in d.get("tried", []))
        return cls(alpha, float(d.get("shift", 0.0)), tried, bool(d.get("searched", False)))
