"""The loading core: every path that accepts an SVDQuant checkpoint goes through this module.

Callers (nothing else in the packages reads an SVDQuant checkpoint):

* :func:`validate` / :func:`validate_file` — ``svdq validate``, ``push_to_hub``'s check, the
  Nunchaku importer's check of its own output;
* :func:`load_file` — the layers of one file (resumed quantizer blocks);
* :func:`load_tensors` — every tensor of an opened checkpoint (the Nunchaku exporters);
* :mod:`svdq_format.pretrained` — ``load_pretrained``, ``hub.from_pretrained``,
  ``load_model_file`` / ``load_model_dir`` (and ``converters.nunchaku.model``), all through
  :func:`open_checkpoint` + :func:`load_into`;
* :class:`svdq_format.diffusers.SVDQuantizer` — diffusers' ``from_pretrained``: diffusers reads
  the tensors itself, its hooks call :func:`read_checkpoint_files`, :func:`check_manifests_agree`,
  :func:`check_key_sets`, :func:`check_shape` and :func:`check_layer_tensor`;
* :mod:`svdq_format.summary` (``svdq inspect``) — :func:`checkpoint_files`.

What a checkpoint goes through, each step written once:

1. **locate** — :func:`checkpoint_files`: a directory's index (its shard names checked to stay
   inside the directory) or its weights file;
2. **parse** — :func:`read_json` / :func:`parse_json` for ``config.json``, the index and a single file's embedded
   config; :func:`svdq_format.io.read_header` and :func:`svdq_format.io.read_metadata` for each
   file (the header is checked before safetensors touches the file);
3. **each file against its own manifest** — :func:`check_file_tensors` (every listed layer's
   tensors present with the dtype and shape :func:`~svdq_format.spec.expected_tensors` gives,
   :func:`check_layer_tensor`; no stray tensor of a layer);
4. **merge** — :func:`read_checkpoint_files`: a layer and a tensor live in one file only;
5. **config** — :func:`check_manifests_agree`: ``config.json``'s ``quantization_config`` lists
   exactly the files' layers;
6. **values** — :func:`check_values`: finite non-negative scales, finite positive smoothing,
   finite low-rank and bias tensors (``validate``, ``load_file``);
7. **into a model** — :func:`load_into`: the manifest's linears become ``SVDQLinear`` on the
   meta device, the key sets must match (:func:`check_key_sets`), tensors are read one at a time
   (shape :func:`check_shape`, compute-dtype cast of :data:`~svdq_format.spec.COMPUTE_ROLES`).

A new check on what a file may contain belongs in one of these functions, and every path above
then makes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import jsonsafe
from .commit import retry_mixed
from .errors import FormatError, HeaderError, ManifestError, MixedDirectoryError, TensorError, UnsupportedError
from .io import DATA_HASH_KEY, SafetensorsHeader, TensorReader, aligned, read_header, read_metadata
from .linear import SVDQLinear
from .model import (
    CONFIG_NAME,
    FILES_KEY,
    INDEX_NAME,
    SINGLE_FILE_CONFIG_KEY,
    TRANSFORMERS_INDEX_NAME,
    TRANSFORMERS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    replace_linears,
)
from .spec import (
    COMPUTE_ROLES,
    FLOAT_DTYPES,
    MAX_ABS_VALUE,
    MAX_SMOOTH,
    FormatMetadata,
    LayerSpec,
    dtype_name,
    expected_tensors,
    tensor_names,
)

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "checkpoint_files",
    "parse_json",
    "read_json",
    "read_model_config",
    "read_checkpoint_files",
    "check_file_tensors",
    "check_layer_tensor",
    "check_manifests_agree",
    "check_key_sets",
    "check_shape",
    "check_values",
    "check_model_values",
    "check_config",
    "with_compute_dtype",
    "load_layer",
    "load_file",
    "load_into",
    "load_tensors",
    "validate_file",
    "validate",
]


# --------------------------------------------------------------------------- checks


def check_layer_tensor(
    file: str | None, key: str, spec: LayerSpec, role: str, dtype: str, shape: Sequence[int]
) -> None:
    """One tensor of an SVDQ layer against its manifest entry: a role the layer has, its dtype, its shape.

    Args:
        file: Named in the error (None where the caller does not know the file).
        key: The tensor's full key.
        spec: The layer's manifest entry.
        role: The tensor's role (``qweight``, ``wscales``, ...).
        dtype: Its torch dtype name.
        shape: Its shape.

    Raises:
        TensorError: naming the key and what is wrong.
    """
    expected = expected_tensors(spec)
    if role not in expected:
        raise TensorError(
            file,
            key,
            f"unexpected tensor for a {spec.kind}/{spec.precision} layer with rank {spec.rank}, bias={spec.has_bias}",
        )
    dtypes, want = expected[role]
    if dtype not in dtypes:
        raise TensorError(file, key, f"dtype {dtype}, expected {' or '.join(dtypes)}")
    if tuple(shape) != want:
        raise TensorError(file, key, f"shape {list(shape)}, expected {list(want)}")


_ROLES = frozenset(tensor_names("x"))


def check_file_tensors(header: SafetensorsHeader, meta: FormatMetadata) -> None:
    """A file's tensors against its own manifest (header entries only, no data read).

    Every tensor of every listed layer is present with the right dtype and shape; no tensor of a
    role the layer does not have; no quantized tensor of an unlisted layer.

    Raises:
        TensorError / ManifestError: naming the file, the key and what is wrong.
    """
    p = header.path
    prefixes = set(meta.layers)
    for prefix, spec in meta.layers.items():
        names = tensor_names(prefix)
        expected = expected_tensors(spec)
        for role in expected:
            entry = header.tensors.get(names[role])
            if entry is None:
                raise TensorError(p, names[role], "missing tensor (listed in the manifest)")
            check_layer_tensor(p, names[role], spec, role, entry.dtype, entry.shape)
        for role in _ROLES - set(expected):
            entry = header.tensors.get(names[role])
            if entry is not None:  # a role this layer does not have: refused
                check_layer_tensor(p, names[role], spec, role, entry.dtype, entry.shape)
    for name in header.tensors:
        head, _, role = name.rpartition(".")
        if role == "qweight" and head not in prefixes:
            raise ManifestError(p, name, "quantized tensor of a layer that is not in the manifest")


def check_manifests_agree(
    where: str, config_layers: Mapping[str, LayerSpec], file_layers: Mapping[str, LayerSpec]
) -> None:
    """``config.json``'s manifest (``quantization_config``) lists exactly the files' layers.

    Raises:
        ManifestError: naming ``where`` and the first layer that differs.
    """
    if dict(config_layers) != dict(file_layers):
        diff = sorted(set(file_layers) ^ set(config_layers)) or [
            n for n in file_layers if file_layers[n] != config_layers[n]
        ]
        raise ManifestError(where, diff[0], "config.json manifest disagrees with the safetensors files")


def check_key_sets(
    expected: Iterable[str], stored: Mapping[str, str | None], *, where: str | None, model_name: str
) -> None:
    """The checkpoint's tensors are exactly the model's: no random init, no ignored tensor.

    Args:
        expected: The model's state-dict keys.
        stored: The checkpoint's keys → the file holding each (None: ``where``).
        where: Named in the error about a missing tensor.
        model_name: The model's class name (for the error about an unexpected tensor).

    Raises:
        TensorError: naming the first missing or unexpected key and how many there are.
    """
    want = set(expected)
    missing = sorted(want - set(stored))
    unexpected = sorted(set(stored) - want)
    if missing:
        raise TensorError(where, missing[0], f"missing from the checkpoint ({len(missing)} tensors missing)")
    if unexpected:
        raise TensorError(stored[unexpected[0]] or where, unexpected[0],
                          f"not a tensor of {model_name} ({len(unexpected)} unexpected)")


def check_shape(file: str | None, key: str, got: Sequence[int], want: Sequence[int]) -> None:
    """A stored tensor has the shape of the model tensor it goes into.

    Raises:
        TensorError: naming the key and both shapes.
    """
    if tuple(got) != tuple(want):
        raise TensorError(file, key, f"shape {list(got)}, model expects {list(want)}")


def _first_bad(mask: torch.Tensor) -> int:
    return int(mask.flatten().nonzero()[0, 0])


#: Role → (lowest, highest) accepted value (NaN/inf always refused); docs/format.md §9.
VALUE_BOUNDS: dict[str, tuple[float, float]] = {
    "wscales": (0.0, MAX_ABS_VALUE),
    "wtscale": (0.0, MAX_ABS_VALUE),
    "smooth": (1.0 / MAX_SMOOTH, MAX_SMOOTH),
    "lora_down": (-MAX_ABS_VALUE, MAX_ABS_VALUE),
    "lora_up": (-MAX_ABS_VALUE, MAX_ABS_VALUE),
    "bias": (-MAX_ABS_VALUE, MAX_ABS_VALUE),
}
_WHAT = {"wscales": "weight scale", "wtscale": "tensor scale", "smooth": "smoothing factor",
         "lora_down": "value", "lora_up": "value", "bias": "value"}


def _value_tensors(layer: SVDQLinear) -> list[tuple[str, torch.Tensor]]:
    out = []
    for role in VALUE_BOUNDS:
        t = getattr(layer, role, None)
        if isinstance(t, torch.Tensor) and t.numel() and not t.is_meta:
            out.append((role, t))
    return out


def check_values(file: str | None, prefix: str, layer: SVDQLinear) -> None:
    """The values of one loaded layer against :data:`VALUE_BOUNDS`: finite weight and tensor
    scales in ``[0, 65504]`` (a zero tensor scale refused), smoothing factors in ``[2^-40, 2^40]``,
    low-rank and bias values finite within ±65504 (the packed codes are never scanned).

    Raises:
        TensorError: naming the tensor, the first bad index and the value.
    """
    names = tensor_names(prefix)
    for role, t in _value_tensors(layer):
        lo, hi = VALUE_BOUNDS[role]
        v = t.float()
        bad = ~torch.isfinite(v) | (v < lo) | (v > hi)
        if role in ("smooth", "wtscale"):
            bad |= v <= 0
        if not bad.any():
            continue
        k = _first_bad(bad)
        value = float(v.flatten()[k])
        broken = not math.isfinite(value) or value < 0 or (value <= 0 and role in ("smooth", "wtscale"))
        if role == "wscales" and broken:
            reason = f"non-finite or negative scale at index {k}"
        elif role == "wtscale" and broken:
            reason = f"tensor scale must be finite and positive, got {value}"
        elif role == "smooth" and broken:
            reason = f"smoothing factor not finite and positive at index {k}"
        elif not math.isfinite(value):
            reason = f"non-finite value at index {k}"
        else:
            reason = f"{_WHAT[role]} {value:g} at index {k} is absurd (outside [{lo:g}, {hi:g}])"
        raise TensorError(file, names[role], reason)


def check_model_values(model: nn.Module, layers: Iterable[str], *, file: str | None) -> None:
    """:func:`check_values` of every SVDQ layer of a loaded model, as one batched pass.

    Each checked tensor is reduced on its own device (``aminmax``) and the results are read back
    with a single synchronisation; only a layer that fails is then checked element by element,
    for the error message. Cheap enough to run on every load (the packed codes are not read).

    Raises:
        TensorError: naming the tensor, the first bad index and the value.
    """
    items: list[tuple[str, SVDQLinear, str, torch.Tensor]] = []
    for prefix in layers:
        layer = model.get_submodule(prefix)
        if isinstance(layer, SVDQLinear):
            items.extend((prefix, layer, role, t) for role, t in _value_tensors(layer))
    if not items:
        return
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, (_, _, _, t) in enumerate(items):
        src = t.to(torch.bfloat16) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
        lo_t, hi_t = torch.aminmax(src.reshape(-1))
        by_device.setdefault(t.device, []).append((i, torch.stack([lo_t.float(), hi_t.float()])))
    got: list[list[float]] = [[0.0, 0.0]] * len(items)
    for pairs in by_device.values():  # one synchronisation per device
        for (i, _), row in zip(pairs, torch.stack([r for _, r in pairs]).tolist()):
            got[i] = row
    for (prefix, layer, role, _), (lo, hi) in zip(items, got):
        low, high = VALUE_BOUNDS[role]
        positive = role in ("smooth", "wtscale")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= low and hi <= high and (lo > 0 or not positive)):
            check_values(file, prefix, layer)


_COUNT_KEY = re.compile(r"num_\w*(layers|blocks)|layers_per_block|num_hidden_layers")
_DIM_KEY = re.compile(r"\w*(_dim|_dims|_channels|_size|_features)|dim")
_INDEX = re.compile(r"\.(\d+)(?=\.)")
#: Largest integer accepted anywhere in a model config.
MAX_CONFIG_INT = 2**31


def _config_ints(value: Any) -> Iterable[int]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool):
            yield v
        elif isinstance(v, list):
            stack.extend(v)


def check_config(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], *, file: str | None) -> None:
    """A model config against the tensors present, before any model is built from it.

    A config edit must not make the loader build something the checkpoint cannot hold (a
    ``num_layers: 20000`` takes minutes and gigabytes before the key check fails; a dimension of
    2^40 fails inside the allocator). Refused, one line each: ``_class_name`` that is not a
    string; any integer beyond ±2^31; a block count (``num_*layers``, ``num_*blocks``,
    ``layers_per_block``) above the number of numbered blocks the tensor keys hold; a dimension
    (``*_dim``, ``*_channels``, ``*_size``, ``*_features``) above 16 × the largest stored
    dimension.

    Args:
        config: The model config (``quantization_config`` removed).
        shapes: Tensor key → shape, of every tensor of the checkpoint.
        file: Named in the errors.

    Raises:
        ManifestError: naming the config key and the bound.
    """
    name = config.get("_class_name")
    if name is not None and not isinstance(name, str):
        raise ManifestError(file, "_class_name", f"must be a string, got {type(name).__name__}")
    blocks = 0
    for key in shapes:
        for m in _INDEX.finditer(key):
            blocks = max(blocks, int(m.group(1)) + 1)
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    for key, value in config.items():
        for v in _config_ints(value):
            if abs(v) > MAX_CONFIG_INT:
                raise ManifestError(file, key, f"absurd value {v} (beyond ±2^31)")
            if _COUNT_KEY.fullmatch(key) and v > blocks:
                raise ManifestError(file, key, f"{v} blocks, but the tensors hold {blocks} numbered blocks")
            if _DIM_KEY.fullmatch(key) and v > 16 * largest:
                raise ManifestError(file, key, f"{v} is absurd: the largest stored dimension is {largest}")


def with_compute_dtype(layers: Mapping[str, LayerSpec], dtype: str | None) -> dict[str, LayerSpec]:
    """The manifest with every layer's compute dtype set to ``dtype`` (None: as stored)."""
    if dtype is None:
        return dict(layers)
    return {n: dataclasses.replace(spec, dtype=dtype) for n, spec in layers.items()}


