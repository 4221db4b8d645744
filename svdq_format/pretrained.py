"""Load whole quantized models: build the model from its config, then the loading core fills it.

* :func:`load_pretrained` — a model directory (sharded or not) or a single-file model in one
  call: the model is built on the meta device and tensors are streamed to the target device;
  a diffusers model comes back with the svdquant quantizer attached.
* :func:`attach_svdquant` — that quantizer on a diffusers or transformers model (also what the
  quantizer's output gets).
* :func:`load_model_file` — a whole-model file into a model you built.
* :func:`load_model_dir` — a directory written by :func:`svdq_format.model.save_model_dir`.

Each is :func:`svdq_format.checkpoint.open_checkpoint` (files, headers, manifests, config) +
:func:`svdq_format.checkpoint.load_into` (key sets, shapes, tensors): the checks live there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, load_into, open_checkpoint
from .commit import retry_mixed
from .errors import ManifestError
from .spec import FormatMetadata, LayerSpec

__all__ = ["load_pretrained", "load_model_file", "load_model_dir", "model_class", "build_model",
           "attach_svdquant"]


def model_class(config: Mapping[str, Any], file: str) -> Any:
    """The diffusers model class a config names (``_class_name``).

    Raises:
        ManifestError: no such diffusers class with ``from_config``.
    """
    name = config.get("_class_name")
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)) or cls.__name__.startswith("Auto"):
        raise ManifestError(file, "_class_name", f"{str(name)[:80]!r} is not a diffusers model class "
                            "(an auto class, a pipeline or an unknown name)")
    return cls


def build_model(model_cls: Any, cfg: Mapping[str, Any], *, file: str, meta: bool = True) -> nn.Module:
    """``model_cls.from_config(cfg)`` (parameters on the meta device when ``meta``), any failure
    of the class on this config one typed line.

    Raises:
        ManifestError: naming ``file`` and what the class said.
    """
    try:
        return _empty_model(model_cls, cfg) if meta else model_cls.from_config(dict(cfg))
    except RecursionError:
        raise ManifestError(file, None, f"cannot build {model_cls.__name__} from this config (recursion)") from None
    except Exception as exc:  # the model class's own checks raise anything
        first = " ".join(str(exc).split())[:200]
        raise ManifestError(file, None, f"cannot build {getattr(model_cls, '__name__', model_cls)} from this "
                            f"config ({type(exc).__name__}: {first})") from None


def _empty_model(model_cls: Any, cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model with its parameters on the meta device (no memory, no init)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate ships with diffusers installs
        init_empty_weights = contextlib.nullcontext
    with init_empty_weights():
        return model_cls.from_config(dict(cfg))


def attach_svdquant(model: nn.Module, meta: FormatMetadata) -> None:
    """Give a model holding SVDQ layers its library's svdquant quantizer, as loading leaves one.

    A diffusers model gets :func:`svdq_format.diffusers.attach_quantizer`, a transformers model
    (a config with ``model_type``) :func:`svdq_format.transformers.attach_quantizer`: its
    ``save_pretrained`` then writes this format again and pipelines accept it. Other modules are
    left as they are.
    """
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    if isinstance(model, ModelMixin):
        from .diffusers import attach_quantizer  # (imports diffusers' quantizers: only for its models)

        attach_quantizer(model, meta)
    elif hasattr(getattr(model, "config", None), "model_type"):
        from .transformers import attach_quantizer as attach_hf  # (imports transformers' quantizers)

        attach_hf(model, meta)


def load_pretrained(
    path: str | os.PathLike[str],
    model_cls: Any = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a quantized model from a directory (sharded or not) or a single file, in one call.

    The model is built from its config with parameters on the meta device, the manifest's
    linears are swapped for ``SVDQLinear``, every header is checked against its manifest and
    the key sets must match exactly (missing or unexpected tensors raise). Tensors are then
    read one at a time and moved to ``device``, so host memory holds at most one tensor beyond
    what the model keeps there.

    Args:
        path: A model directory (``config.json`` + weights) or a single-file checkpoint.
        model_cls: Class with ``from_config``; default: the diffusers class named in the config.
        device: Target device of every tensor.
        dtype: Compute dtype to load in: the dense floating tensors are cast to it and it becomes
            the SVDQ layers' compute dtype (their smooth, low-rank and bias tensors are cast;
            4-bit codes and scales stay as stored). Default: as stored.

    Returns:
        The quantized model in eval mode. diffusers models come back with the svdquant
        quantizer attached, so ``model.save_pretrained`` writes this format again.

    Raises:
        FormatError: (or a subclass) naming file, key and reason.
    """
    def attempt() -> nn.Module:
        ckpt = open_checkpoint(path, need_config=True)
        assert ckpt.config is not None
        cls = model_cls if model_cls is not None else model_class(ckpt.config, ckpt.where)
        model = build_model(cls, ckpt.config, file=ckpt.where)
        specs = load_into(model, ckpt, device=device, dtype=dtype)
        attach_svdquant(model, _loaded_metadata(ckpt, specs))
        return model.eval()

    return retry_mixed(attempt, directory=path)  # a save that committed meanwhile: the new model, whole


def _loaded_metadata(ckpt: Checkpoint, specs: dict[str, LayerSpec]) -> FormatMetadata:
    first = ckpt.metadata
    return FormatMetadata(layers=specs, format_version=first.format_version, layout=first.layout,
                          producer=first.producer, extra=(ckpt.config_metadata or first).extra)


def load_model_file(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a whole-model SVDQuant file into a model built from its config (unquantized).

    The manifest's linears are replaced by ``SVDQLinear`` modules, then every tensor is
    loaded. With ``strict`` (default), a key the model lacks or a model tensor missing from
    the file is an error, never a silent random init.

    Returns:
        The model (modified in place), on ``device``.
    """
    load_into(model, open_checkpoint(path), device=device, strict=strict)
    return model.to(device)


def load_model_dir(
    directory: str | os.PathLike[str],
    model_cls: Any = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a directory written by :func:`svdq_format.model.save_model_dir` into a fresh model.

    Args:
        directory: The model directory.
        model_cls: Class with ``from_config`` (diffusers) to build the model; default: the
            diffusers class named by ``config.json``'s ``_class_name``.
        device: Target device.

    Returns:
        The quantized model.
    """
    def attempt() -> nn.Module:
        ckpt = open_checkpoint(directory, need_config=True)
        assert ckpt.config is not None
        cls = model_cls if model_cls is not None else model_class(ckpt.config, ckpt.where)
        model = build_model(cls, ckpt.config, file=ckpt.where, meta=False)
        load_into(model, ckpt, device=device)
        return model.to(device)

    return retry_mixed(attempt, directory=directory)
