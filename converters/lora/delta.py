"""Converted-LoRA ("delta") files and the local cache of converted LoRAs.

A delta file is a LoRA already in the form an SVDQuant model consumes: per *model layer*
(fusion of q|k|v done, rank padded, cast to the layer dtype) ``lora_down [r, K]``,
``lora_up [N, r]``, per-rank unit scales ``lora_scales [r]`` and an optional ``lora_bias [N]``;
plus whole-parameter replacements. It is a safetensors file whose ``__metadata__`` holds
``"svdquant_lora"``: JSON with its own ``format_version``, the base model fingerprint
(:func:`svdq_format.lora.base_fingerprint`), the source file's SHA-256 and the match report.

Tensor names::

    layers.<module>.lora_down / .lora_up / .lora_scales [/ .lora_bias]
    params.<parameter name>

The cache keeps one delta per (LoRA file SHA-256, base fingerprint, delta format version) under
``$SVDQ_CACHE``, else ``$HF_HOME/svdquant/lora``, else ``~/.cache/svdquant/lora``; writes are
atomic. A file's SHA-256 is memoised by (path, size, mtime, inode), the way git's index does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from svdq_format.errors import LoRAError
from svdq_format.io import atomic_write, write_tensors
from svdq_format.lora import LayerDelta, LoraPlan

__all__ = [
    "DELTA_FORMAT_VERSION",
    "DELTA_METADATA_KEY",
    "save_delta",
    "load_delta",
    "is_delta_file",
    "cache_dir",
    "cache_path",
    "file_sha256",
]

DELTA_FORMAT_VERSION = 1
DELTA_METADATA_KEY = "svdquant_lora"


def save_delta(
    plan: LoraPlan,
    path: str | os.PathLike[str],
    *,
    base_fingerprint: str,
    info: Optional[dict[str, Any]] = None,
    base_branches: Optional[Mapping[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]] = None,
    current: Optional[Mapping[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]] = None,
    durable: bool = True,
) -> None:
    """Write a planned adapter as a delta file (atomic).

    Args:
        plan: The adapter, planned for the base model.
        path: Output file.
        base_fingerprint: :func:`svdq_format.lora.base_fingerprint` of the base.
        info: Extra metadata fields.
        base_branches: The base's own ``(lora_down, lora_up)`` per SVDQ layer
            (:func:`svdq_format.lora.original_branches`). When given (the cache does this), each
            SVDQ layer's tensors are stored already concatenated ``[own branch ++ LoRA]`` with
            ``base_rank`` in the metadata, so a later load can map them with no copy.
        current: The layers' present ``(lora_down, lora_up)``; where a layer holds exactly
            ``[own branch ++ this adapter]`` already, it is written as is (no concatenation).
        durable: fsync before the atomic rename (off for cache entries: a lost entry is only
            a cache miss, and the rename still makes the file appear whole or not at all).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    for lname, d in plan.layers.items():
        down, up, base_rank = d.down, d.up, 0
        own = (base_branches or {}).get(lname)
        if own is not None and own[0] is not None and own[1] is not None and own[0].dtype == d.down.dtype:
            base_rank = int(own[0].shape[0])
            cur = (current or {}).get(lname)
            r_full = base_rank + d.down.shape[0]
            if (cur is not None and cur[0] is not None and cur[1] is not None and cur[0].shape[0] == r_full
                    and cur[0].dtype == d.down.dtype and d.down.data_ptr() == cur[0][base_rank:].data_ptr()):
                down, up = cur[0], cur[1]  # the layer's buffer is exactly [own ++ this adapter]
            else:
                down = torch.cat([own[0].to(d.down.device), d.down])
                up = torch.cat([own[1].to(d.up.device), d.up], dim=1)
        tensors[f"layers.{lname}.lora_down"] = down.contiguous()
        tensors[f"layers.{lname}.lora_up"] = up.contiguous()
        tensors[f"layers.{lname}.lora_scales"] = d.scales.float().contiguous()
        if d.bias is not None:
            tensors[f"layers.{lname}.lora_bias"] = d.bias.float().contiguous()
        layers_meta[lname] = {"rank": int(d.down.shape[0]), "has_bias": d.bias is not None, "base_rank": base_rank}
    for pname, t in plan.params.items():
        tensors[f"params.{pname}"] = t.contiguous()
    meta = {
        "format_version": DELTA_FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "adapter": plan.adapter,
        "matched": plan.matched,
        "unmatched": plan.unmatched,
        "layers": layers_meta,
        "params": sorted(plan.params),
        **(info or {}),
    }
    header = {DELTA_METADATA_KEY: json.dumps(meta, sort_keys=True)}
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    write_tensors(path, tensors, metadata=header, durable=durable)