# --------------------------------------------------------------------------- locate and parse


def parse_json(text: str | bytes, *, file: str | None, key: str | None = None) -> Any:
    """Parse JSON text of a checkpoint (a file's content, a single file's embedded config).

    Raises:
        ManifestError: not valid JSON, naming ``file`` and ``key``.
    """
    try:
        return jsonsafe.loads(text)  # duplicate keys, NaN/Infinity, deep nesting refused
    except ValueError as exc:
        raise ManifestError(file, key, f"not valid JSON ({exc})") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file of a checkpoint (``config.json``, an index) with :func:`parse_json`."""
    return parse_json(Path(path).read_text(), file=os.fspath(path))


def checkpoint_files(directory: str | os.PathLike[str], *, any_names: bool = False) -> list[Path]:
    """The weight files of a model directory: the shards named by its index, else its weights file.

    The names are diffusers' (``diffusion_pytorch_model...``) or, where there is none of those,
    transformers' (``model.safetensors``, ``model.safetensors.index.json``: a pipeline's text
    encoders).

    Args:
        directory: The model directory.
        any_names: Take any ``*.safetensors.index.json`` (the first by name), else every
            ``*.safetensors`` file, instead of diffusers' names only (``validate``, ``inspect``:
            checkpoints written by other tools).

    Raises:
        ManifestError: a bad index (not JSON, no ``weight_map`` object of file names, a shard
            name leaving the directory); FormatError: a listed shard is missing, or (diffusers'
            names) no weights file or index.
    """
    d = Path(directory)
    if any_names:
        indexes = sorted(d.glob("*.safetensors.index.json"))
        index_path = indexes[0] if indexes else None
    else:
        index_path = d / INDEX_NAME if (d / INDEX_NAME).is_file() else None
        if index_path is None and not (d / WEIGHTS_NAME).is_file():  # a transformers model's directory
            if (d / TRANSFORMERS_INDEX_NAME).is_file():
                index_path = d / TRANSFORMERS_INDEX_NAME
            elif (d / TRANSFORMERS_WEIGHTS_NAME).is_file():
                return [d / TRANSFORMERS_WEIGHTS_NAME]
    if index_path is not None:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ManifestError(str(index_path), "weight_map", "missing or not an object of file names")
        files = []
        for name in sorted(set(weight_map.values())):
            if "/" in name or "\\" in name or name.startswith("."):
                raise ManifestError(str(index_path), "weight_map", f"bad shard name {name!r}")
            if not (d / name).is_file():
                raise FormatError(str(d / name), None, "shard listed in the index is missing")
            files.append(d / name)
        return files
    if any_names:
        return sorted(d.glob("*.safetensors"))
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    raise FormatError(str(d), WEIGHTS_NAME, "missing: no weights file or index in the model directory")


def read_model_config(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], FormatMetadata]:
    """A model directory's ``config.json``: ``(model config without quantization_config, the
    checked format metadata)``.

    Raises:
        FormatError: no ``config.json``; ``ManifestError`` when it is not a JSON object, has no
            ``quantization_config``, or that fails the format's checks (version, layout, ...).
    """
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(str(d), CONFIG_NAME, "missing: not a model directory")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ManifestError(str(cfg_path), None, "not a JSON object")
    qc = cfg.pop("quantization_config", None)
    if qc is None:
        raise ManifestError(str(cfg_path), "quantization_config", "missing: not an SVDQuant model")
    return cfg, FormatMetadata.from_json(qc, file=str(cfg_path))


def read_checkpoint_files(files: Sequence[str | os.PathLike[str]]) -> tuple[list[SafetensorsHeader], FormatMetadata]:
    """Parse every file's header, check its tensors against its own manifest, merge the manifests.

    Returns:
        ``(headers, metadata)``: the metadata lists every file's layers; its version, layout,
        producer and extra fields are the first file's.

    Raises:
        FormatError: (a subclass) naming the file, the key and what is wrong; also a layer or a
            tensor stored in two files.
    """
    headers: list[SafetensorsHeader] = []
    merged: dict[str, LayerSpec] = {}
    first: FormatMetadata | None = None
    owner: dict[str, str] = {}
    for f in files:
        header = read_header(f)
        meta = read_metadata(f, header)
        check_file_tensors(header, meta)
        for name, spec in meta.layers.items():
            if name in merged:
                raise ManifestError(header.path, name, "layer appears in more than one file")
            merged[name] = spec
        for key in header.tensors:
            if key in owner:
                raise TensorError(header.path, key, f"tensor also stored in {owner[key]}")
            owner[key] = header.path
        headers.append(header)
        first = first or meta
    if first is None:
        raise FormatError(None, None, "no checkpoint file given")
    return headers, FormatMetadata(layers=merged, format_version=first.format_version, layout=first.layout,
                                   producer=first.producer, extra=first.extra)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An SVDQuant checkpoint on disk, opened and checked; no tensor data read yet.

    Attributes:
        path: The file or model directory.
        headers: Every weight file's checked header, in file order.
        metadata: The files' manifests merged (version, layout, producer and extra fields of
            the first file).
        config: The model config (``quantization_config`` removed), when the checkpoint has
            one: a directory's ``config.json``, a single file's embedded ``config``.
        config_metadata: A directory's ``quantization_config`` (it agrees with ``metadata``'s
            layers; its extra fields are the model's).
        where: The file errors about the whole checkpoint name (``config.json``, or the file).
    """

    path: Path
    headers: list[SafetensorsHeader]
    metadata: FormatMetadata
    config: dict[str, Any] | None
    config_metadata: FormatMetadata | None
    where: str

    @property
    def layers(self) -> dict[str, LayerSpec]:
        """The manifest: layer name → entry."""
        return self.metadata.layers


