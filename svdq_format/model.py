"""Whole models: find SVDQ layers, swap them in from a manifest, save model checkpoints.

A *quantized model* is any ``nn.Module`` in which some ``nn.Linear`` children were replaced by
:class:`~svdq_format.linear.SVDQLinear`. Its checkpoint is its full ``state_dict()``: the
SVDQ layers' tensors under their format keys plus every other tensor as it is, with the
format metadata describing the SVDQ layers (docs/format.md §8).

* :func:`svdq_modules` — ``{name: SVDQLinear}`` of a model.
* :func:`set_mode` — the execution mode (``exact`` / ``fast`` / ``fast8``) of every SVDQ layer.
* :func:`replace_linears` — swap ``nn.Linear`` modules for empty ``SVDQLinear`` per a manifest
  (on the meta device by default, the way loaders build models before weights arrive).
* :func:`save_model_file` — one-file checkpoint of a whole model.
* :func:`save_model_dir` — a model directory: ``config.json`` (with ``quantization_config``) +
  ``diffusion_pytorch_model.safetensors``.
* :func:`save_pretrained` — a model directory in the diffusers layout, sharded when larger than
  ``max_shard_size`` (``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index JSON); all
  tensors of one SVDQ layer stay in one shard and every shard's header carries the manifest of
  its own layers.
* :func:`save_single_file` — the whole model in one ``.safetensors`` file with the model config
  embedded in the header (``__metadata__["config"]``).
* the directory layout's names (:data:`WEIGHTS_NAME`, :data:`INDEX_NAME`, ...).

Loading is :mod:`svdq_format.pretrained` (``load_pretrained``, ``load_model_file``,
``load_model_dir``) on the loading core :mod:`svdq_format.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .commit import DirectoryWrite
from .errors import ManifestError, UnsupportedError
from .fusion import refuse_if_fused
from .io import DATA_HASH_KEY, atomic_write, layer_state, producer_info, read_header, save_file
from .linear import EXEC_MODES, SVDQLinear
from .spec import FormatMetadata, LayerSpec

__all__ = [
    "WEIGHTS_NAME",
    "TRANSFORMERS_WEIGHTS_NAME",
    "TRANSFORMERS_INDEX_NAME",
    "CONFIG_NAME",
    "svdq_modules",
    "set_mode",
    "model_metadata",
    "replace_linears",
    "set_submodule",
    "save_model_file",
    "save_model_dir",
    "INDEX_NAME",
    "SHARD_NAME",
    "SINGLE_FILE_CONFIG_KEY",
    "DEFAULT_MAX_SHARD_SIZE",
    "parse_size",
    "model_config",
    "plan_shards",
    "save_pretrained",
    "save_single_file",
    "FILES_KEY",
    "write_record",
    "is_weight_file",
]

#: File name of an unsharded model's weights (the diffusers name).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: The model config (with ``quantization_config``) of a model directory.
CONFIG_NAME = "config.json"
#: Index of a sharded model directory (the diffusers name).
INDEX_NAME = WEIGHTS_NAME + ".index.json"
#: Shard file names: ``diffusion_pytorch_model-00001-of-00003.safetensors``.
SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{total:05d}.safetensors"
_SHARD_RE = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")
#: The weights file of a transformers model (a pipeline's text encoders): ``model.safetensors``.
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
#: Index of a sharded transformers model directory.
TRANSFORMERS_INDEX_NAME = TRANSFORMERS_WEIGHTS_NAME + ".index.json"
#: ``__metadata__`` key holding the model config (JSON) of a single-file checkpoint.
SINGLE_FILE_CONFIG_KEY = "config"
#: Default largest weight file of :func:`save_pretrained`.
DEFAULT_MAX_SHARD_SIZE = "10GB"


def _names(weights_name: str) -> tuple[str, str, re.Pattern[str]]:
    """``(index name, shard name template, shard name pattern)`` of a weights file name."""
    stem = weights_name.removesuffix(".safetensors")
    return (weights_name + ".index.json", stem + "-{index:05d}-of-{total:05d}.safetensors",
            re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors"))


def svdq_modules(model: nn.Module) -> dict[str, SVDQLinear]:
    """All SVDQ layers of a model, by qualified module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDQLinear)}


