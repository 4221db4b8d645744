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

from .options import QuantizeOptions
from .residual import gptq_int4, int4_clip_scales
from .smoothing import approximate, relative_error, search_smoothing, segment_shift, shift_correction
from .stats import CalibrationStats
from .timing import PhaseTimer

__all__ = ["input_groups", "quantize_group", "layer_fidelity", "layer_seed", "GELU_SHIFT"]

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

    Returns:
        Name → ``(SVDQLinear on the linear's device, info dict)``.
    """
    timer = timer or PhaseTimer()
    first = linears[names[0]]
    device = first.weight.device
    dtype = first.weight.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        dtype = torch.bfloat16
    sdt = _scale_dtype(dtype)
    kind = kinds[names[0]]
    act_quant = kind == "w4a4"
    nunchaku = opts.target == "nunchaku"
    # Nunchaku stores its weight-only (AWQ) layers as int4 without smoothing, also in nvfp4 models
    precision = "int4" if nunchaku and not act_quant else opts.precision
    base_rank = opts.rank if act_quant else opts.w4a16_rank
    weights = [linears[n].weight.detach() for n in names]
    for n, w in zip(names, weights):
        if not torch.isfinite(w).all():
            raise QuantizationError(f"layer {n}: weight contains NaN or inf")
    have = [n in stats.layers for n in names]
    rows = [stats.layers[n].rows.to(device).float() if h else None for n, h in zip(names, have)]
    ranks = [min(base_rank, *w.shape) for w in weights]

    torch.manual_seed(layer_seed(opts.seed, names[0]))
    smooth: torch.Tensor | None = None
    alpha: tuple[float, float] | None = None
    shift = 0.0
    tried: list[tuple[Any, float, float]] = []
    forced = (act_handling or {}).get(names[0]) if act_quant else None
    segments = forced if forced is not None and len(forced) > 1 else ()
    # unsigned int4 activations for inputs bounded below like a GELU output (scored, not forced)
    unsigned_ok = (act_quant and precision == "int4" and opts.unsigned_acts and all(have) and not nunchaku
                   and forced is None and min(stats.layers[n].minval for n in names) >= -GELU_SHIFT)
    shifts = (0.0, GELU_SHIFT) if unsigned_ok else (0.0,)
    if forced is not None and not segments:
        shifts = (forced[0].act_shift,)  # one handling for the whole layer, as its target requires
    smooth_search = opts.smoothing and bool(opts.alphas) and not (nunchaku and not act_quant)
    if all(have) and (smooth_search or unsigned_ok or forced is not None):
        with timer.phase("smoothing_search"):
            amax_x = torch.stack([stats.layers[n].absmax for n in names]).amax(dim=0).to(device)
            smooth, alpha, shift, tried = search_smoothing(
                weights, [r for r in rows if r is not None], amax_x, rank=min(ranks), precision=precision,
                act_quant=act_quant,
                alphas=opts.alphas if smooth_search else (), dtype=dtype, scale_dtype=sdt, shifts=shifts,
                activation_alphas=opts.activation_alphas if smooth_search else (),
                # candidates are only compared: the randomised SVD ranks them the same, much faster
                lowrank="randomized" if opts.lowrank == "auto" else opts.lowrank, k_segments=segments,
            )
    elif forced is not None and not segments:
        shift = forced[0].act_shift
    shift_vec: float | torch.Tensor = segment_shift(segments, device=device) if segments else shift
    shifted = bool(segments) and any(seg.act_shift for seg in segments) or bool(shift)
    # Nunchaku fuses q|k|v into one layer whose nvfp4 members need tensor scales in exact ratios: share one
    shared_tscale = nunchaku and act_quant and precision == "nvfp4" and len(names) > 1
    residuals: dict[str, torch.Tensor] = {}

    out: dict[str, tuple[SVDQLinear, dict[str, Any]]] = {}
    for name, w, x, rank in zip(names, weights, rows, ranks):
        lin = linears[name]
        torch.manual_seed(layer_seed(opts.seed, name))
        with timer.phase("svd"):
            ap = approximate(w, smooth, rank, precision=precision, dtype=dtype, scale_dtype=sdt,
                             lowrank=opts.lowrank, refine_iters=opts.refine_iters)
        with timer.phase("residual"):
            residual, scales = ap.residual, None
            if precision == "int4":
                xs = None if x is None else x / ap.smooth
                if opts.gptq and xs is not None:
                    residual, scales = gptq_int4(ap.residual, xs.T @ xs, scale_dtype=sdt)
                elif opts.clip_search:
                    importance = None if xs is None else xs.square().mean(dim=0)
                    scales = int4_clip_scales(ap.residual, importance, ratios=opts.clip_ratios, scale_dtype=sdt)
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
            if shared_tscale:
                residuals[name] = residual
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
        out[name] = (layer, info)
    if shared_tscale:  # (nvfp4: never shifted, so the biases need no update)
        amax = max(float(r.abs().max()) for r in residuals.values())
        tscale = amax / (packing.E2M1_MAX * packing.FP8_E4M3_MAX) if amax > 0 else 1.0
        for name, (layer, _) in out.items():
            layer.set_residual(residuals[name], nvfp4_tensor_scale=tscale)
    for name, x in zip(names, rows):
        if report and x is not None:
            layer, info = out[name]
            with timer.phase("report"):
                info["error"] = layer_fidelity(linears[name], layer, stats.layers[name].rows, precision=precision)
    return out