def _single_file_config(header: SafetensorsHeader) -> dict[str, Any] | None:
    text = header.metadata.get(SINGLE_FILE_CONFIG_KEY)
    if text is None:
        return None
    cfg = parse_json(text, file=header.path, key=SINGLE_FILE_CONFIG_KEY)
    if not isinstance(cfg, dict):
        raise ManifestError(header.path, SINGLE_FILE_CONFIG_KEY, "not a JSON object")
    return {k: v for k, v in cfg.items() if k != "quantization_config"}


def check_write_record(directory: Path, config_meta: FormatMetadata | None,
                       headers: Sequence[SafetensorsHeader]) -> None:
    """The directory's files are the set its ``config.json`` committed (docs/format.md §8.1).

    ``quantization_config["files"]`` names every weight file (and the index) of the save that
    wrote ``config.json`` last, with the sha256 of its data; each weight file carries its own in
    its header. A file of another save, a missing or extra weight file, or weight files sealed by
    a directory save with no ``config.json`` committing them (a save killed before its commit,
    by another tool) make the directory mixed or incomplete. Directories written before the
    record existed (no ``files``) are not checked.

    Raises:
        MixedDirectoryError: naming the first file that disagrees and how.
    """
    record = config_meta.extra.get(FILES_KEY) if config_meta is not None else None
    cfg_path = str(directory / CONFIG_NAME)
    if record is None:
        sealed = [h for h in headers if DATA_HASH_KEY in h.metadata]
        if config_meta is None and sealed:
            raise MixedDirectoryError(str(directory), CONFIG_NAME, f"incomplete model directory: "
                                      f"{Path(sealed[0].path).name} was written by a model-directory save that "
                                      "never committed (no config.json)")
        return
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        raise ManifestError(cfg_path, FILES_KEY, "must be an object of file name → sha256")
    present = {Path(h.path).name: h for h in headers}
    for name, h in present.items():
        if name not in record:
            raise MixedDirectoryError(cfg_path, name, "mixed model directory: this weight file is not part of the "
                                      "save config.json records (another save wrote it)")
        got = h.metadata.get(DATA_HASH_KEY)
        if got != record[name]:
            raise MixedDirectoryError(cfg_path, name, f"mixed model directory: the file holds data "
                                      f"{(got or 'unsealed')[:12]}…, config.json records {record[name][:12]}… "
                                      "(written by another save, or a save was interrupted)")
    for name, digest in record.items():
        if name.endswith(".safetensors"):
            if name not in present:
                raise MixedDirectoryError(cfg_path, name, "incomplete model directory: a weight file config.json "
                                          "records is not used (missing, or the index names other files)")
            continue
        try:
            data = (directory / name).read_bytes()
        except OSError:
            raise MixedDirectoryError(cfg_path, name, "incomplete model directory: the index config.json "
                                      "records is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise MixedDirectoryError(cfg_path, name, "mixed model directory: the index is not the one "
                                      "config.json records (written by another save)")


