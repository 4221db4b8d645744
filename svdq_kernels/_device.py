"""The CUDA device guard our launches need, without its host cost when it is not needed."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def device_guard(device: torch.device) -> ContextManager[object]:
    """``torch.cuda.device(device)`` when ``device`` is not the current CUDA device, else a no-op.

    Triton kernels and our CUTLASS ops launch on the current device, so a call with tensors on
    another GPU must switch to it first — but entering ``torch.cuda.device`` costs tens of µs of
    host time per call (measured on an H100 host), which an eager model pays on every layer.
    """
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