def set_mode(model: nn.Module, mode: str, *, backend: str | None = None) -> int:
    """Set the execution mode of every SVDQ layer of ``model`` (a runtime choice, not stored).

    Args:
        model: A quantized model (or a single :class:`~svdq_format.linear.SVDQLinear`).
        mode: One of :data:`~svdq_format.linear.EXEC_MODES`: ``"auto"`` (the default: ``fast8``
            / ``fast`` where a kernel backend runs them — Hopper —, else ``exact``), ``"exact"``
            (the format's W4A4 math), ``"fast"`` (FP8 activations) or ``"fast8"`` (FP8
            activations and e4m3-rounded int4 weights: the fastest Hopper kernels). W4A16 layers
            ignore it.
        backend: Also set every layer's backend (``"auto"``, ``"reference"``, a registered name).

    Returns:
        How many layers were set.

    Raises:
        UnsupportedError: ``mode`` is not an execution mode, or the model has no SVDQ layer.
    """
    if mode not in EXEC_MODES:
        raise UnsupportedError(f"mode {mode!r} is not one of {EXEC_MODES}")
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    if not layers:
        raise UnsupportedError(f"{type(model).__name__} has no SVDQ layer to set to {mode!r}")
    for layer in layers:
        layer.mode = mode
        if backend is not None:
            layer.backend = backend
    return len(layers)


