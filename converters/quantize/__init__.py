"""SVDQuant quantizer: any diffusers transformer (or module of linears) → SVDQuant checkpoint.

Public API: :func:`quantize_model`, :func:`run_quantization`, :class:`QuantizeOptions`, the
calibration helpers and :func:`quantize_directory` (what ``svdq quantize`` runs).
"""

from .calibration import (
    CalibrationSet,
    capture_inputs,
    capture_pipeline_inputs,
    load_calibration,
    save_calibration,
    synthetic_calibration,
)
from .options import DEFAULT_ALPHAS, QuantizeOptions
from .pipeline import QuantizeResult, quantize_model, run_quantization
from .report import FidelityReport
from .selection import Selection, select_layers
from .stats import CalibrationStats, LayerStats, collect_stats

__all__ = [
    "CalibrationSet",
    "CalibrationStats",
    "DEFAULT_ALPHAS",
    "FidelityReport",
    "LayerStats",
    "QuantizeOptions",
    "QuantizeResult",
    "Selection",
    "capture_inputs",
    "capture_pipeline_inputs",
    "collect_stats",
    "load_calibration",
    "quantize_model",
    "run_quantization",
    "save_calibration",
    "select_layers",
    "synthetic_calibration",
]
