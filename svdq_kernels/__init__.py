"""svdq_kernels — GPU backends for the ``svdquant::linear`` op (Hopper, CUTLASS-generated).

Importing this package registers its backends into :mod:`svdq_format.ops`. On a machine
without a suitable GPU or compiler nothing is registered and layers run on the reference
backend.
"""

from __future__ import annotations

import svdq_format  # noqa: F401  (the registry lives there)

__all__: list[str] = []
