"""Load LoRAs into SVDQuant models: the public API and the diffusers pipeline integration.

    from converters.lora import load_lora
    report = load_lora(model, "my_lora.safetensors", adapter_name="style", strength=0.8)
    print(report)                         # matched layers, unmatched keys
    set_lora_strengths(model, {"style": 0.5})   # rewrites lora_scales only
    unload_lora(model, "style")            # original tensors back, bit-identical

    enable_diffusers_lora(pipe)           # then pipe.load_lora_weights / set_adapters /
                                          # unload_lora_weights work as usual

Reading and key normalisation: :mod:`converters.lora_formats`; runtime state:
:mod:`svdq_format.lora`; delta files and cache: :mod:`converters.lora_delta`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from svdq_format.errors import LoRAError
from svdq_format.linear import SVDQLinear
from svdq_format.lora import (
    LoraPlan,
    attach_lora,
    base_fingerprint,
    check_plan,
    list_loras,
    original_branches,
    plan_lora,
    set_active_loras,
    set_lora_strengths,
    unload_all,
    unload_lora,
)

from . import lora_delta
from .lora_formats import RawLora, normalize_lora, read_lora

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

logger = logging.getLogger(__name__)


@dataclass
class LoraReport:
    """What a LoRA load did.

    Attributes:
        adapter: Adapter name.
        source: File (or ``"<dict>"``).
        format: Detected format (``"delta"`` for a converted file).
        matched: LoRA target → model layer it landed in.
        layers: Model layers changed.
        unmatched: LoRA keys/targets that landed nowhere.
        skipped: Keys for other pipeline components (text encoders).
        cached: Whether the converted form came from the cache or a delta file.
    """

    adapter: str
    source: str
    format: str
    matched: dict[str, str]
    layers: list[str]
    unmatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cached: bool = False

    def __str__(self) -> str:
        text = (
            f"{self.source}: adapter {self.adapter!r} ({self.format}): {len(self.matched)} targets "
            f"matched {len(self.layers)} layers"
        )
        if self.unmatched:
            text += f"; {len(self.unmatched)} unmatched keys: " + ", ".join(self.unmatched[:5])
            text += " ..." if len(self.unmatched) > 5 else ""
        if self.skipped:
            text += f"; {len(self.skipped)} keys for other components skipped"
        return text


def _enforce(report: LoraReport, *, strict: bool) -> None:
    if not report.matched:
        raise LoRAError(f"{report.source}: no LoRA key matched a layer of this model ({report})")
    if strict and report.unmatched:
        raise LoRAError(f"{report.source}: unmatched LoRA keys (pass strict=False to ignore them): {report}")
    if report.unmatched:
        logger.warning("%s", report)


def convert_lora(
    model: nn.Module,
    source: Any,
    *,
    adapter_name: str = "default",
    weight_name: Optional[str] = None,
) -> tuple[LoraPlan, LoraReport]:
    """Read, normalise and plan a LoRA for a model without changing the model."""
    raw = source if isinstance(source, RawLora) else read_lora(source, weight_name=weight_name)
    norm = normalize_lora(raw, adapter_name=adapter_name)
    plan = plan_lora(model, norm.adapter)
    plan.unmatched = sorted(set(plan.unmatched) | set(norm.dropped))
    report = LoraReport(adapter_name, raw.path, norm.format, plan.matched, sorted(plan.layers),
                        plan.unmatched, norm.skipped)
    return plan, report


def _source_key(raw_path: str, config: Optional[Mapping[str, Any]]) -> str:
    h = lora_delta.file_sha256(raw_path)
    if config:
        h = hashlib.sha256((h + json.dumps(config, sort_keys=True, default=str)).encode()).hexdigest()
    return h


def _read_device(model: nn.Module) -> Optional[torch.device]:
    """Where a LoRA file is read to: the quantized layers' CUDA device, else ``None`` (CPU mmap)."""
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            return m.qweight.device if m.qweight.is_cuda else None
    return None


