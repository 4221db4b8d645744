"""Quantize a text encoder in place: W4A16 by default, W4A4 for the layers where its fidelity holds.

Modes:

* ``auto`` (the default): every layer W4A16, except those where W4A4 is measured to be as
  faithful. The encoder is quantized both ways on the same calibration statistics; a layer takes
  its W4A4 version when that version's relative output error on the calibration rows is at most
  ``1 + tolerance`` times its W4A16 version's (:data:`AUTO_TOLERANCE`, 10 %). The choice, both
  errors and the tolerance go to the fidelity report (``layers[i]["auto"]``). A layer the
  calibration does not reach (a vision-language encoder's vision tower, given text) is not
  measured and stays W4A16. Costs both modes' time, and a second copy of the encoder in memory.
* ``w4a16``: every layer weight-only (4-bit weights, 16-bit activations, int4 clipping search).
* ``w4a4``: every layer SVDQ (smoothing search + low-rank branch, 4-bit activations).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from ..quantize.calibrate import resolve_calibration
from ..quantize.options import QuantizeOptions
from ..quantize.pipeline import QuantizeResult, mark_quantized, run_quantization
from ..quantize.selection import select_layers
from ..quantize.stats import CalibrationStats, collect_stats

__all__ = ["AUTO_TOLERANCE", "MODES", "quantize_text_encoder", "text_encoder_options"]

#: Text-encoder modes: ``auto`` (W4A16, W4A4 where it is measured as faithful: the default),
#: ``w4a16`` (weight-only) and ``w4a4`` (SVDQ: smoothing + low-rank).
MODES = ("auto", "w4a16", "w4a4")

#: ``auto`` takes a layer's W4A4 version when its calibration error is at most ``1 + AUTO_TOLERANCE``
#: times the W4A16 version's.
AUTO_TOLERANCE = 0.10


def text_encoder_options(mode: str = "w4a16", base: QuantizeOptions | None = None) -> QuantizeOptions:
    """The quantizer options for a text encoder in a fixed mode: ``base`` (default options) made
    weight-only for ``w4a16``.

    Raises:
        QuantizationError: unknown mode (``auto`` runs both fixed modes).
    """
    if mode not in ("w4a16", "w4a4"):
        raise QuantizationError(f"text-encoder mode {mode!r} is not one of w4a16, w4a4")
    opts = base or QuantizeOptions()
    # uniform ranks: auto mode picks W4A4 layer by layer, so a budget over "the W4A4 layers" would
    # change with the pick (and the memory accounting predicts ranks before quantizing)
    return dataclasses.replace(opts, weight_only=mode == "w4a16", rank_allocation="uniform")


def quantize_text_encoder(
    model: nn.Module,
    calibration: Any,
    *,
    mode: str = "auto",
    tolerance: float = AUTO_TOLERANCE,
    options: QuantizeOptions | None = None,
    device: torch.device | str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize a transformers text encoder in place and mark it svdquant-quantized, so its
    ``save_pretrained`` writes the format and transformers' ``from_pretrained`` loads it back.

    Args:
        model: The encoder (``T5EncoderModel``, ``CLIPTextModel`` ...).
        calibration: Samples (:func:`~converters.text_encoders.text_encoder_calibration`), a
            calibration file or statistics.
        mode: ``"auto"`` (default: W4A16, W4A4 where measured as faithful), ``"w4a16"`` or ``"w4a4"``.
        tolerance: ``auto``: how much larger (relative) a layer's W4A4 error may be than its W4A16 error.
        options: Base quantizer options (rank, precision, seed ...).
        device: Compute device (default: the model's).
        state_dir: Resumable state directory (``auto``: one sub-directory per mode).
        progress: tqdm bars.

    Raises:
        QuantizationError: unknown mode, negative tolerance, or what the quantizer raises.
    """
    if mode not in MODES:
        raise QuantizationError(f"text-encoder mode {mode!r} is not one of {', '.join(MODES)}")
    if tolerance < 0:
        raise QuantizationError(f"text-encoder tolerance must be >= 0, got {tolerance}")
    if mode == "auto":
        return _quantize_auto(model, calibration, tolerance=tolerance, options=options or QuantizeOptions(),
                              device=device, state_dir=state_dir, progress=progress)
    opts = text_encoder_options(mode, options)
    result = run_quantization(model, calibration, options=opts, device=device, offload=False,
                              state_dir=state_dir, progress=progress)
    if result.complete:
        mark_quantized(result.model, extra={"quantizer": {"options": opts.to_json(), "text_encoder_mode": mode}})
    return result


