"""Triton's interpreter for the CPU checks of the Triton kernels (``TRITON_INTERPRET=1``).

Triton decides at import whether its own library functions (``tl.cdiv``, ...) are interpreted:
the switch must be on before the first import, and only where no GPU will use Triton. Call
:func:`interpreted_triton` at the top of a test module, before anything imports triton."""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
import torch


def interpreted_triton() -> ModuleType:
    """``triton`` with the interpreter on; skips the module with a GPU or without triton, and
    fails (not skips: CI would lose the checks silently) when triton came in too early."""
    if torch.cuda.is_available():
        pytest.skip("interpreter checks are for machines without a GPU", allow_module_level=True)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported in this test process before the interpreter could be switched "
                           "on: a test module collected earlier imports triton at import time")
    return triton