def _plan_from_delta(
    model: nn.Module, path: str, adapter_name: str, *, check_fingerprint: bool
) -> tuple[LoraPlan, LoraReport]:
    plan, meta = lora_delta.load_delta(path, adapter_name=adapter_name, device=_read_device(model))
    if check_fingerprint:
        # a file from elsewhere: never take a stored copy of the base's own branch on trust
        for d in plan.layers.values():
            d.full_down = d.full_up = None
        want = base_fingerprint(model)
        if meta.get("base_fingerprint") != want:
            raise LoRAError(
                f"{path}: base_fingerprint: converted for another base model "
                f"({meta.get('base_fingerprint')}, this model is {want}); convert it again with `svdq lora`"
            )
    check_plan(model, plan)
    report = LoraReport(adapter_name, str(meta.get("source") or path), "delta", plan.matched,
                        sorted(plan.layers), plan.unmatched, list(meta.get("skipped") or []), cached=True)
    return plan, report


def load_lora(
    model: nn.Module,
    source: Any,
    *,
    adapter_name: str = "default",
    strength: float = 1.0,
    strict: bool = True,
    weight_name: Optional[str] = None,
    cache: bool = True,
) -> LoraReport:
    """Load a LoRA into a (quantized) model, as one more adapter.

    Args:
        model: A model with :class:`~svdq_format.linear.SVDQLinear` layers (plain
            ``nn.Linear`` targets work too).
        source: LoRA file, directory, Hub repo id, state dict, or a delta file written by
            ``svdq lora``.
        adapter_name: Name for :func:`set_lora_strengths` / :func:`unload_lora`.
        strength: Initial strength.
        strict: Unmatched LoRA keys are an error (zero matches always are).
        weight_name: File inside a directory/repo holding several.
        cache: Reuse/store the converted form in the local cache (file sources only).

    Returns:
        The :class:`LoraReport`.

    Raises:
        LoRAError: bad input of any kind; the model is then unchanged.
    """
    path = None if isinstance(source, (Mapping, RawLora)) else os.fspath(source)
    if path is not None and os.path.isfile(path) and lora_delta.is_delta_file(path):
        plan, report = _plan_from_delta(model, path, adapter_name, check_fingerprint=True)
    else:
        raw = source if isinstance(source, RawLora) else read_lora(source, weight_name=weight_name,
                                                                   device=_read_device(model))
        cached_file = None
        if cache and raw.path != "<dict>" and os.path.isfile(raw.path):
            cached_file = lora_delta.cache_path(_source_key(raw.path, raw.config), base_fingerprint(model))
        plan = None
        if cached_file is not None and cached_file.is_file():
            try:
                plan, report = _plan_from_delta(model, str(cached_file), adapter_name, check_fingerprint=False)
            except LoRAError as exc:  # a damaged cache entry is only a miss
                logger.warning("ignoring damaged LoRA cache entry: %s", exc)
                cached_file.unlink(missing_ok=True)
                plan = None
        if plan is None:
            plan, report = convert_lora(model, raw, adapter_name=adapter_name)
            _enforce(report, strict=strict)
            attach_lora(model, plan, strength=strength)
            if cached_file is not None and plan.layers:
                try:
                    cached_file.parent.mkdir(parents=True, exist_ok=True)
                    lora_delta.save_delta(plan, cached_file, base_fingerprint=base_fingerprint(model),
                                          info={"source": raw.path, "format": report.format, "skipped": report.skipped},
                                          base_branches=original_branches(model), durable=False,
                                          current={n: (m.lora_down, m.lora_up) for n, m in model.named_modules()
                                                   if isinstance(m, SVDQLinear) and n in plan.layers})
                except OSError as exc:
                    logger.warning("cannot write LoRA cache %s: %s", cached_file, exc)
            return report
    assert plan is not None
    _enforce(report, strict=strict)
    attach_lora(model, plan, strength=strength)
    return report


# --------------------------------------------------------------------------- diffusers


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
    from svdq_format.linear import SVDQLinear

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
