"""svdq_kernels — GPU backends for the ``svdquant::linear`` op (Hopper).

Importing this package registers the ``cutlass-sm90`` backend into :mod:`svdq_format.ops`.
The backend's :func:`~svdq_kernels.registry.supports` refuses calls it cannot run (no CUDA,
not sm_90, missing compiler/packages, unimplemented precision/mode) and the layer then runs on
the reference backend with one warning — importing this package never fails for lack of a
GPU. ``svdq kernels build`` prebuilds the CUTLASS kernels into the on-disk cache.
"""

from __future__ import annotations

import svdq_format  # noqa: F401  (the registry lives there)

from . import registry
from .registry import BACKEND_NAME

registry.register()

__all__ = ["BACKEND_NAME", "registry"]
