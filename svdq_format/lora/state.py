"""The LoRA state of one model: attached adapters, the tensors they replaced, hooks, fingerprint.

It lives in the model's ``__dict__`` under :data:`STATE_ATTR` (no attribute of ``nn.Module``, so
``state_dict`` and ``to`` never see it); :func:`lora_state` is the one way to reach it.
Updates run in :func:`one_thread`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal, Optional, overload

import torch
from torch import nn

from .types import LayerDelta

__all__ = ["STATE_ATTR", "AdapterRecord", "LoraState", "lora_state", "reset_lora_state", "one_thread"]

#: Key of the state in the model's ``__dict__``.
STATE_ATTR = "_svdq_lora_state"


@dataclass
class AdapterRecord:
    """One attached adapter: its planned layers and parameters, strength, and whether it is active."""

    name: str
    layers: dict[str, LayerDelta]
    params: dict[str, torch.Tensor]
    strength: float
    active: bool = True

    @property
    def effective(self) -> float:
        """The strength in force (0 while disabled)."""
        return self.strength if self.active else 0.0


@dataclass
class LoraState:
    """Everything a model's attached LoRAs changed, so that each change can be undone exactly."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    # SVDQ layer name -> original (lora_down, lora_up, lora_scales, bias) tensor objects
    svdq_originals: dict[str, tuple] = field(default_factory=dict)
    # 16-bit linear name -> forward hook handle
    hooks: dict[str, torch.utils.hooks.RemovableHandle] = field(default_factory=dict)
    # parameter name -> original tensor object
    param_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: Optional[str] = None

    @property
    def is_empty(self) -> bool:
        """No adapter attached and nothing replaced (only a fingerprint may be kept)."""
        return not (self.adapters or self.svdq_originals or self.hooks or self.param_originals)


@overload
def lora_state(model: nn.Module, create: Literal[True]) -> LoraState: ...
@overload
def lora_state(model: nn.Module, create: bool = False) -> Optional[LoraState]: ...
def lora_state(model: nn.Module, create: bool = False) -> Optional[LoraState]:
    """The model's LoRA state; None when it has none, unless ``create``."""
    st = model.__dict__.get(STATE_ATTR)
    if st is None and create:
        st = LoraState()
        model.__dict__[STATE_ATTR] = st
    return st


def reset_lora_state(model: nn.Module) -> None:
    """Drop the model's LoRA state, keeping only the (expensive) fingerprint of its unchanged base."""
    st = model.__dict__.pop(STATE_ATTR, None)
    if st is not None and st.fingerprint is not None:
        lora_state(model, create=True).fingerprint = st.fingerprint


@contextlib.contextmanager
def one_thread():
    """Run the many small memory-bound tensor ops of a LoRA load on one intra-op thread.

    A load issues thousands of short ops (copies, NaN checks); with several OpenMP threads each
    one is a parallel region whose barrier stalls whenever a sibling thread is descheduled, which
    on a busy machine turns a sub-second load into tens of seconds. One thread is as fast for
    memory-bound copies and immune to that. (``torch.set_num_threads`` is process-wide.)
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
