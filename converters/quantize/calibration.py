"""Calibration: model inputs in, bounded per-layer activation statistics out.

Inputs (:class:`CalibrationSet`, a list of keyword-argument dicts for ``model(**sample)``):

* a safetensors file of captured transformer inputs (:func:`load_calibration`, written by
  :func:`save_calibration` or :func:`capture_inputs`);
* a diffusers pipeline + prompts (:func:`capture_pipeline_inputs`: transformer inputs captured
  across the denoising steps);
* synthetic inputs shaped from the model config (:func:`synthetic_calibration`; lower quality,
  a warning says so).

What the quantizer keeps of them (per-layer statistics) is computed by
:func:`converters.quantize.stats.collect_stats`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.errors import FormatError, QuantizationError
from svdq_format.io import refuse_pickle

__all__ = [
    "CalibrationSet",
    "Sample",
    "load_calibration",
    "save_calibration",
    "synthetic_calibration",
    "capture_inputs",
    "capture_pipeline_inputs",
]

_META_KEY = "svdq_calibration"
_SEP = "::"

#: A calibration sample: keyword arguments of the model's forward (tensors, nested dicts, scalars).
Sample = dict[str, Any]


@dataclasses.dataclass
class CalibrationSet:
    """Model inputs used for calibration.

    Attributes:
        samples: Keyword-argument dicts, one forward call each.
        source: Where they came from (``"synthetic"``, a file name, ``"pipeline"``).
    """

    samples: list[Sample]
    source: str = "samples"

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


# --------------------------------------------------------------------------- files


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], static: dict[str, Any],
             seen: set[int]) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        # one tensor object in several samples (a shared ``timestep``), or views of one batch:
        # safetensors refuses tensors that share memory, so every repeat gets its own copy
        if storage in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[prefix] = t
    elif isinstance(value, Mapping):
        static[prefix] = {"__dict__": sorted(value)}
        for k, v in value.items():
            _flatten(f"{prefix}{_SEP}{k}", v, tensors, static, seen)
    elif isinstance(value, (list, tuple)):
        static[prefix] = {"__list__": len(value), "tuple": isinstance(value, tuple)}
        for k, v in enumerate(value):
            _flatten(f"{prefix}{_SEP}{k}", v, tensors, static, seen)
    elif value is None or isinstance(value, (bool, int, float, str)):
        static[prefix] = value
    else:
        raise QuantizationError(f"calibration input {prefix!r}: cannot store a {type(value).__name__}")


def save_calibration(samples: Iterable[Sample], path: str | os.PathLike[str]) -> Path:
    """Write calibration samples to a safetensors file (atomic).

    Tensor ``name`` of sample ``i`` is stored as ``"{i:05d}::name"`` (nested dicts add
    ``"::key"``, lists and tuples ``"::index"``); non-tensor values (``None``, numbers, strings)
    go to the header metadata. A tensor object used by several samples is stored once per use.
    """
    from svdq_format.io import write_tensors

    tensors: dict[str, torch.Tensor] = {}
    static: dict[str, Any] = {}
    seen: set[int] = set()
    n = 0
    for i, sample in enumerate(samples):
        for name, value in sample.items():
            _flatten(f"{i:05d}{_SEP}{name}", value, tensors, static, seen)
        n = i + 1
    meta = {_META_KEY: json.dumps({"version": 1, "num_samples": n, "static": static})}
    p = Path(path)
    write_tensors(p, tensors, metadata=meta)
    return p


def load_calibration(path: str | os.PathLike[str]) -> CalibrationSet:
    """Read a file written by :func:`save_calibration` (checks every tensor is finite).

    Raises:
        QuantizationError: missing/unreadable file, not a calibration file, or NaN/inf values
            (naming the file and tensor).
    """
    from safetensors import safe_open

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise QuantizationError(f"{p}: calibration file not found")
    try:
        refuse_pickle(p)  # a torch.save'd .pt/.bin: refused with an explanation, never unpickled
    except FormatError as exc:
        raise QuantizationError(f"{p}: {exc.reason}") from None
    try:
        handle_cm = safe_open(p, framework="pt", device="cpu")
        with handle_cm as handle:
            meta = handle.metadata() or {}
            if _META_KEY not in meta:
                raise QuantizationError(f"{p}: not a calibration file (no {_META_KEY!r} metadata)")
            info = json.loads(meta[_META_KEY])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except QuantizationError:
        raise
    except Exception as exc:  # safetensors / JSON errors
        raise QuantizationError(f"{p}: cannot read calibration file ({exc})") from None
    samples: list[Sample] = [{} for _ in range(int(info.get("num_samples", 0)))]
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantizationError(f"{p}: {key}: calibration data contains NaN or inf")
    entries = [(k, v, True) for k, v in tensors.items()] + [
        (k, v, False) for k, v in info.get("static", {}).items()
    ]
    lists: dict[str, tuple[int, bool]] = {}
    for key, value, _is_tensor in sorted(entries, key=lambda e: e[0].count(_SEP)):
        parts = key.split(_SEP)
        try:
            target = samples[int(parts[0])]
            for part in parts[1:-1]:
                target = target.setdefault(part, {})
        except (ValueError, IndexError, AttributeError):
            raise QuantizationError(f"{p}: {key}: bad calibration key") from None
        if isinstance(value, dict) and "__dict__" in value:
            target.setdefault(parts[-1], {})
        elif isinstance(value, dict) and "__list__" in value:
            target.setdefault(parts[-1], {})
            lists[key] = (int(value["__list__"]), bool(value.get("tuple")))
        else:
            target[parts[-1]] = value
    if not samples:
        raise QuantizationError(f"{p}: calibration file holds no samples")

    def rebuild(node: Any, key: str) -> Any:  # lists and tuples were stored as {"0": ..., "1": ...}
        if not isinstance(node, dict):
            return node
        items = {k: rebuild(v, f"{key}{_SEP}{k}") for k, v in node.items()}
        if key not in lists:
            return items
        n, is_tuple = lists[key]
        try:
            seq = [items[str(i)] for i in range(n)]
        except KeyError:
            raise QuantizationError(f"{p}: {key}: list entries missing") from None
        return tuple(seq) if is_tuple else seq

    samples = [{k: rebuild(v, f"{i:05d}{_SEP}{k}") for k, v in s.items()} for i, s in enumerate(samples)]
    return CalibrationSet(samples, source=os.path.basename(p))


# --------------------------------------------------------------------------- capture


@contextlib.contextmanager
def capture_inputs(module: nn.Module, *, max_samples: int | None = None) -> Iterator[list[Sample]]:
    """Record the keyword inputs of every ``module(...)`` call inside the ``with`` block.

    Positional arguments are mapped to parameter names of ``module.forward``. Tensors are
    copied to the CPU. Yields the list that fills up (at most ``max_samples`` entries).
    """
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    out: list[Sample] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if max_samples is not None and len(out) >= max_samples:
            return
        sample: Sample = dict(zip(params, args))
        sample.update(kwargs)

        def cpu(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().to("cpu").clone()
            if isinstance(v, Mapping):
                return {k: cpu(x) for k, x in v.items()}
            return v

        out.append({k: cpu(v) for k, v in sample.items() if k != "return_dict"})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


def capture_pipeline_inputs(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    calls: Sequence[Mapping[str, Any]] | None = None,
    num_inference_steps: int = 8,
    max_samples: int = 32,
    seed: int = 0,
    **pipe_kwargs: Any,
) -> CalibrationSet:
    """Run a diffusers pipeline and capture its transformer's inputs at every denoising step.

    Args:
        pipe: A diffusers pipeline with a ``.transformer`` (or ``.unet``).
        prompts: Text prompts (each becomes one call with ``prompt=``).
        calls: Instead of prompts, keyword arguments of each pipeline call (e.g.
            ``{"class_labels": [3]}`` for class-conditional pipelines).
        num_inference_steps: Denoising steps per call.
        max_samples: Samples kept in total, spread evenly over calls and steps.
        seed: Seed of each call's generator (``seed + call index``).
        **pipe_kwargs: Passed to every call (e.g. ``height``, ``width``, ``guidance_scale``).
    """
    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)  # (SD / SDXL: a UNet)
    if transformer is None:
        raise QuantizationError(f"{type(pipe).__name__} has no .transformer (or .unet) to calibrate")
    todo = [dict(c) for c in calls] if calls else [{"prompt": p} for p in (prompts or [])]
    if not todo:
        raise QuantizationError("no prompts given for calibration")
    per_call = max(1, math.ceil(max_samples / len(todo)))
    samples: list[Sample] = []
    for i, kwargs in enumerate(todo):
        if len(samples) >= max_samples:
            break
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        with capture_inputs(transformer) as got, torch.no_grad():
            pipe(**kwargs, num_inference_steps=num_inference_steps, generator=gen, **pipe_kwargs)
        stride = max(1, len(got) // per_call)
        samples.extend(got[::stride][:per_call])
    return CalibrationSet(samples[:max_samples], source="pipeline")


# --------------------------------------------------------------------------- synthetic


def synthetic_calibration(
    model: nn.Module,
    num_samples: int = 8,
    *,
    seed: int = 0,
    image_tokens: int | None = None,
    text_tokens: int | None = None,
    warn: bool = True,
) -> CalibrationSet:
    """Random inputs shaped from the model's forward signature and config (any diffusers denoiser).

    Real captured inputs calibrate better; this exists for benchmarks, smoke tests and when no
    pipeline is at hand (a warning says so). How the inputs are derived:
    :mod:`converters.quantize.synthetic`.

    Args:
        model: The diffusers transformer (or UNet).
        num_samples: Number of forward calls (batch 1 each).
        seed: Seed of the generator.
        image_tokens: Latent tokens per sample after patching (default 256).
        text_tokens: Text tokens per sample (default 64; a text-length limit in the config wins).

    Raises:
        QuantizationError: one line saying why inputs cannot be synthesized for this model.
    """
    from .synthetic import synthetic_samples

    plan, samples = synthetic_samples(model, num_samples, seed=seed, image_tokens=image_tokens or 256,
                                      text_tokens=text_tokens or 64)
    if warn:
        warnings.warn(
            "calibrating on synthetic random inputs: quantization quality will be lower than "
            f"with captured inputs (--calibration FILE or --prompts); {plan.describe()}",
            UserWarning,
            stacklevel=2,
        )
    return CalibrationSet(samples, source="synthetic")