def _shapes(headers: Sequence[SafetensorsHeader]) -> dict[str, tuple[int, ...]]:
    return {k: e.shape for h in headers for k, e in h.tensors.items()}


def open_checkpoint(path: str | os.PathLike[str], *, need_config: bool = False,
                    any_names: bool = False) -> Checkpoint:
    """Open an SVDQuant file or model directory: steps 1–5 of this module (no tensor data read).

    Args:
        path: A safetensors file (one file of layers, or a single-file model) or a model
            directory.
        need_config: The caller builds the model from the checkpoint: a directory must have a
            ``config.json`` and a file an embedded ``config``.
        any_names: A directory's weight files by any name (see :func:`checkpoint_files`).

    Raises:
        FormatError: (a subclass) naming the file, the key and what is wrong.
    """
    p = Path(path)
    if p.is_file():
        headers, meta = read_checkpoint_files([p])
        config = _single_file_config(headers[0])
        if config is None and need_config:
            raise ManifestError(
                str(p),
                SINGLE_FILE_CONFIG_KEY,
                "no model config in the header: not a single-file model (pass a directory)",
            )
        if config is not None:
            check_config(config, _shapes(headers), file=f"{p}: {SINGLE_FILE_CONFIG_KEY}")
        return Checkpoint(p, headers, meta, config, None, str(p))
    if p.is_dir():
        cfg_path = p / CONFIG_NAME
        config = config_meta = None
        if cfg_path.is_file() or need_config:
            config, config_meta = read_model_config(p)
        files = checkpoint_files(p, any_names=any_names)
        if not files:
            raise FormatError(str(p), None, "directory holds no .safetensors files")
        headers, meta = read_checkpoint_files(files)
        check_write_record(p, config_meta, headers)
        if config_meta is not None:
            check_manifests_agree(str(cfg_path), config_meta.layers, meta.layers)
        if config is not None:
            check_config(config, _shapes(headers), file=str(cfg_path))
        return Checkpoint(p, headers, meta, config, config_meta, str(cfg_path) if config is not None else str(p))
    raise FormatError(str(p), None, "no such file or directory")


