"""LoRAs for SVDQuant models: files in, factors out; :mod:`svdq_format.lora` attaches them.

One direction: the modules here *decode* — a LoRA file, directory, Hub repo or state dict
(:mod:`~converters.lora.formats`), a delta file or a cache entry (:mod:`~converters.lora.delta`)
— into per-layer factors (an :class:`~svdq_format.lora.LoraAdapter` or a planned
:class:`~svdq_format.lora.LoraPlan`); :mod:`svdq_format.lora` plans, attaches, scales and
detaches them on the model. :mod:`~converters.lora.load` is the one entry point joining the
two (:func:`load_lora`), :mod:`~converters.lora.diffusers` routes diffusers' LoRA API to it,
:mod:`~converters.lora.extract` makes a LoRA from two dense models and
:mod:`~converters.lora.cli` is ``svdq lora`` / ``svdq extract-lora``.

    from converters.lora import load_lora
    report = load_lora(model, "my_lora.safetensors", adapter_name="style", strength=0.8)
    set_lora_strengths(model, {"style": 0.5})   # rewrites lora_scales only
    unload_lora(model, "style")                 # original tensors back, bit-identical
"""

from __future__ import annotations

from svdq_format.lora import list_loras, set_lora_strengths, unload_all, unload_lora

from .diffusers import enable_diffusers_lora
from .load import LoraReport, convert_lora, load_lora

__all__ = [
    "LoraReport",
    "load_lora",
    "convert_lora",
    "set_lora_strengths",
    "unload_lora",
    "unload_all",
    "list_loras",
    "enable_diffusers_lora",
]
