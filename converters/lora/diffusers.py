"""diffusers' LoRA API on SVDQuant models: ``load_lora_adapter``, ``set_adapters``, ``unload_lora`` ...

:func:`enable_diffusers_lora` binds them on a quantized transformer (or a pipeline's); each one
calls :func:`converters.lora.load.load_lora` or the runtime functions of :mod:`svdq_format.lora`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from svdq_format.errors import LoRAError
from svdq_format.linear import SVDQLinear
from svdq_format.lora import list_loras, set_active_loras, unload_all, unload_lora

from .formats import RawLora
from .load import load_lora

__all__ = ["enable_diffusers_lora"]


def _model_load_lora_adapter(self: nn.Module, pretrained_model_name_or_path_or_dict: Any, prefix: str = "transformer",
                             hotswap: bool = False, **kwargs: Any) -> None:
    if hotswap:
        raise LoRAError("hotswap is not supported on SVDQuant models; unload and load instead")
    adapter_name = kwargs.pop("adapter_name", None) or f"default_{len(list_loras(self))}"
    network_alphas = kwargs.pop("network_alphas", None) or {}
    metadata = kwargs.pop("metadata", None)
    weight_name = kwargs.pop("weight_name", None)
    src = pretrained_model_name_or_path_or_dict
    if not isinstance(src, Mapping):
        load_lora(self, src, adapter_name=adapter_name, weight_name=weight_name)
        _sync_peft_config(self)
        return
    sd = dict(src)
    if prefix and any(k.startswith(f"{prefix}.") for k in sd):
        # diffusers' kohya converter leaves img_in/txt_in targets (x_embedder,
        # context_embedder) unprefixed; keep every key that belongs to no other component
        sd = {k.removeprefix(f"{prefix}."): v for k, v in sd.items()
              if k.startswith(f"{prefix}.") or not k.startswith(("text_encoder", "unet."))}
    for k, v in network_alphas.items():
        if not prefix or k.startswith(f"{prefix}."):
            sd[k.removeprefix(f"{prefix}.") if prefix else k] = torch.as_tensor(float(v))
    config = None
    if metadata:
        config = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items()}
    load_lora(self, RawLora(sd, config, "<dict>"), adapter_name=adapter_name)
    _sync_peft_config(self)


def _sync_peft_config(model: nn.Module) -> None:
    names = list_loras(model)
    if names:
        model.__dict__["peft_config"] = {n: {"svdquant": True} for n in names}
    elif "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]


def _model_set_adapters(self: nn.Module, adapter_names: Any, weights: Any = None) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [weights] * len(names)
    set_active_loras(self, names, list(weights))


def _model_unload_lora(self: nn.Module) -> None:
    unload_all(self)
    _sync_peft_config(self)


def _model_delete_adapters(self: nn.Module, adapter_names: Any) -> None:
    for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        unload_lora(self, n)
    _sync_peft_config(self)


def _model_disable_lora(self: nn.Module) -> None:
    set_active_loras(self, [])


def _model_enable_lora(self: nn.Module) -> None:
    st = list_loras(self)
    set_active_loras(self, list(st))


def _model_fuse_lora(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise LoRAError(
        "fuse_lora is not available on SVDQuant models: a LoRA already runs inside the fused "
        "low-rank branch (no extra kernel), and merging it into 4-bit weights would requantize them"
    )


_MODEL_METHODS: dict[str, Callable[..., Any]] = {
    "fuse_lora": _model_fuse_lora,
    "unfuse_lora": _model_fuse_lora,
    "load_lora_adapter": _model_load_lora_adapter,
    "set_adapters": _model_set_adapters,
    "unload_lora": _model_unload_lora,
    "delete_adapters": _model_delete_adapters,
    "disable_lora": _model_disable_lora,
    "enable_lora": _model_enable_lora,
}


def enable_diffusers_lora(obj: Any) -> Any:
    """Route diffusers' LoRA API to svdquant on a quantized transformer or a pipeline.

    On a model, ``load_lora_adapter``, ``set_adapters``, ``unload_lora``, ``delete_adapters``,
    ``disable_lora`` and ``enable_lora`` are bound on the instance (the class is untouched).
    On a pipeline (anything with a ``transformer``), its transformer gets them, and the
    pipeline's Flux-specific LoRA shape expansion skips SVDQ layers (it reads ``.weight``,
    which a 4-bit layer does not have) — so ``pipe.load_lora_weights``, ``pipe.set_adapters``,
    ``pipe.delete_adapters`` and ``pipe.unload_lora_weights`` work as usual.

    Returns:
        ``obj``.
    """
    model = getattr(obj, "transformer", None)
    if isinstance(model, nn.Module):
        _install_on_pipeline(obj, model)
        model_target = model
    elif isinstance(obj, nn.Module):
        model_target = obj
    else:
        raise LoRAError(f"{type(obj).__name__} is neither a model nor a pipeline with a transformer")
    for name, fn in _MODEL_METHODS.items():
        setattr(model_target, name, types.MethodType(fn, model_target))
    return obj


def _install_on_pipeline(pipe: Any, transformer: nn.Module) -> None:
    original = getattr(pipe, "_maybe_expand_lora_state_dict", None)
    if original is None or getattr(original, "_svdq", False):
        return

    def expand(transformer: nn.Module, lora_state_dict: dict) -> dict:
        svdq = {n for n, m in transformer.named_modules() if isinstance(m, SVDQLinear)}
        held = {k: v for k, v in lora_state_dict.items()
                if k.removeprefix("transformer.").split(".lora_")[0] in svdq}
        rest = {k: v for k, v in lora_state_dict.items() if k not in held}
        out = original(transformer=transformer, lora_state_dict=rest) if rest else rest
        out.update(held)
        return out

    expand._svdq = True  # type: ignore[attr-defined]
    pipe._maybe_expand_lora_state_dict = expand
