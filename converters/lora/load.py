"""``load_lora``: a LoRA into an SVDQuant model, as one more adapter.

The flow reads one way. Decode: a LoRA file, directory, Hub repo or state dict is read and
normalised (:mod:`converters.lora.formats`) and planned against the model
(:func:`svdq_format.lora.plan_lora`: fusion, padding, checks), or a ready plan is read from a
delta file or the cache (:mod:`converters.lora.delta`). Attach: :func:`svdq_format.lora.attach_lora`
concatenates the factors onto the low-rank branches; strengths and unloading are
:mod:`svdq_format.lora`'s too. A plan decoded from a LoRA file is stored in the cache after it
is attached, so the next load of the same file onto the same base reads it back.

    report = load_lora(model, "my_lora.safetensors", adapter_name="style", strength=0.8)
    print(report)                         # matched layers, unmatched keys
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    original_branches,
    plan_lora,
)

from . import delta as lora_delta
from .formats import RawLora, normalize_lora, read_lora

__all__ = ["LoraReport", "check_report", "convert_lora", "load_lora"]

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


def check_report(report: LoraReport, *, strict: bool) -> None:
    """Refuse a LoRA that matched nothing, or (``strict``) left keys unmatched; else warn about them.

    Raises:
        LoRAError: no key matched, or ``strict`` and some did not.
    """
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
    plan, report, cache_file, raw_path = _decode(model, source, adapter_name=adapter_name, weight_name=weight_name,
                                                 cache=cache)
    check_report(report, strict=strict)
    attach_lora(model, plan, strength=strength)
    if cache_file is not None and plan.layers:
        _store(model, plan, report, cache_file, raw_path)
    return report


def _decode(model: nn.Module, source: Any, *, adapter_name: str, weight_name: Optional[str],
            cache: bool) -> tuple[LoraPlan, LoraReport, Optional[Path], str]:
    """The LoRA as a plan for ``model`` (decoded, not attached): from a delta file, from the
    cache, or converted from a LoRA file / state dict. Also where a freshly converted plan is to
    be cached after it is attached (None: nowhere) and the source file it came from."""
    path = None if isinstance(source, (Mapping, RawLora)) else os.fspath(source)
    if path is not None and os.path.isfile(path) and lora_delta.is_delta_file(path):
        return (*_plan_from_delta(model, path, adapter_name, check_fingerprint=True), None, path)
    raw = source if isinstance(source, RawLora) else read_lora(source, weight_name=weight_name,
                                                               device=_read_device(model))
    cache_file = None
    if cache and raw.path != "<dict>" and os.path.isfile(raw.path):
        cache_file = lora_delta.cache_path(_source_key(raw.path, raw.config), base_fingerprint(model))
        if cache_file.is_file():
            try:
                return (*_plan_from_delta(model, str(cache_file), adapter_name, check_fingerprint=False), None,
                        raw.path)
            except LoRAError as exc:  # a damaged cache entry is only a miss
                logger.warning("ignoring damaged LoRA cache entry: %s", exc)
                cache_file.unlink(missing_ok=True)
    return (*convert_lora(model, raw, adapter_name=adapter_name), cache_file, raw.path)


def _store(model: nn.Module, plan: LoraPlan, report: LoraReport, cache_file: Path, raw_path: str) -> None:
    """Cache an attached plan for this base (with the ready-made concatenated branches)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        lora_delta.save_delta(plan, cache_file, base_fingerprint=base_fingerprint(model),
                              info={"source": raw_path, "format": report.format, "skipped": report.skipped},
                              base_branches=original_branches(model), durable=False,
                              current={n: (m.lora_down, m.lora_up) for n, m in model.named_modules()
                                       if isinstance(m, SVDQLinear) and n in plan.layers})
    except OSError as exc:
        logger.warning("cannot write LoRA cache %s: %s", cache_file, exc)
