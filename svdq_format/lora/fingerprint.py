"""Which quantized base a LoRA conversion belongs to: the original low-rank branches and their hash."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

from ..linear import SVDQLinear
from .state import lora_state

__all__ = ["original_branches", "base_fingerprint"]


def original_branches(model: nn.Module) -> dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """``{layer: (lora_down, lora_up)}`` of every SVDQ layer as it is without any LoRA."""
    st = lora_state(model)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SVDQLinear):
            if st is not None and name in st.svdq_originals:
                out[name] = st.svdq_originals[name][:2]
            else:
                out[name] = (mod.lora_down, mod.lora_up)
    return out


def base_fingerprint(model: nn.Module) -> str:
    """A hash identifying a quantized base: its manifest and original low-rank branches.

    Computed once per model (memoised; the originals are used while LoRAs are attached).
    """
    st = lora_state(model)
    if st is not None and st.fingerprint is not None:
        return st.fingerprint
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        if not isinstance(mod, SVDQLinear):
            continue
        h.update(json.dumps([name, mod.spec.to_json()], sort_keys=True).encode())
        down, up = mod.lora_down, mod.lora_up
        if st is not None and name in st.svdq_originals:
            down, up = st.svdq_originals[name][:2]
        for t in (down, up):
            if t is not None:
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    value = h.hexdigest()[:32]
    lora_state(model, create=True).fingerprint = value
    return value