# --------------------------------------------------------------------------- layers of a file


def load_layer(
    handle: TensorReader, prefix: str, spec: LayerSpec, *, device: str | torch.device = "cpu", file: str | None = None
) -> SVDQLinear:
    """Build one layer from an open :class:`~svdq_format.io.TensorReader` (tensors checked against the spec)."""
    layer = SVDQLinear.from_spec(spec, device="meta")
    names = tensor_names(prefix)
    for role in expected_tensors(spec):
        t = handle.get_tensor(names[role])
        check_layer_tensor(file, names[role], spec, role, dtype_name(t.dtype), t.shape)
        setattr(layer, role, t.to(device))
    return layer


def _read_layers(header: SafetensorsHeader, meta: FormatMetadata, *, check: bool,
                 device: str | torch.device | None) -> dict[str, SVDQLinear]:
    """The layers of one checked file, read tensor by tensor (values checked when ``check``)."""
    p = header.path
    out: dict[str, SVDQLinear] = {}
    try:
        with TensorReader(header) as handle:
            for prefix, spec in meta.layers.items():
                layer = load_layer(handle, prefix, spec, device="cpu", file=p)
                if check:
                    check_values(p, prefix, layer)
                if device is not None:
                    out[prefix] = layer.to(device) if str(device) != "cpu" else layer
    except FormatError:
        raise
    except OSError as exc:
        raise HeaderError(p, None, f"could not read the file ({exc})") from None
    return out


