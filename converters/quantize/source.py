"""The source of a quantization run: a local diffusers model (or pipeline) directory.

:func:`check_model_dir` checks it without reading weights; :func:`load_diffusers_model` loads its
transformer (``svdq quantize``; ``--offload disk`` builds it lazily instead,
:func:`converters.quantize.streaming.load_lazy`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format import jsonsafe
from svdq_format.errors import QuantizationError

__all__ = ["DTYPES", "dtype_kwargs", "loading_bars", "check_model_dir", "load_diffusers_model",
           "refuse_pickle_weights"]

#: Load dtypes by name (``--dtype``).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a load dtype: ``dtype`` where diffusers takes it (newer
    releases deprecate ``torch_dtype`` with a warning), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


@contextlib.contextmanager
def loading_bars(enabled: bool) -> Iterator[None]:
    """diffusers' and transformers' own loading progress bars off unless ``enabled``; restored after."""
    import importlib

    loggers = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            loggers.append(importlib.import_module(name))
        except ImportError:
            continue
    was = [mod.is_progress_bar_enabled() for mod in loggers]
    if not enabled:
        for mod in loggers:
            mod.disable_progress_bar()
    try:
        yield
    finally:
        for mod, on in zip(loggers, was):
            (mod.enable_progress_bar if on else mod.disable_progress_bar)()


def check_model_dir(src: str | os.PathLike[str]) -> tuple[Any, Path]:
    """Check that ``src`` is a local diffusers model (or pipeline) directory, reading no weights.

    Returns:
        ``(diffusers model class, the directory holding its config.json)``.

    Raises:
        QuantizationError: missing directory, not a diffusers model, unknown class, already
            quantized.
    """
    import diffusers

    root = Path(src)
    if not root.exists():
        raise QuantizationError(f"{root}: no such directory")
    if not root.is_dir():
        raise QuantizationError(f"{root}: not a directory (give a diffusers model directory)")
    d = next((root / c for c in ("transformer", "unet") if (root / c / "config.json").is_file()), root)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise QuantizationError(f"{root}: not a diffusers model directory (no config.json)")
    try:
        cfg = jsonsafe.loads(cfg_path.read_text())
    except ValueError as exc:
        raise QuantizationError(f"{cfg_path}: not valid JSON ({exc})") from None
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise QuantizationError(f"{cfg_path}: _class_name {name!r} is not a diffusers model class")
    if isinstance(cfg, dict) and "quantization_config" in cfg:
        raise QuantizationError(f"{cfg_path}: the model is already quantized")
    refuse_pickle_weights(d)
    return cls, d


def refuse_pickle_weights(d: Path) -> None:
    """Refuse a model directory whose weights are pickles (``.bin``/``.pt``/``.pth``/``.ckpt``).

    diffusers would unpickle them (``torch.load(weights_only=True)``); svdquant never loads a
    pickle, so the dense source must be safetensors.

    Raises:
        QuantizationError: naming the pickle file.
    """
    if any(d.glob("*.safetensors")):
        return
    pickles = sorted(p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise QuantizationError(
            f"{pickles[0]}: weights are not safetensors: svdquant never loads pickles (unpickling can run "
            "arbitrary code); convert them to .safetensors with a tool you trust")


def load_diffusers_model(src: str | os.PathLike[str], *, dtype: str = "bfloat16") -> tuple[nn.Module, Path]:
    """Load the transformer of a local diffusers model (or pipeline) directory.

    Args:
        src: A model directory (``config.json`` with ``_class_name``) or a pipeline directory
            with a ``transformer/`` subfolder.
        dtype: ``bfloat16``, ``float16`` or ``float32``.

    Returns:
        ``(model, the directory it was loaded from)``.

    Raises:
        QuantizationError: missing directory, not a diffusers model, unknown class, load error.
    """
    cls, d = check_model_dir(src)
    name = cls.__name__
    if dtype not in DTYPES:
        raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    try:
        model = cls.from_pretrained(d, use_safetensors=True, **dtype_kwargs(DTYPES[dtype]))  # never a pickle
    except Exception as exc:  # diffusers raises many types for broken directories
        raise QuantizationError(f"{d}: cannot load {name} ({' '.join(str(exc).split())[:200]})") from None
    return model.eval(), d
