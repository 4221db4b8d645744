"""Calibration samples (nested dicts, lists, tuples of tensors) moved to a device: one helper that
the calibration hooks (``stats``, ``blockwise``, ``synthetic``) and the sensitivity passes
(``sensitivity``) share; a module of its own, so that neither of those imports the other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["to_device"]


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