def model_metadata(model: nn.Module, *, extra: Mapping[str, Any] | None = None) -> FormatMetadata:
    """The format metadata (manifest of every SVDQ layer) of a quantized model."""
    return FormatMetadata(
        layers={name: m.spec for name, m in svdq_modules(model).items()},
        producer=producer_info(),
        extra=dict(extra or {}),
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model`` (replacing what is there)."""
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
        set_submodule(model, name, new)
        out[name] = new
    return out


def save_model_file(
    model: nn.Module, path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> FormatMetadata:
    """Save a quantized model's whole state dict as one SVDQuant file (atomic).

    Returns:
        The metadata written.
    """
    refuse_if_fused(model)
    layers = svdq_modules(model)
    owned = {f"{name}." for name in layers}
    extra = {
        k: v
        for k, v in model.state_dict().items()
        if not any(k.startswith(prefix) for prefix in owned)
    }
    save_file(layers, path, metadata=metadata, extra_tensors=extra)
    return model_metadata(model, extra=metadata)


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
    refuse_if_fused(model)
    layers = svdq_modules(model)
    owned = {f"{name}." for name in layers}
    extra = {k: v for k, v in model.state_dict().items() if not any(k.startswith(prefix) for prefix in owned)}
    metadata = _without_record(metadata)
    with DirectoryWrite(d) as w:
        save_file(layers, w.path(WEIGHTS_NAME), metadata=metadata, extra_tensors=extra, seal=True)
        meta = model_metadata(model, extra=metadata)
        cfg = dict(config if config is not None else getattr(model, "config", {}) or {})
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}
        if "_class_name" not in cfg:
            cfg["_class_name"] = type(model).__name__
        cfg["quantization_config"] = {**meta.to_json(), FILES_KEY: write_record(w, [WEIGHTS_NAME])}
        text = json.dumps(cfg, indent=2, sort_keys=True, default=_json_default) + "\n"
        atomic_write(w.path(CONFIG_NAME), lambda tmp: Path(tmp).write_text(text))
        w.commit([WEIGHTS_NAME], config=CONFIG_NAME, stale=is_weight_file)
    return d


#: ``quantization_config`` field of a model directory: weight file (and index) name → sha256
#: of its data buffer (of its bytes, for the index); ``config.json`` commits the set last
#: (docs/format.md §8.1).
FILES_KEY = "files"


def _without_record(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Format metadata to write, without a loaded model's old write record."""
    return None if metadata is None else {k: v for k, v in metadata.items() if k != FILES_KEY}


def write_record(w: DirectoryWrite, names: Sequence[str]) -> dict[str, str]:
    """The :data:`FILES_KEY` record of staged files: a weight file's own sealed data hash, an
    index's sha256."""
    record = {}
    for name in names:
        p = w.path(name)
        if name.endswith(".safetensors"):
            record[name] = read_header(p).metadata[DATA_HASH_KEY]
        else:
            record[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return record


def is_weight_file(name: str) -> bool:
    """A weight file (or index) name of the diffusers directory layout (what a new save replaces)."""
    return name in (WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_RE.fullmatch(name))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------- pretrained layouts

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5·10⁹, ``"512MiB"`` → 512·2²⁰, ``1000`` → 1000 (the huggingface_hub units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"bad size {size!r} (expected e.g. 5GB, 500MB, 1GiB or an integer)")
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def model_config(model: nn.Module, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able model config to store next to the weights (``quantization_config`` excluded).

    Uses ``config`` when given, else the diffusers/transformers config of the model; private keys
    other than ``_class_name`` / ``_diffusers_version`` are dropped.
    """
    if config is None:
        to_json = getattr(model, "to_json_string", None)
        if callable(to_json) and hasattr(model, "config"):
            config = json.loads(to_json())
        else:
            config = dict(getattr(model, "config", None) or {})
    cfg = {
        k: v
        for k, v in dict(config).items()
        if k != "quantization_config" and (not k.startswith("_") or k in ("_class_name", "_diffusers_version"))
    }
    if "model_type" not in cfg:  # (a transformers config names its class in ``architectures``)
        cfg.setdefault("_class_name", type(model).__name__)
    return json.loads(json.dumps(cfg, default=_json_default))


def _split_state(model: nn.Module, skip: Collection[str] = ()
                 ) -> tuple[dict[str, SVDQLinear], list[tuple[str | None, dict[str, torch.Tensor]]]]:
    """``(layers, units)``: a unit is one SVDQ layer's tensors or one dense tensor, in model order
    (``skip``: dense keys left out, e.g. a transformers model's tied copies)."""
    refuse_if_fused(model)
    layers = svdq_modules(model)
    units: list[tuple[str | None, dict[str, torch.Tensor]]] = []
    owner: dict[str, str] = {}
    for name, layer in layers.items():
        for key in layer.state_dict():
            owner[f"{name}.{key}"] = name
    seen: set[str] = set()
    for key, tensor in model.state_dict().items():
        layer_name = owner.get(key)
        if layer_name is None:
            if key not in skip:
                units.append((None, {key: tensor}))
        elif layer_name not in seen:
            seen.add(layer_name)
            units.append((layer_name, layer_state(layer_name, layers[layer_name])))
    return layers, units


def plan_shards(
    model: nn.Module, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[list[tuple[str | None, dict[str, torch.Tensor]]]]:
    """Greedy split of a quantized model's state into shards of at most ``max_shard_size`` bytes.

    Units (one SVDQ layer with all its tensors, or one dense tensor) are never split; a unit
    larger than the limit gets a shard of its own.
    """
    return _shards(_split_state(model)[1], max_shard_size)


def _shards(
    units: list[tuple[str | None, dict[str, torch.Tensor]]], max_shard_size: int | str,
) -> list[list[tuple[str | None, dict[str, torch.Tensor]]]]:
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str | None, dict[str, torch.Tensor]]]] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(t.numel() * t.element_size() for t in unit[1].values())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def _write_shard(
    units: list[tuple[str | None, dict[str, torch.Tensor]]],
    layers: Mapping[str, SVDQLinear],
    path: Path,
    *,
    metadata: Mapping[str, Any] | None,
    header_metadata: Mapping[str, str] | None = None,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
) -> list[str]:
    shard_layers = {name: layers[name] for name, _ in units if name is not None}
    dense = {k: t for name, ts in units if name is None for k, t in ts.items()}
    save_file(shard_layers, path, metadata=metadata, extra_tensors=dense, header_metadata=header_metadata,
              read_tensor=read_tensor, seal=header_metadata is None)  # (a single-file model is atomic by itself)
    return [k for _, ts in units for k in ts]


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
    weights_name: str = WEIGHTS_NAME,
    skip: Collection[str] = (),
) -> Path:
    """Write a quantized model as a diffusers-layout directory, sharded if needed.

    Layout: ``config.json`` (model config + ``quantization_config`` with the full manifest) and
    either ``diffusion_pytorch_model.safetensors`` or shards
    ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` plus
    ``diffusion_pytorch_model.safetensors.index.json``. Each file is written atomically and
    carries the SVDQuant metadata of the layers it holds; ``config.json`` is written last, and
    weight files of an earlier save that are no longer part of the model are removed.

    Args:
        model: The quantized model (diffusers models give their config themselves).
        directory: Target directory (created if needed).
        max_shard_size: Largest shard, bytes or a string like ``"5GB"``.
        config: Model config to write instead of the model's own.
        metadata: Extra fields for the format metadata (``base_model``, quantizer settings...).
        read_tensor: Reads a tensor by its state-dict key: the model's tensors (SVDQ layers
            included) may then be on the meta device, and are read one at a time while their
            shard is written (e.g. from files written earlier), so host memory holds one tensor
            beyond the model instead of a shard; the files are the same bytes.
        weights_name: The weights file name (:data:`TRANSFORMERS_WEIGHTS_NAME` for a
            transformers model: ``model.safetensors``, shards ``model-0000i-of-0000n...``).
        skip: Dense state-dict keys not to write (tied copies the loader ties again).

    Returns:
        The directory.
    """
    cfg = model_config(model, config)
    layers, units = _split_state(model, skip)  # (refuses a fused model before anything is created)
    shards = _shards(units, max_shard_size)
    d = Path(directory)
    metadata = _without_record(metadata)
    index_name, shard_name, shard_re = _names(weights_name)

    def stale(name: str) -> bool:
        return name in (weights_name, index_name) or bool(shard_re.fullmatch(name))

    with DirectoryWrite(d) as w:  # one writer; staged, then committed with config.json last
        written: list[str] = []
        if len(shards) == 1:
            _write_shard(shards[0], layers, w.path(weights_name), metadata=metadata, read_tensor=read_tensor)
            written.append(weights_name)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, units in enumerate(shards, start=1):
                name = shard_name.format(index=i, total=len(shards))
                for key in _write_shard(units, layers, w.path(name), metadata=metadata, read_tensor=read_tensor):
                    weight_map[key] = name
                total += sum(t.numel() * t.element_size() for _, ts in units for t in ts.values())
                written.append(name)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            atomic_write(w.path(index_name), lambda tmp: Path(tmp).write_text(text))
            written.append(index_name)
        meta = model_metadata(model, extra=metadata)
        cfg["quantization_config"] = {**meta.to_json(), FILES_KEY: write_record(w, written)}
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        atomic_write(w.path(CONFIG_NAME), lambda tmp: Path(tmp).write_text(text))
        w.commit(written, config=CONFIG_NAME, stale=stale)
    return d


def save_single_file(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the whole quantized model to one ``.safetensors`` file, config included.

    The model config (with ``_class_name``) is stored as JSON under ``__metadata__["config"]``
    so :func:`load_pretrained` rebuilds the model from the file alone.

    Returns:
        The file path.
    """
    p = Path(path)
    cfg = model_config(model, config)
    layers, units = _split_state(model)
    _write_shard(units, layers, p, metadata=metadata,
                 header_metadata={SINGLE_FILE_CONFIG_KEY: json.dumps(cfg, sort_keys=True)})
    return p
