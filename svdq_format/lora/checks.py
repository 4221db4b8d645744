"""Checks of LoRA factors: shapes against the layer, floating dtypes, no NaN/inf (batched on CUDA)."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import LoRAError
from .types import LoraDelta

__all__ = ["check_delta", "check_finite_batch", "all_finite"]


def check_delta(where: str, d: LoraDelta, k: int, n: int,
                 deferred: Optional[list[tuple[str, torch.Tensor]]] = None) -> None:
    """Shape/dtype checks now; NaN/inf checks of CUDA tensors go to ``deferred`` (checked
    together by :func:`check_finite_batch`: one host sync instead of one per tensor)."""
    for label, t in (("lora_A", d.down), ("lora_B", d.up), ("scales", d.scales)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise LoRAError(f"{where}: {label} is not a floating-point tensor")
    if d.down.ndim != 2 or d.up.ndim != 2:
        raise LoRAError(f"{where}: lora_A/lora_B must be 2-D, got {list(d.down.shape)} and {list(d.up.shape)}")
    r = d.down.shape[0]
    if d.up.shape[1] != r:
        raise LoRAError(f"{where}: rank mismatch: lora_A has rank {r}, lora_B has rank {d.up.shape[1]}")
    if tuple(d.scales.shape) != (r,):
        raise LoRAError(f"{where}: scales shape {list(d.scales.shape)}, expected [{r}]")
    if d.down.shape[1] != k or d.up.shape[0] != n:
        raise LoRAError(
            f"{where}: LoRA is {d.up.shape[0]}x{d.down.shape[1]} (out x in), the layer is {n}x{k}"
        )
    if d.bias is not None and tuple(d.bias.shape) != (n,):
        raise LoRAError(f"{where}: lora_B.bias shape {list(d.bias.shape)}, expected [{n}]")
    checks: tuple[tuple[str, Optional[torch.Tensor]], ...] = (
        ("lora_A", d.down), ("lora_B", d.up), ("scales", d.scales), ("bias", d.bias))
    for label, maybe in checks:
        if maybe is None:
            continue
        if deferred is not None and maybe.is_cuda:
            deferred.append((f"{where}: {label}", maybe))
        elif not all_finite(maybe):
            raise LoRAError(f"{where}: {label} contains NaN or inf")


def check_finite_batch(items: list[tuple[str, torch.Tensor]]) -> None:
    """NaN/inf check of many CUDA tensors with one host synchronisation.

    ``torch._foreach_norm`` (2-norm, fp32 accumulation) runs a few multi-tensor kernels for all
    of them: NaN and inf propagate into the norm. A tensor it flags is checked exactly
    (:func:`all_finite`) before the error, since a 2-norm of huge finite values can overflow.
    """
    if not items:
        return
    tensors = [t.to(torch.bfloat16) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t for _, t in items]
    try:
        norms = torch._foreach_norm(tensors, 2)
        flags = torch.stack([n.float() for n in norms]).isfinite()
    except (RuntimeError, AttributeError, TypeError):  # private API: fall back to one op per tensor
        flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if bool(flags.all()):
        return
    for (label, t), ok in zip(items, flags.tolist()):
        if not ok and not all_finite(t):
            raise LoRAError(f"{label} contains NaN or inf")


def all_finite(t: torch.Tensor) -> bool:
    """NaN/inf check in one vectorised pass (``aminmax`` propagates NaN; much faster than
    ``isfinite(t).all()`` on 16-bit CPU tensors)."""
    if t.numel() == 0:
        return True
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.bfloat16)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