def load_file(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", check_values: bool = True
) -> dict[str, SVDQLinear]:
    """Load every SVDQuant layer of a file.

    The header and manifest are checked first (:func:`open_checkpoint`), then the tensors are
    read and moved to ``device``.

    Args:
        path: A file written by :func:`~svdq_format.io.save_file` (or any conforming writer).
        device: Where the layers' tensors go.
        check_values: Also check values (:func:`check_values`). Costs one pass over the small
            tensors; the packed codes are never scanned.

    Returns:
        ``{prefix: SVDQLinear}`` in manifest order.

    Raises:
        FormatError: (a subclass naming file, key and reason) for anything the spec rules out.
    """
    headers, meta = read_checkpoint_files([path])
    return _read_layers(headers[0], meta, check=check_values, device=device)


def load_tensors(checkpoint: Checkpoint, *, check_values: bool = True) -> tuple[dict[str, SVDQLinear],
                                                                               dict[str, torch.Tensor]]:
    """Every tensor of an opened checkpoint, on the CPU: ``(layers by prefix, the other tensors by key)``.

    For converters that rewrite a whole checkpoint (the Nunchaku exporters); a model is loaded
    with :func:`load_into` instead.

    Raises:
        FormatError: (a subclass) naming file, key and reason.
    """
    layers: dict[str, SVDQLinear] = {}
    others: dict[str, torch.Tensor] = {}
    for header in checkpoint.headers:
        own = {n: s for n, s in checkpoint.layers.items() if tensor_names(n)["qweight"] in header.tensors}
        layers.update(_read_layers(header, dataclasses.replace(checkpoint.metadata, layers=own), check=check_values,
                                   device="cpu"))
        owned = {key for n in own for key in tensor_names(n).values()}
        with TensorReader(header) as handle:
            others.update({k: handle.get_tensor(k) for k in header.tensors if k not in owned})
    return layers, others


