"""The data of a LoRA on its way into a model: one target's factors, an adapter, a plan.

:class:`LoraAdapter` (target module name → :class:`LoraDelta`) is what :mod:`converters.lora`
decodes a file into; :func:`svdq_format.lora.plan.plan_lora` turns it into a :class:`LoraPlan`
(model layer → :class:`LayerDelta`: fused, padded, checked), which
:func:`svdq_format.lora.attach.attach_lora` attaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RANK_MULTIPLE", "LoraDelta", "LoraAdapter", "LayerDelta", "LoraPlan"]


#: Each adapter's rank group on an SVDQ layer is padded with zero ranks to this multiple.
RANK_MULTIPLE = 16


@dataclass
class LoraDelta:
    """The LoRA of one target module, in canonical form: ``ΔW = B · diag(scales) · A``.

    Args:
        down: ``A`` ``[r, K]`` (float).
        up: ``B`` ``[N, r]`` (float).
        scales: Per-rank unit scales ``[r]`` (``alpha/r`` folded here, not into the factors).
        bias: Optional output bias delta ``[N]`` (PEFT ``lora_B.bias``).
    """

    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraAdapter:
    """One LoRA, normalised: target module names (diffusers names) → :class:`LoraDelta`.

    Args:
        name: Adapter name.
        deltas: Target module name → factors. A name may be a member of a fused SVDQ layer
            (``...attn.to_q`` of a ``to_qkv`` layer with ``fused_from``).
        params: Whole-parameter replacements (``"<module>.weight"`` → tensor), e.g. the norm
            weights of BFL control LoRAs; not scaled by the strength.
        source: Where it came from (shown in messages).
    """

    name: str
    deltas: dict[str, LoraDelta]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""


@dataclass
class LayerDelta:
    """The factors one model layer receives from one adapter (fusion and padding done)."""

    down: torch.Tensor  # [r, K] in the layer dtype
    up: torch.Tensor  # [N, r]
    scales: torch.Tensor  # [r] float32 unit scales (0 on padding ranks)
    bias: Optional[torch.Tensor]  # [N] float32 or None
    # Optional ready-made [own branch ++ this adapter] tensors (from a cache file made for this
    # very base): when this adapter is a layer's only one, they are used as the layer's
    # buffers directly, with no copy.
    full_down: Optional[torch.Tensor] = None
    full_up: Optional[torch.Tensor] = None


@dataclass
class LoraPlan:
    """Where an adapter lands in a model, validated and ready to attach.

    Attributes:
        adapter: The adapter's name.
        layers: Model module name → the factors it receives.
        params: Parameter name → replacement tensor.
        matched: Target module name (as in the LoRA) → model module name it landed in.
        unmatched: Target module names (or parameter names) the model has no place for.
    """

    adapter: str
    layers: dict[str, LayerDelta]
    params: dict[str, torch.Tensor]
    matched: dict[str, str]
    unmatched: list[str]
    source: str = ""

    def summary(self) -> str:
        """One line: how many targets matched and which did not (first few)."""
        text = f"{len(self.matched)} LoRA targets matched {len(self.layers)} layers"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:5]) + (" ..." if len(self.unmatched) > 5 else "")
            text += f"; {len(self.unmatched)} unmatched: {shown}"
        return text
