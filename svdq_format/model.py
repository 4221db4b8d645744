"""Whole models: find SVDQ layers, swap them in from a manifest, save/load model checkpoints.

A *quantized model* is any ``nn.Module`` in which some ``nn.Linear`` children were replaced by
:class:`~svdq_format.linear.SVDQLinear`. Its checkpoint is its full ``state_dict()``: the
SVDQ layers' tensors under their format keys plus every other tensor as it is, with the
format metadata describing the SVDQ layers (docs/format.md §8).

* :func:`svdq_modules` — ``{name: SVDQLinear}`` of a model.
* :func:`replace_linears` — swap ``nn.Linear`` modules for empty ``SVDQLinear`` per a manifest
  (on the meta device by default, the way loaders build models before weights arrive).
* :func:`save_model_file` / :func:`load_model_file` — one-file checkpoint of a whole model.
* :func:`save_model_dir` / :func:`load_model_dir` — a model directory: ``config.json`` (with
  ``quantization_config``) + ``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FormatError, ManifestError, TensorError
from .io import TensorReader, atomic_write, producer_info, read_header, read_metadata, save_file
from .linear import SVDQLinear
from .spec import FormatMetadata, LayerSpec

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "svdq_modules",
    "model_metadata",
    "replace_linears",
    "save_model_file",
    "load_model_file",
    "save_model_dir",
    "load_model_dir",
]

#: File name of an unsharded model's weights (the diffusers name).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def svdq_modules(model: nn.Module) -> dict[str, SVDQLinear]:
    """All SVDQ layers of a model, by qualified module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDQLinear)}


def model_metadata(model: nn.Module, *, extra: Mapping[str, Any] | None = None) -> FormatMetadata:
    """The format metadata (manifest of every SVDQ layer) of a quantized model."""
    return FormatMetadata(
        layers={name: m.spec for name, m in svdq_modules(model).items()},
        producer=producer_info(),
        extra=dict(extra or {}),
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_linears(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    *,
    device: torch.device | str | None = "meta",
    file: str | None = None,
) -> dict[str, SVDQLinear]:
    """Replace the named ``nn.Linear`` modules by (uninitialised) ``SVDQLinear`` modules.

    Args:
        model: The model to modify in place.
        layers: Module name → manifest entry (e.g. ``FormatMetadata.layers``).
        device: Where the new modules' buffers are allocated (``"meta"``: no memory).
        file: Shown in error messages.

    Returns:
        The new modules by name.

    Raises:
        ManifestError: a named module is missing, is not a linear, or its shape differs from
            the manifest (so a checkpoint never loads into the wrong architecture silently).
    """
    out: dict[str, SVDQLinear] = {}
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ManifestError(file, name, f"the model ({type(model).__name__}) has no such module") from None
        if isinstance(old, SVDQLinear):
            if old.spec != spec:
                raise ManifestError(file, name, "module is already an SVDQLinear with another spec")
            out[name] = old
            continue
        if not isinstance(old, nn.Linear):
            raise ManifestError(file, name, f"module is a {type(old).__name__}, not a Linear")
        if (old.in_features, old.out_features) != (spec.in_features, spec.out_features):
            raise ManifestError(
                file,
                name,
                f"model has a {old.out_features}x{old.in_features} linear, checkpoint a "
                f"{spec.out_features}x{spec.in_features} one",
            )
        new = SVDQLinear.from_spec(spec, device=device)
        _set_submodule(model, name, new)
        out[name] = new
    return out


def save_model_file(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> FormatMetadata:
    """Save a quantized model's whole state dict as one SVDQuant file (atomic).

    Returns:
        The metadata written.
    """
    layers = svdq_modules(model)
    owned = {f"{name}." for name in layers}
    extra = {
        k: v
        for k, v in model.state_dict().items()
        if not any(k.startswith(prefix) for prefix in owned)
    }
    save_file(layers, path, metadata=metadata, extra_tensors=extra)
    return model_metadata(model, extra=metadata)


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
    p = os.fspath(path)
    header = read_header(p)
    meta = read_metadata(p, header)
    # Reuse the file-level checks (dtypes/shapes of every layer tensor, values).
    from .io import _check_tensors_against_manifest

    _check_tensors_against_manifest(header, meta)
    replace_linears(model, meta.layers, device="meta", file=p)
    expected = model.state_dict(keep_vars=True)
    names = set(header.tensors)
    if strict:
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing:
            raise TensorError(p, missing[0], f"missing from the checkpoint ({len(missing)} tensors missing)")
        if unexpected:
            raise TensorError(p, unexpected[0], f"not a tensor of {type(model).__name__} ({len(unexpected)} unexpected)")
    state: dict[str, torch.Tensor] = {}
    with TensorReader(header) as handle:
        for key in sorted(names & set(expected)):
            t = handle.get_tensor(key)
            ref = expected[key]
            if tuple(t.shape) != tuple(ref.shape):
                raise TensorError(p, key, f"shape {list(t.shape)}, model expects {list(ref.shape)}")
            state[key] = t
    model.load_state_dict(state, strict=False, assign=True)
    return model.to(device)


def save_model_dir(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

    Args:
        model: The quantized model. Its ``config`` attribute (diffusers models have one) is
            used when ``config`` is not given.
        directory: Created if needed; files are replaced atomically.
        config: The model config dict to write (``quantization_config`` is added).
        metadata: Extra fields for the format metadata.

    Returns:
        The directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = save_model_file(model, d / WEIGHTS_NAME, metadata=metadata)
    cfg = dict(config if config is not None else getattr(model, "config", {}) or {})
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}
    if "_class_name" not in cfg:
        cfg["_class_name"] = type(model).__name__
    cfg["quantization_config"] = meta.to_json()
    text = json.dumps(cfg, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write(d / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return d


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_model_dir(
    directory: str | os.PathLike[str],
    model_cls: Any = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a directory written by :func:`save_model_dir` into a fresh model.

    Args:
        directory: The model directory.
        model_cls: Class with ``from_config`` (diffusers) to build the model; default: the
            diffusers class named by ``config.json``'s ``_class_name``.
        device: Target device.

    Returns:
        The quantized model.
    """
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(str(d), CONFIG_NAME, "missing: not a model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ManifestError(str(cfg_path), None, f"not valid JSON ({exc})") from None
    qc = cfg.pop("quantization_config", None)
    if qc is None:
        raise ManifestError(str(cfg_path), "quantization_config", "missing: not an SVDQuant model")
    FormatMetadata.from_json(qc, file=str(cfg_path))  # version / layout checks first
    if model_cls is None:
        import diffusers

        name = cfg.get("_class_name")
        model_cls = getattr(diffusers, str(name), None)
        if model_cls is None:
            raise ManifestError(str(cfg_path), "_class_name", f"unknown diffusers class {name!r}")
    model = model_cls.from_config(cfg)
    return load_model_file(model, d / WEIGHTS_NAME, device=device)