def validate_file(path: str | os.PathLike[str], *, check_values: bool = True) -> FormatMetadata:
    """Validate one SVDQuant safetensors file; return its metadata.

    Raises:
        FormatError: (or a subclass) with file, key and reason; ``FileNotFoundError`` when
            the file does not exist.
    """
    headers, meta = read_checkpoint_files([path])
    if check_values:
        _read_layers(headers[0], meta, check=True, device=None)
    return meta


def validate(path: str | os.PathLike[str], *, check_values: bool = True) -> FormatMetadata:
    """Validate an SVDQuant file or model directory (docs/format.md §9).

    For a directory: every safetensors file (the shards of an index when present) is
    validated, and ``config.json``'s ``quantization_config``, when present, must list the same
    layers as the files together.

    Returns:
        The merged metadata (all layers of all files).

    Raises:
        FormatError: (or a subclass) naming file, key and reason.
    """
    def attempt() -> FormatMetadata:
        ckpt = open_checkpoint(path, any_names=True)
        if check_values:
            for header in ckpt.headers:  # (each layer's tensors are in the file that lists it)
                own = {n: s for n, s in ckpt.layers.items() if tensor_names(n)["qweight"] in header.tensors}
                _read_layers(header, dataclasses.replace(ckpt.metadata, layers=own), check=True, device=None)
        return ckpt.metadata

    return retry_mixed(attempt, directory=path)  # a save that committed meanwhile: read the new model whole


