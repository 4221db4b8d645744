"""Quantize a text encoder in place (W4A16 by default, W4A4 on request)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from ..quantize.options import QuantizeOptions
from ..quantize.pipeline import QuantizeResult, mark_quantized, run_quantization

__all__ = ["MODES", "quantize_text_encoder", "text_encoder_options"]

#: Text-encoder modes: ``w4a16`` (weight-only, the default) and ``w4a4`` (SVDQ: smoothing + low-rank).
MODES = ("w4a16", "w4a4")


def text_encoder_options(mode: str = "w4a16", base: QuantizeOptions | None = None) -> QuantizeOptions:
    """The quantizer options for a text encoder: ``base`` (default options) made weight-only for ``w4a16``.

    Raises:
        QuantizationError: unknown mode.
    """
    if mode not in MODES:
        raise QuantizationError(f"text-encoder mode {mode!r} is not one of {', '.join(MODES)}")
    opts = base or QuantizeOptions()
    return dataclasses.replace(opts, weight_only=mode == "w4a16")


def quantize_text_encoder(
    model: nn.Module,
    calibration: Any,
    *,
    mode: str = "w4a16",
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
        mode: ``"w4a16"`` (default) or ``"w4a4"``.
        options: Base quantizer options (rank, precision, seed ...).
        device: Compute device (default: the model's).
        state_dir: Resumable state directory.
        progress: tqdm bars.
    """
    opts = text_encoder_options(mode, options)
    result = run_quantization(model, calibration, options=opts, device=device, offload=False,
                              state_dir=state_dir, progress=progress)
    if result.complete:
        mark_quantized(result.model, extra={"quantizer": {"options": opts.to_json(), "text_encoder_mode": mode}})
    return result
