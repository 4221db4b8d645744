"""Quantize one input group of linears into ``SVDQLinear`` modules (+ fidelity numbers).

:func:`input_groups` cuts a block's layers into input groups (layers reading the same input);
:func:`quantize_group` quantizes one.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svdq_format import packing
from svdq_format.errors import QuantizationError
from svdq_format.linear import SVDQLinear
from svdq_format.spec import KSegment

from .gptq import gptq_lowrank, gptq_rows, gptq_rows_needed, smoothed_hessian
from .options import QuantizeOptions
from .residual import int4_clip_scales
from .smoothing import (
    Approximation,
    SmoothingChoice,
    approximate,
    group_smoothing_vector,
    relative_error,
    search_smoothing,
    segment_shift,
    shift_correction,
)
from .stats import CalibrationStats
from .timing import PhaseTimer

__all__ = ["input_groups", "quantize_group", "search_group", "layer_fidelity", "layer_seed", "GELU_SHIFT"]

#: Shift of post-GELU inputs (GELU ≥ −0.1700, rounded up to a short binary fraction) so that
#: unsigned int4 activation codes (0..15, twice the resolution) apply (docs/format.md §7.2).
GELU_SHIFT = 0.171875


def input_groups(names: list[str], kinds: Mapping[str, str], stats: CalibrationStats) -> list[list[str]]:
    """``names`` (one block's layers) cut into input groups: layers of one kind that read the same
    input (q/k/v) are quantized together, with one smoothing vector; the rest alone."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            continue
        g = [m for m in stats.group_of(n) if m in names and m not in seen and kinds[m] == kinds[n]] or [n]
        if n not in g:
            g = [n]
        seen.update(g)
        groups.append(g)
    return groups


def layer_seed(seed: int, name: str) -> int:
    """Deterministic per-layer seed (independent of the order layers are processed in)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16


@torch.no_grad()
def layer_fidelity(
    linear: nn.Linear, layer: SVDQLinear, rows: torch.Tensor, *, precision: str
) -> dict[str, float]:
    """Relative output errors vs the 16-bit layer on ``rows``: this SVDQ layer (its real
    forward, in its current mode), naive W4A4 (rank 0, no smoothing, absmax scales) and
    weight-only W4A16; for W4A4 layers also the Hopper execution modes ``svdq_fast`` and, for
    int4, ``svdq_fast8`` (docs/format.md §6) — issue 9's condition is that they are no worse
    than ``svdq`` (exact W4A4)."""
    x = rows.to(layer.qweight.device, linear.weight.dtype)
    ref = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    chosen, mode = layer.backend, layer.mode
    layer.backend = "reference"  # the normative math, whatever kernels this machine has
    try:
        out = {"svdq": relative_error(layer(x), ref)}
        if layer.kind == "w4a4":
            for other in ("fast", "fast8") if layer.precision == "int4" else ("fast",):
                layer.mode = other
                out[f"svdq_{other}"] = relative_error(layer(x), ref)
    finally:
        layer.backend, layer.mode = chosen, mode  # the quantized layer runs as it was afterwards
    for label, kind in (("naive_w4a4", "w4a4"), ("w4a16", "w4a16")):
        naive = SVDQLinear.from_linear(linear, rank=0, precision=precision, kind=kind)
        naive.backend = "reference"
        out[label] = relative_error(naive(x), ref)
    return out


def _clip_scales(ap: Approximation, x: torch.Tensor | None, opts: QuantizeOptions, precision: str,
                 sdt: torch.dtype) -> torch.Tensor | None:
    """int4 scales of the clipping search (error weighted by the mean x̂² per channel), or None."""
    if precision != "int4" or not opts.clip_search:
        return None
    importance = None if x is None else (x / ap.smooth).square().mean(dim=0)
    return int4_clip_scales(ap.residual, importance, ratios=opts.clip_ratios, scale_dtype=sdt)


@torch.no_grad()
def search_group(
    names: list[str],
    linears: Mapping[str, nn.Linear],
    kinds: Mapping[str, str],
    stats: CalibrationStats,
    opts: QuantizeOptions,
    *,
    rank: int | None = None,
    act_handling: Mapping[str, tuple[KSegment, ...]] | None = None,
) -> SmoothingChoice:
    """The smoothing search of an input group (:func:`~converters.quantize.smoothing.search_smoothing`
    with this group's candidates), at ``rank`` (default: the group's smallest rank of ``opts``);
    ``act_handling`` as for :func:`quantize_group`."""
    first = linears[names[0]]
    device = first.weight.device
    dtype = _compute_dtype(first.weight.dtype)
    sdt = _scale_dtype(dtype)
    act_quant = kinds[names[0]] == "w4a4"
    nunchaku = opts.target == "nunchaku"
    precision = _precision(opts, act_quant)
    weights = [linears[n].weight.detach() for n in names]
    if rank is None:
        base = opts.rank if act_quant else opts.w4a16_rank
        rank = min(min(base, *w.shape) for w in weights)
    forced = (act_handling or {}).get(names[0]) if act_quant else None
    segments = forced if forced is not None and len(forced) > 1 else ()
    no_search = SmoothingChoice(shift=forced[0].act_shift) if forced is not None and not segments else SmoothingChoice()
    if not all(n in stats.layers for n in names):
        return no_search
    # unsigned int4 activations for inputs bounded below like a GELU output (scored, not forced)
    unsigned_ok = (act_quant and precision == "int4" and opts.unsigned_acts and not nunchaku and forced is None
                   and min(stats.layers[n].minval for n in names) >= -GELU_SHIFT)
    shifts = (0.0, GELU_SHIFT) if unsigned_ok else (0.0,)
    if forced is not None and not segments:
        shifts = (forced[0].act_shift,)  # one handling for the whole layer, as its target requires
    smooth_search = opts.smoothing and bool(opts.alphas) and not (nunchaku and not act_quant)
    if not (smooth_search or unsigned_ok or forced is not None):
        return no_search
    torch.manual_seed(layer_seed(opts.seed, names[0]))
    rows = [stats.layers[n].rows.to(device).float() for n in names]
    amax_x = torch.stack([stats.layers[n].absmax for n in names]).amax(dim=0).to(device)
    _, alpha, shift, tried = search_smoothing(
        weights, rows, amax_x, rank=rank, precision=precision, act_quant=act_quant,
        alphas=opts.alphas if smooth_search else (), dtype=dtype, scale_dtype=sdt, shifts=shifts,
        activation_alphas=opts.activation_alphas if smooth_search else (),
        # candidates are only compared: the randomised SVD ranks them the same, much faster
        lowrank="randomized" if opts.lowrank == "auto" else opts.lowrank, k_segments=segments,
    )
    return SmoothingChoice(alpha, shift, tuple(tried), True)


def _precision(opts: QuantizeOptions, act_quant: bool) -> str:
    """Nunchaku stores its weight-only (AWQ) layers as int4 without smoothing, also in nvfp4 models."""
    return "int4" if opts.target == "nunchaku" and not act_quant else opts.precision


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


@torch.no_grad()
def quantize_group(
    names: list[str],
    linears: Mapping[str, nn.Linear],
    kinds: Mapping[str, str],
    stats: CalibrationStats,
    opts: QuantizeOptions,
    *,
    timer: PhaseTimer | None = None,
    report: bool = True,
    act_handling: Mapping[str, tuple[KSegment, ...]] | None = None,
    ranks: Mapping[str, int] | None = None,
    search: SmoothingChoice | None = None,
) -> dict[str, tuple[SVDQLinear, dict[str, Any]]]:
    """Quantize linears that read the same input with one shared smoothing vector.

    Args:
        names: The group's layer names (all of one kind).
        linears: Name → ``nn.Linear`` (on the device to compute on).
        kinds: Name → ``"w4a4"`` / ``"w4a16"``.
        stats: Calibration statistics (rows and absmax per layer).
        opts: Quantizer options.
        timer: Phase timer to charge.
        report: Compute the fidelity numbers.
        act_handling: Layer → activation handling its target requires
            (:attr:`~converters.quantize.selection.Selection.act_handling`): one segment shifts the
            whole layer, several give it ``k_segments``. Unlisted layers: the quantizer's choice
            (unsigned GELU-shifted codes where they score better), or plain under the Nunchaku target.
        ranks: Name → low-rank rank (a rank allocation); default ``opts.rank`` (``w4a16_rank``).
        search: The group's smoothing choice when already searched (rank allocation);
            default: searched here.

    Returns:
        Name → ``(SVDQLinear on the linear's device, info dict)``.
    """
    timer = timer or PhaseTimer()
    first = linears[names[0]]
    device = first.weight.device
    dtype = _compute_dtype(first.weight.dtype)
    sdt = _scale_dtype(dtype)
    kind = kinds[names[0]]
    act_quant = kind == "w4a4"
    nunchaku = opts.target == "nunchaku"
    precision = _precision(opts, act_quant)
    base_rank = opts.rank if act_quant else opts.w4a16_rank
    weights = [linears[n].weight.detach() for n in names]
    for n, w in zip(names, weights):
        if not torch.isfinite(w).all():
            raise QuantizationError(f"layer {n}: weight contains NaN or inf")
    have = [n in stats.layers for n in names]
    rows = [stats.layers[n].rows.to(device).float() if h else None for n, h in zip(names, have)]
    ranks_ = [min(base_rank if ranks is None else ranks.get(n, base_rank), *w.shape) for n, w in zip(names, weights)]
    forced = (act_handling or {}).get(names[0]) if act_quant else None
    segments = forced if forced is not None and len(forced) > 1 else ()

    if search is None:
        with timer.phase("smoothing_search"):
            search = search_group(names, linears, kinds, stats, opts, rank=min(ranks_), act_handling=act_handling)
    alpha, shift, tried = search.alpha, search.shift, list(search.tried)
    smooth = None
    if alpha is not None:
        amax_x = torch.stack([stats.layers[n].absmax for n in names]).amax(dim=0).to(device)
        smooth = group_smoothing_vector(weights, amax_x, alpha)
    shift_vec: float | torch.Tensor = segment_shift(segments, device=device) if segments else shift
    shifted = bool(segments) and any(seg.act_shift for seg in segments) or bool(shift)
    # Nunchaku fuses q|k|v into one layer whose nvfp4 members need tensor scales in exact ratios: share one
    shared_tscale = nunchaku and act_quant and precision == "nvfp4" and len(names) > 1

    aps: list[Approximation] = []
    for name, w, rank in zip(names, weights, ranks_):
        torch.manual_seed(layer_seed(opts.seed, name))
        with timer.phase("svd"):
            aps.append(approximate(w, smooth, rank, precision=precision, dtype=dtype, scale_dtype=sdt,
                                   lowrank=opts.lowrank, refine_iters=opts.refine_iters))
    with timer.phase("residual"):
        residuals: list[tuple[torch.Tensor, torch.Tensor | None]]
        use_gptq = opts.gptq is not False and precision == "int4" and all(have) and all(
            gptq_rows(stats.layers[n]) >= gptq_rows_needed(first.in_features) for n in names)
        if use_gptq:
            hessian = smoothed_hessian(stats.layers[names[0]], aps[0].smooth)
            done = gptq_lowrank(weights, aps, hessian, rounds=opts.gptq_rounds, damp=opts.gptq_damp,
                                act_order=opts.gptq_act_order, dtype=dtype, scale_dtype=sdt, lowrank=opts.lowrank,
                                clip_ratios=opts.clip_ratios if opts.clip_search else None)
            aps = [ap for ap, _, _ in done]
            residuals = [(q, sc) for _, q, sc in done]
        else:
            residuals = [(ap.residual, _clip_scales(ap, x, opts, precision, sdt)) for ap, x in zip(aps, rows)]

    out: dict[str, tuple[SVDQLinear, dict[str, Any]]] = {}
    for name, ap, (residual, scales), rank in zip(names, aps, residuals, ranks_):
        lin = linears[name]
        with timer.phase("residual"):
            layer = SVDQLinear(
                lin.in_features, lin.out_features, rank=rank, precision=precision, kind=kind,
                bias=lin.bias is not None or shifted, dtype=dtype, scale_dtype=sdt, device=device,
                act_shift=shift, act_unsigned=bool(shift), k_segments=segments,
            )
            layer.smooth.copy_(ap.smooth.to(dtype))
            if layer.lora_up is not None and layer.lora_down is not None:
                layer.lora_up.copy_(ap.up.to(dtype))
                layer.lora_down.copy_(ap.down.to(dtype))
            layer.set_residual(residual, int4_scales=scales)
            if layer.bias is not None:
                b = lin.bias.detach().float() if lin.bias is not None else torch.zeros(lin.out_features, device=device)
                if shifted:
                    b = b - shift_correction(layer.residual(), ap.smooth, shift_vec)
                layer.bias.copy_(b.to(dtype))
        info: dict[str, Any] = {
            "layer": name,
            "kind": kind,
            "precision": precision,
            "shape": [lin.out_features, lin.in_features],
            "rank": rank,
            "alpha": None if alpha is None else alpha[0],
            "beta": None if alpha is None else alpha[1],
            "smoothed": smooth is not None,
            "act_shift": shift,
            "group": list(names),
            "search": [list(t) for t in tried],
        }
        if segments:
            info["k_segments"] = [seg.to_json() for seg in segments]
        if precision == "int4":
            info["gptq"] = use_gptq
        out[name] = (layer, info)
    if shared_tscale:  # (nvfp4: never shifted, so the biases need no update)
        amax = max(float(r.abs().max()) for r, _ in residuals)
        tscale = amax / (packing.E2M1_MAX * packing.FP8_E4M3_MAX) if amax > 0 else 1.0
        for (layer, _), (residual, _) in zip(out.values(), residuals):
            layer.set_residual(residual, nvfp4_tensor_scale=tscale)
    for name, x in zip(names, rows):
        if report and x is not None:
            layer, info = out[name]
            with timer.phase("report"):
                info["error"] = layer_fidelity(linears[name], layer, stats.layers[name].rows, precision=precision)
    return out