def _read_meta(path: str) -> Optional[dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(DELTA_METADATA_KEY)
    except Exception as exc:
        raise LoRAError(f"{path}: cannot read safetensors file ({' '.join(str(exc).split())})") from None
    if raw is None:
        return None
    from .formats import metadata_json_object

    return metadata_json_object(raw, path, DELTA_METADATA_KEY)


def is_delta_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file carrying svdquant delta metadata."""
    p = os.fspath(path)
    return p.endswith(".safetensors") and os.path.isfile(p) and _read_meta(p) is not None


def load_delta(path: str | os.PathLike[str], *, adapter_name: Optional[str] = None,
               device: Optional[torch.device] = None) -> tuple[LoraPlan, dict[str, Any]]:
    """Read a delta file into a :class:`~svdq_format.lora.LoraPlan` (not yet checked
    against a model; :func:`svdq_format.lora.check_plan` does that). A CUDA ``device``
    reads the tensors straight onto it (see :func:`~converters.lora.formats.mmap_safetensors`).

    Raises:
        LoRAError: not a delta file, newer format version, missing/inconsistent tensors.
    """
    from .formats import mmap_safetensors

    p = os.fspath(path)
    meta = _read_meta(p)
    if meta is None:
        raise LoRAError(f"{p}: not an svdquant LoRA delta (no {DELTA_METADATA_KEY} metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > DELTA_FORMAT_VERSION or version < 1:
        raise LoRAError(
            f"{p}: delta format_version {version!r} is not supported (this svdquant reads <= {DELTA_FORMAT_VERSION})"
        )
    sd, _ = mmap_safetensors(p, device=device)
    layers: dict[str, LayerDelta] = {}
    for lname, info in (meta.get("layers") or {}).items():
        try:
            down = sd.pop(f"layers.{lname}.lora_down")
            up = sd.pop(f"layers.{lname}.lora_up")
            scales = sd.pop(f"layers.{lname}.lora_scales")
        except KeyError as exc:
            raise LoRAError(f"{p}: {exc.args[0]}: missing from the delta") from None
        bias = sd.pop(f"layers.{lname}.lora_bias", None)
        if bool(info.get("has_bias")) != (bias is not None):
            raise LoRAError(f"{p}: layers.{lname}.lora_bias: presence disagrees with the metadata")
        base_rank = info.get("base_rank", 0)
        if not isinstance(base_rank, int) or base_rank < 0 or down.ndim != 2 or up.ndim != 2 \
                or base_rank + info.get("rank", -1) != down.shape[0] or up.shape[1] != down.shape[0]:
            raise LoRAError(f"{p}: layers.{lname}: ranks disagree with the metadata")
        if base_rank:
            layers[lname] = LayerDelta(down[base_rank:], up[:, base_rank:], scales, bias, full_down=down, full_up=up)
        else:
            layers[lname] = LayerDelta(down, up, scales, bias)
    params = {}
    for pname in meta.get("params") or []:
        key = f"params.{pname}"
        if key not in sd:
            raise LoRAError(f"{p}: {key}: missing from the delta")
        params[pname] = sd.pop(key)
    if sd:
        raise LoRAError(f"{p}: {sorted(sd)[0]}: tensor not described by the delta metadata")
    plan = LoraPlan(
        adapter=adapter_name or str(meta.get("adapter") or "default"),
        layers=layers,
        params=params,
        matched=dict(meta.get("matched") or {}),
        unmatched=list(meta.get("unmatched") or []),
        source=p,
    )
    return plan, meta


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted LoRAs are cached (created on first write)."""
    if os.environ.get("SVDQ_CACHE"):
        return Path(os.environ["SVDQ_CACHE"]) / "lora"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "svdquant" / "lora"
    return Path.home() / ".cache" / "svdquant" / "lora"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, memoised in the cache by (path, size, mtime, inode)."""
    p = os.path.realpath(os.fspath(path))
    st = os.stat(p)
    stamp = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / stamp
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    value = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, lambda tmp: Path(tmp).write_text(value))
    except OSError:
        pass  # a read-only cache only costs speed
    return value


def cache_path(lora_sha256: str, base_fingerprint: str) -> Path:
    """The cache file for a (LoRA, base, delta format version) triple."""
    key = hashlib.sha256(f"{lora_sha256}:{base_fingerprint}:{DELTA_FORMAT_VERSION}".encode()).hexdigest()[:40]
    return cache_dir() / f"{key}.safetensors"
