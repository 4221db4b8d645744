"""converters — bring models and adapters into the SVDQuant format.

diffusers model → SVDQuant (calibration, smoothing search, SVD, 4-bit residual), LoRA files →
low-rank branch, Nunchaku ↔ svdquant. Depends on :mod:`svdq_format`, never on
:mod:`svdq_kernels`. Submodules import their heavy dependencies (diffusers, transformers)
lazily.
"""

from __future__ import annotations

__all__: list[str] = []