# --------------------------------------------------------------------------- into a model


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
    else:
        module._buffers[name] = value


def load_into(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> dict[str, LayerSpec]:
    """Load an opened checkpoint into a model built from its config (step 7 of this module).

    The manifest's linears are replaced by ``SVDQLinear`` modules on the meta device, then the
    tensors are read one at a time, shape-checked and put in place on ``device``: host memory
    holds at most one tensor beyond what the model keeps there (onto another device, every
    tensor goes through one reused host buffer).

    Args:
        model: The model (its parameters may be on the meta device); modified in place.
        checkpoint: From :func:`open_checkpoint`.
        device: Target device of every tensor.
        dtype: Compute dtype: the dense floating tensors are cast to it and it becomes the SVDQ
            layers' compute dtype (their :data:`~svdq_format.spec.COMPUTE_ROLES` tensors are
            cast; 4-bit codes and scales stay as stored). Default: as stored.
        strict: The key sets must match exactly (missing or unexpected tensors raise); else
            only the tensors the model has are loaded.

    Returns:
        The manifest the layers were built from (``dtype`` applied).

    Raises:
        FormatError: (a subclass) naming file, key and reason; UnsupportedError: a ``dtype``
            that is not a compute dtype.
    """
    if dtype is not None and dtype_name(dtype) not in FLOAT_DTYPES:
        raise UnsupportedError(f"dtype {dtype} is not one of {FLOAT_DTYPES}")
    layers = checkpoint.layers
    specs = with_compute_dtype(layers, dtype_name(dtype) if dtype is not None else None)
    replace_linears(model, specs, device="meta", file=checkpoint.where)
    expected = model.state_dict(keep_vars=True)
    if strict:
        stored: dict[str, str | None] = {key: h.path for h in checkpoint.headers for key in h.tensors}
        check_key_sets(expected, stored, where=checkpoint.where, model_name=type(model).__name__)
    streaming = torch.device(device).type != "cpu"
    staging = None
    if streaming:
        largest = max((e.end - e.begin for h in checkpoint.headers for e in h.tensors.values()), default=0)
        staging = torch.empty(largest, dtype=torch.uint8)
    with contextlib.ExitStack() as stack:
        # every file opened first (each checked to be the file whose header was read): the reads
        # below then come from these descriptors, whatever a later save renames over the names
        readers = [stack.enter_context(TensorReader(h)) for h in checkpoint.headers]
        _read_into(model, checkpoint, readers, expected, layers, dtype, device, staging)
    del staging
    check_model_values(model, layers, file=checkpoint.where)  # one batched pass (step 6 on every load)
    if streaming:
        model.to(device)  # non-persistent buffers built on the host
    return specs


def _read_into(model: nn.Module, checkpoint: Checkpoint, readers: list[TensorReader], expected: Mapping[str, Any],
               layers: Mapping[str, LayerSpec], dtype: torch.dtype | None, device: torch.device | str,
               staging: torch.Tensor | None) -> None:
    """Step 7's reads: every tensor from its opened file, shape-checked, cast, put in place."""
    streaming = staging is not None
    for header, handle in zip(checkpoint.headers, readers):
        for key in header.tensors:  # plain reads into aligned tensors, one at a time
            ref = expected.get(key)
            if ref is None:
                continue  # (not strict: a tensor the model does not have)
            t = handle.get_tensor(key, out=staging)
            check_shape(header.path, key, t.shape, ref.shape)
            head, _, role = key.rpartition(".")
            cast = dtype is not None and (head not in layers or role in COMPUTE_ROLES) and t.is_floating_point()
            if streaming:
                t = t.to(device)  # a copy: the staging buffer is free again
                _assign(model, key, t.to(dtype) if cast else t)
            else:
                _assign(model, key, aligned(t.to(dtype)) if cast else t)
            del t
