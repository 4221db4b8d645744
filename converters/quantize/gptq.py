"""GPTQ on the SVDQ residual, with the low-rank branch in the loop.

The algorithm itself (damped, act-order, lazy block updates, fixed group scales) is
:func:`converters.quantize.residual.gptq_int4`. Here:

* which layers get a Hessian over *every* calibration row (:func:`hessian_layers`, within a
  memory budget: :func:`hessian_budget_bytes`); the others use the rows kept for the search;
* how many rows GPTQ needs (:func:`gptq_rows_needed`) and the refusal before any layer is
  quantized (:func:`check_gptq_rows`);
* the rounds of :func:`gptq_lowrank`: GPTQ of the input group's residuals (stacked: they share
  one Hessian), then each member's low-rank branch re-fitted to ``Ŵ − Q(R)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from svdq_format.errors import QuantizationError

from .residual import DEFAULT_CLIP_RATIOS, DEFAULT_GPTQ_DAMP, gptq_int4, int4_clip_scales
from .smoothing import Approximation, refit_lowrank
from .stats import CalibrationStats, LayerStats

__all__ = ["GPTQ_MIN_ROWS", "CHANNELS_PER_ROW", "HESSIAN_GIB", "HESSIAN_SHARE", "gptq_rows_needed", "gptq_rows",
           "hessian_budget_bytes", "hessian_layers", "hessian_plan", "check_gptq_rows", "smoothed_hessian",
           "gptq_lowrank"]

#: GPTQ needs at least this many calibration rows per layer ...
GPTQ_MIN_ROWS = 16
#: ... and one per this many input channels (one per int4 group). Measured on MiniLM's real
#: layers (held-out rows, docs/quantization.md): with the default damping GPTQ lowers the output
#: error from 16 rows up (K = 384 and 1536); below, it changes nothing measurable.
CHANNELS_PER_ROW = 64
#: Default memory of the Hessians: this many GiB, or this share of the calibration device's total
#: memory if that is less (fixed for a device: the result does not depend on what else is running).
HESSIAN_GIB = 16.0
HESSIAN_SHARE = 0.25


def gptq_rows_needed(in_features: int) -> int:
    """Calibration rows GPTQ needs for a layer with ``in_features`` input channels."""
    return max(GPTQ_MIN_ROWS, -(-in_features // CHANNELS_PER_ROW))


def gptq_rows(st: LayerStats) -> int:
    """Rows GPTQ will use for a layer: every row seen with a Hessian, else the kept rows."""
    return st.count if st.hessian is not None else int(st.rows.shape[0])


def hessian_budget_bytes(gib: float | None, device: torch.device | str) -> int:
    """Bytes the Hessians may take: ``gib`` GiB, or (None) :data:`HESSIAN_GIB` GiB or
    :data:`HESSIAN_SHARE` of the total memory of ``device`` (CUDA: the GPU's; CPU: the host's),
    whichever is less."""
    if gib is not None:
        return int(gib * 2**30)
    dev = torch.device(device)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
    else:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # (no sysconf: the fixed default)
            total = int(HESSIAN_GIB * 2**30 / HESSIAN_SHARE)
    return int(min(HESSIAN_GIB * 2**30, HESSIAN_SHARE * total))


def hessian_layers(in_features: Mapping[str, int], budget: int) -> list[str]:
    """The layers that accumulate ``XᵀX`` (float64 ``K × K``): the smallest ``K`` first (the most
    layers per byte), while the sum fits ``budget`` bytes. Layers that share an input share one
    Hessian, so the real memory is at most this."""
    chosen: list[str] = []
    used = 0
    for name, k in sorted(in_features.items(), key=lambda item: item[1]):
        need = 8 * k * k
        if used + need > budget:
            break
        chosen.append(name)
        used += need
    return chosen


def hessian_plan(gptq: bool, precision: str, gib: float | None, in_features: Mapping[str, int],
                 device: torch.device | str) -> list[str]:
    """The layers that accumulate a Hessian during calibration (none unless int4 GPTQ)."""
    if not gptq or precision != "int4":
        return []
    return hessian_layers(in_features, hessian_budget_bytes(gib, device))


def check_gptq_rows(stats: CalibrationStats, in_features: Mapping[str, int], *, calib_rows: int) -> None:
    """Refuse GPTQ (one line) when a layer has fewer calibration rows than it needs.

    Args:
        stats: The calibration statistics.
        in_features: The layers to quantize → input channels.
        calib_rows: The row budget of the search (``--calib-rows``), for the hint.

    Raises:
        QuantizationError: naming the layer short of rows by the largest factor, its rows and
            what it needs, and how many layers are short.
    """
    short = []
    for name, k in in_features.items():
        st = stats.layers.get(name)
        if st is None:  # never ran: quantized without calibration data (warned about elsewhere)
            continue
        have, need = gptq_rows(st), gptq_rows_needed(k)
        if have < need:
            short.append((have / need, name, k, have, need, st.hessian is None))
    if not short:
        return
    _, name, k, have, need, kept_only = min(short)
    more = f" (and {len(short) - 1} more layers)" if len(short) > 1 else ""
    how = (f"only its {have} kept rows are used (no Hessian memory left): raise --calib-rows (now {calib_rows}) "
           "or --gptq-hessian-gib" if kept_only else "calibrate on more samples or tokens")
    raise QuantizationError(
        f"--gptq needs at least {need} calibration rows for layer {name} ({k} input channels: one row per "
        f"{CHANNELS_PER_ROW}, at least {GPTQ_MIN_ROWS}) but it has {have}{more}; {how}, or drop --gptq"
    )


def smoothed_hessian(st: LayerStats, smooth: torch.Tensor) -> torch.Tensor:
    """``X̂ᵀX̂`` of ``x̂ = x / s`` (float32 ``[K, K]``, on ``smooth``'s device): from the layer's
    Hessian over every row when it has one, else from its kept rows."""
    if st.hessian is not None:
        h = st.hessian.to(smooth.device, torch.float32)
    else:
        x = st.rows.to(smooth.device, torch.float32)
        h = x.T @ x
    inv = 1.0 / smooth.float()
    return h * inv.unsqueeze(0) * inv.unsqueeze(1)


def gptq_lowrank(
    weights: Sequence[torch.Tensor],
    approximations: Sequence[Approximation],
    hessian: torch.Tensor,
    *,
    rounds: int = 1,
    damp: float = DEFAULT_GPTQ_DAMP,
    act_order: bool = True,
    clip_ratios: tuple[float, ...] | None = DEFAULT_CLIP_RATIOS,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    lowrank: str = "auto",
) -> list[tuple[Approximation, torch.Tensor, torch.Tensor]]:
    """GPTQ of an input group's int4 residuals with the low-rank branches in the loop.

    Each round: group scales by the clipping search (error weighted by ``diag(Ĥ)``), GPTQ of the
    members' residuals stacked along N (they read one input: one Hessian, one Cholesky
    factor), then each member's low-rank branch re-fitted to ``Ŵ − Q(R)`` (the next round
    quantizes the residual that leaves). The stored layer is the last round's ``Q(R)`` with the
    re-fitted branch.

    Args:
        weights: The members' weights ``[N_i, K]``.
        approximations: Their starting decompositions (one smoothing vector).
        hessian: ``X̂ᵀX̂`` of the smoothed inputs (:func:`smoothed_hessian`).
        rounds: GPTQ + re-fit rounds (≥ 1).
        damp, act_order: See :func:`~converters.quantize.residual.gptq_int4`.
        clip_ratios: Clipping-search ratios (None: absmax/7 scales).
        dtype, scale_dtype, lowrank: As for the layer.

    Returns:
        Per member ``(approximation with the re-fitted branch, Q(R) float32, int4 scales)``.
    """
    if rounds < 1:
        raise ValueError(f"gptq rounds must be >= 1, got {rounds}")
    aps = list(approximations)
    importance = torch.diagonal(hessian)
    sizes = [w.shape[0] for w in weights]
    out: list[tuple[Approximation, torch.Tensor, torch.Tensor]] = []
    for _ in range(rounds):
        scales = [
            int4_clip_scales(ap.residual, importance, ratios=clip_ratios, scale_dtype=scale_dtype)
            if clip_ratios else None
            for ap in aps
        ]
        stacked = torch.cat([ap.residual for ap in aps])
        stacked_scales = None if scales[0] is None else torch.cat([s for s in scales if s is not None])
        q, qs = gptq_int4(stacked, hessian, scales=stacked_scales, scale_dtype=scale_dtype, damp=damp,
                          act_order=act_order)
        out = []
        for w, ap, qi, si in zip(weights, aps, q.split(sizes), qs.split(sizes)):
            rank = ap.up.shape[1]
            new = refit_lowrank(w, ap.smooth, qi, rank, dtype=dtype, lowrank=lowrank) if rank else ap
            out.append((new, qi, si))
        aps = [ap for ap, _, _ in out]
    return out