def _statistics(model: nn.Module, calibration: Any, opts: QuantizeOptions,
                device: torch.device | str | None) -> tuple[CalibrationStats, dict[str, Any] | None]:
    """One set of calibration statistics for both modes (the same layers are selected in both), and
    where they came from (None: statistics were given)."""
    resolved = resolve_calibration(model, calibration, seed=opts.seed)
    if isinstance(resolved, CalibrationStats):
        return resolved, None
    sel = select_layers(model, include=opts.include, exclude=opts.exclude, warn_unknown=False)
    if device is not None:
        model.to(device)
    linears = {n: m for n, m in model.named_modules() if n in sel.kinds and isinstance(m, nn.Linear)}
    stats = collect_stats(model, linears, list(resolved),
                          max_rows=opts.calib_rows, seed=opts.seed, device=device)
    return stats, {"source": resolved.source, "samples": len(resolved)}


def _sub(state_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    return None if state_dir is None else Path(state_dir) / name


def _error(entry: dict[str, Any] | None) -> float | None:
    """A layer's relative output error on its calibration rows (None: not measured)."""
    err = None if entry is None else entry.get("error", {}).get("svdq")
    return None if err is None else float(err)


def _quantize_auto(model: nn.Module, calibration: Any, *, tolerance: float, options: QuantizeOptions,
                   device: torch.device | str | None, state_dir: str | os.PathLike[str] | None,
                   progress: bool) -> QuantizeResult:
    """Both modes on one set of statistics; per layer, W4A4 where its error is within ``tolerance``."""
    stats, source = _statistics(model, calibration, options, device)
    trial = copy.deepcopy(model)  # the W4A4 candidates (only the chosen layers are kept)
    r4 = run_quantization(trial, stats, options=text_encoder_options("w4a4", options), device=device,
                          offload=False, state_dir=_sub(state_dir, "w4a4"), progress=progress)
    w4a4 = {entry["layer"]: entry for entry in r4.report.layers}
    candidates = {name: mod for name, mod in trial.named_modules() if name in w4a4}
    del trial
    opts16 = text_encoder_options("w4a16", options)
    r16 = run_quantization(model, stats, options=opts16, device=device, offload=False,
                           state_dir=_sub(state_dir, "w4a16"), progress=progress)
    if not (r4.complete and r16.complete):
        return r16
    layers = []
    for entry in r16.report.layers:
        name = entry["layer"]
        other = w4a4.get(name)
        e16 = _error(entry)
        e4 = _error(other)
        # (a layer the calibration never reaches, e.g. a VL encoder's vision tower, is not measured: W4A16)
        take = e4 is not None and e16 is not None and e4 <= (1.0 + tolerance) * e16
        chosen = other if take and other is not None else entry
        if take:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, candidates[name])
        layers.append({**chosen, "auto": {"w4a4_error": e4, "w4a16_error": e16, "tolerance": tolerance,
                                          "chosen": "w4a4" if take else "w4a16"}})
    report = dataclasses.replace(r16.report, layers=layers, calibration=source or r16.report.calibration,
                                 timings={k: r16.report.timings.get(k, 0.0) + r4.report.timings.get(k, 0.0)
                                          for k in {*r16.report.timings, *r4.report.timings}})
    mark_quantized(model, extra={"quantizer": {"options": opts16.to_json(), "text_encoder_mode": "auto",
                                               "auto_tolerance": tolerance}})
    return dataclasses.replace(r16, model=model, report=report)
