"""LoRAs on SVDQuant models at run time: plan, attach, scale, detach.

This package knows nothing of LoRA *file formats*: :mod:`converters.lora` decodes files into
:class:`LoraAdapter` objects (module name → factors) or ready :class:`LoraPlan` objects (delta
files), and this package does the rest, one responsibility per module:

* :mod:`~svdq_format.lora.types` — the data (:class:`LoraDelta`, :class:`LoraAdapter`,
  :class:`LayerDelta`, :class:`LoraPlan`);
* :mod:`~svdq_format.lora.plan` — where an adapter lands (:func:`plan_lora`), a stored plan
  checked against a model (:func:`check_plan`), several plans as one (:func:`compose_plans`);
* :mod:`~svdq_format.lora.checks` — the factor checks both use (shapes, dtypes, NaN/inf);
* :mod:`~svdq_format.lora.attach` — :func:`attach_lora`, strengths, :func:`unload_lora` /
  :func:`unload_all` (rank concatenation onto the low-rank branch, exact undo);
* :mod:`~svdq_format.lora.state` — what is attached, held in the model's ``__dict__``;
* :mod:`~svdq_format.lora.fingerprint` — which base a conversion belongs to.
"""

from __future__ import annotations

from .attach import attach_lora, list_loras, set_active_loras, set_lora_strengths, unload_all, unload_lora
from .fingerprint import base_fingerprint, original_branches
from .plan import check_plan, compose_plans, plan_lora
from .types import RANK_MULTIPLE, LayerDelta, LoraAdapter, LoraDelta, LoraPlan

__all__ = [
    "RANK_MULTIPLE",
    "LoraDelta",
    "LayerDelta",
    "LoraAdapter",
    "LoraPlan",
    "plan_lora",
    "attach_lora",
    "set_lora_strengths",
    "set_active_loras",
    "unload_lora",
    "unload_all",
    "list_loras",
    "base_fingerprint",
    "check_plan",
    "compose_plans",
    "original_branches",
]
