"""safetensors files in and out: the header parser, plain tensor reads, atomic writes (docs/format.md §8).

* :func:`read_header` — the safetensors header, parsed and checked by this module *before*
  safetensors touches the file, so a damaged file gives one of our errors, never a crash or a
  huge allocation; :func:`read_metadata` — a file's SVDQuant metadata; :class:`TensorReader` —
  tensors read with plain file reads into aligned allocations. No pickle anywhere.
* :func:`save_file` — layers (+ optional extra dense tensors) → one file, atomically: the data
  goes to a temporary file in the same directory, is flushed and fsync'ed, then renamed over
  the target, so a crash never leaves a half-written file at ``path``.

What an SVDQuant checkpoint must contain (manifests, key sets, values) is checked by
:mod:`svdq_format.checkpoint`, the one loading core (``load_file``, ``validate``, the loaders).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import jsonsafe
from .errors import HeaderError, ManifestError, MixedDirectoryError, TensorError, WriteError
from .linear import SVDQLinear
from .spec import (
    METADATA_KEY,
    FormatMetadata,
    LayerSpec,
    expected_tensors,
    tensor_names,
)
from .version import __version__

__all__ = [
    "MAX_HEADER_BYTES",
    "DATA_HASH_KEY",
    "file_identity",
    "data_hash",
    "SafetensorsHeader",
    "read_header",
    "read_metadata",
    "save_file",
    "atomic_write",
    "write_tensors",
    "write_safetensors_streaming",
    "aligned",
    "TensorReader",
    "producer_info",
    "refuse_pickle",
]

#: Largest header accepted (safetensors itself allows 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: ``__metadata__`` key of a weight file written as part of a model directory: the sha256 (hex)
#: of the file's data buffer (every byte after the header). ``config.json`` records the set
#: (docs/format.md §8.1).
DATA_HASH_KEY = "svdquant_data_sha256"
_UNSEALED = "0" * 64

# safetensors dtype string → (torch dtype name, itemsize in bytes)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}


def producer_info() -> dict[str, str]:
    """``{"name": "svdquant", "version": <package version>}`` for the metadata."""
    return {"name": "svdquant", "version": __version__}


# --------------------------------------------------------------------------- header


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry."""

    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked safetensors header.

    Attributes:
        path: The file.
        tensors: Tensor name → entry (dtype as a torch dtype name, shape, byte offsets).
        metadata: The ``__metadata__`` string map (empty when absent).
        data_start: Offset of the byte buffer in the file (8 + header length).
    """

    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    identity: tuple[int, ...] | None = None  # (device, inode, size, mtime_ns) when the header was read


_PICKLE_REFUSAL = ("svdquant never loads pickles (unpickling can run arbitrary code); "
                   "convert it to .safetensors with a tool you trust")


def _pickle_kind(head: bytes) -> str | None:
    """What a file starting with ``head`` is, if it looks like a PyTorch/pickle checkpoint."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (torch.save zip of pickles: .bin/.pt/.pth)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file (legacy torch.save .bin/.pt/.ckpt)"
    return None


def _bad_start(p: str, head: bytes, reason: str) -> HeaderError:
    kind = _pickle_kind(head)
    return HeaderError(p, None, f"{kind}, not safetensors: {_PICKLE_REFUSAL}" if kind else reason)


def _not_safetensors(head: bytes, n: int) -> str:
    """Why a file whose first 8 bytes give an impossible header length ``n`` is refused."""
    what = f"its first 8 bytes give a header length of {n}, over the {MAX_HEADER_BYTES}-byte limit"
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        what = f"it starts with text {head.decode('ascii')!r}"
    return f"not a safetensors file ({what})"


def refuse_pickle(path: str | os.PathLike[str]) -> None:
    """Raise :class:`HeaderError` with an explanation if ``path`` is a pickle checkpoint.

    A file is refused only when it starts like a pickle / ``torch.save`` zip *and* cannot be a
    safetensors file (its first 8 bytes are not a plausible header length), so a safetensors
    file is never refused whatever its name. Reading stops at the first 8 bytes.
    """
    p = os.fspath(path)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
    if _pickle_kind(head) and (n > MAX_HEADER_BYTES or n > size - 8):
        raise _bad_start(p, head, "")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check a safetensors header without reading tensor data.

    Checks: the file is long enough, the header length is sane, the header is UTF-8 JSON
    without duplicate keys, every entry has a known dtype, a non-negative integer shape and
    offsets that match ``prod(shape) · itemsize``, and the entries tile the data buffer with
    no holes, overlaps or trailing bytes.

    Raises:
        HeaderError: naming the file (and the tensor) and what is wrong.
        FileNotFoundError: the file does not exist.
    """
    p = os.fspath(path)
    size = os.path.getsize(p)
    if size < 8:
        raise HeaderError(p, None, f"file is {size} bytes, too short for a safetensors header")
    with open(p, "rb") as f:
        identity = _identity(f.fileno())
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _bad_start(p, head, _not_safetensors(head, n))
        if n > size - 8:
            raise _bad_start(p, head, f"header length {n} exceeds the file size {size} (truncated?)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        obj = jsonsafe.loads(text)  # duplicate keys, NaN/Infinity, deep nesting refused
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(p, None, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise HeaderError(p, None, "header is not a JSON object")
    meta_obj = obj.pop("__metadata__", {})
    if not isinstance(meta_obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_obj.items()
    ):
        raise HeaderError(p, "__metadata__", "must be an object of strings")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise HeaderError(p, name, "header entry is not an object")
        st_dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(st_dtype, str) or st_dtype not in _ST_DTYPES:
            raise HeaderError(p, name, f"unknown dtype {st_dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape
        ) or len(shape) > 8:
            raise HeaderError(p, name, f"bad shape {shape!r}")
        if math.prod(d for d in shape if d) >= 2**48:  # also with a 0 dim: no tensor has 2^48 elements
            raise HeaderError(p, name, f"absurd shape {shape!r} (more than 2^48 elements without its zero dims)")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise HeaderError(p, name, f"bad data_offsets {offsets!r}")
        begin, end = offsets
        torch_name, itemsize = _ST_DTYPES[st_dtype]
        nbytes = math.prod(shape) * itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise HeaderError(
                p, name, f"data_offsets {offsets} do not match shape {shape} of {st_dtype} ({nbytes} bytes)"
            )
        if end > data_len:
            raise HeaderError(p, name, f"data ends at byte {end} beyond the data buffer ({data_len} bytes; truncated?)")
        entries[name] = TensorEntry(torch_name, tuple(shape), begin, end)
    cursor = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != cursor:
            what = "overlaps the previous tensor" if e.begin < cursor else "leaves a hole before it"
            raise HeaderError(p, name, f"data_offsets {what}")
        cursor = e.end
    if cursor != data_len:
        raise HeaderError(p, None, f"{data_len - cursor} trailing bytes after the last tensor")
    return SafetensorsHeader(p, entries, dict(meta_obj), data_start, identity)


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_identity(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """``(device, inode, size, mtime_ns)`` of the file now at ``path``: it changes when a save
    renames another file over the name (what :attr:`SafetensorsHeader.identity` records)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_metadata(path: str | os.PathLike[str], header: SafetensorsHeader | None = None) -> FormatMetadata:
    """The SVDQuant metadata of one file (parsed and checked against the spec's rules)."""
    header = header or read_header(path)
    text = header.metadata.get(METADATA_KEY)
    if text is None:
        raise ManifestError(
            header.path, "__metadata__", f"no {METADATA_KEY!r} entry: not an SVDQuant checkpoint"
        )
    return FormatMetadata.loads(text, file=header.path)


# --------------------------------------------------------------------------- write


def atomic_write(path: str | os.PathLike[str], write: Any, *, durable: bool = True) -> None:
    """Run ``write(tmp_path)`` and atomically rename the result to ``path``.

    The temporary file sits next to ``path`` (same filesystem; hidden, ending in ``.tmp`` so
    no reader ever picks it up), is fsync'ed before the rename, and is removed on any
    failure, so ``path`` is either the old file or the complete new one. The file gets the
    permissions a new file of ``open(path, "w")`` gets, ``0o666 & ~umask`` (readable by the
    group and others under the usual umask 022), also when it replaces an older file.

    Args:
        path: The file to write.
        write: Called with the temporary file's path (an empty file); writes the content.
        durable: fsync the file and its directory (off for caches: a lost entry only costs time).

    Raises:
        WriteError: the directory is missing or read-only, the disk is full, or another
            ``OSError`` happened while writing.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        tmp = _create_temp_beside(target, directory)
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 & ~umask, as the kernel created it
    except OSError as exc:
        raise WriteError(target, exc.strerror or str(exc)) from None
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # safetensors >= 0.7 writes a new 0600 file
            os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(target, exc.strerror or str(exc)) from None
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames and creations in ``directory`` durable (``fsync`` of the directory; a
    filesystem that cannot fsync a directory is left as it is)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems cannot fsync a directory
        pass


def _create_temp_beside(target: Path, directory: Path) -> str:
    """Create an empty hidden ``.<name>.<random>.tmp`` file in ``directory``; return its path.

    Not ``tempfile.mkstemp``: that makes every file 0600 whatever the umask, and the rename
    would hand that mode to the checkpoint (unreadable to a server running as another user).
    ``os.open(..., 0o666)`` lets the umask decide, like ``open(path, "w")``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        return tmp
    raise FileExistsError(f"{directory}: no free temporary file name")  # pragma: no cover


def _write_safetensors(
    tensors: Mapping[str, torch.Tensor], tmp: str, metadata: dict[str, str], *, target: str
) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file as _st_save

    try:
        _st_save(dict(tensors), tmp, metadata=metadata)
    except SafetensorError as exc:  # e.g. "I/O error: No space left on device (os error 28)"
        reason = str(exc).removeprefix("Error while serializing: ")
        raise WriteError(target, reason) from None
    _sort_header_metadata(tmp)


def write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *, metadata: dict[str, str] | None = None,
    durable: bool = True,
) -> None:
    """Write a plain safetensors file atomically (:func:`atomic_write`), its header metadata sorted.

    The one writer of the files that are not checkpoints in our format (LoRA deltas, extracted
    LoRAs, calibration sets, Nunchaku exports): equal tensors and metadata give equal bytes from
    run to run (safetensors itself orders the metadata differently in every process).

    Args:
        path: The file to write.
        tensors: Name → tensor (contiguous, on any device).
        metadata: The header's ``__metadata__`` (strings).
        durable: fsync the file and its directory.

    Raises:
        WriteError: the directory is missing or read-only, the disk is full, or safetensors
            refused to write.
    """
    target = str(path)
    atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, dict(metadata or {}), target=target),
                 durable=durable)


def _sort_header_metadata(path: str) -> None:
    """Put the ``__metadata__`` entries of a freshly written file in sorted order, in place.

    safetensors writes them from a hash map, in an order that changes from process to process;
    sorted, equal checkpoints are equal byte for byte. The header keeps its length (the same
    JSON, permuted); anything unexpected leaves the file as written.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        body = raw.rstrip(b" ")
        try:
            header = json.loads(body)
        except ValueError:
            return
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        if json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode() != body:
            return  # not the compact form this rewrite reproduces
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) == len(body):
            f.seek(8)
            f.write(new)


_ST_NAMES = {torch_name: st for st, (torch_name, _) in _ST_DTYPES.items()}


def write_safetensors_streaming(
    tensors: Mapping[str, torch.Tensor],
    path: str,
    metadata: Mapping[str, str],
    read_tensor: Callable[[str], torch.Tensor],
    *,
    target: str | None = None,
) -> None:
    """Write a safetensors file tensor by tensor, byte-identical to ``safetensors`` + the
    sorted ``__metadata__`` of :func:`save_file` (not atomic: call it under :func:`atomic_write`).

    The tensor order of the data buffer (and header) is asked from ``safetensors`` itself by
    serialising empty tensors of the same names and dtypes (it depends on names and dtypes
    only); offsets follow from the shapes; the header is the same compact JSON, padded with
    spaces to a multiple of 8 bytes. Meta tensors in ``tensors`` are read with ``read_tensor``
    when written.

    Raises:
        TensorError: a tensor read back with another dtype or shape than announced.
        WriteError: the disk is full or another I/O error.
    """
    from safetensors.torch import save as _st_bytes

    where = target or path
    empty = _st_bytes({k: torch.empty(0, dtype=t.dtype) for k, t in tensors.items()})
    (n,) = struct.unpack("<Q", empty[:8])
    order = [k for k in json.loads(empty[8 : 8 + n]) if k != "__metadata__"]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for k in order:
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for k in order:
                want = tensors[k]
                t = read_tensor(k) if want.is_meta else want
                if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                    raise TensorError(where, k, f"read {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
                                      f"expected {str(want.dtype).removeprefix('torch.')} {list(want.shape)}")
                if t.numel():
                    f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    except OSError as exc:
        raise WriteError(where, exc.strerror or str(exc)) from None


def layer_state(prefix: str, layer: SVDQLinear, *, file: str | None = None,
                host: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one layer under their full keys, contiguous, on CPU (``host=False``: where
    they are; meta tensors always stay meta).

    Raises:
        TensorError: a tensor does not have the dtype/shape its manifest entry implies — e.g.
            runtime LoRA ranks are attached to the low-rank branch (unload them first), so a
            file that would not validate is never written.
    """
    names = tensor_names(prefix)
    out: dict[str, torch.Tensor] = {}
    spec = layer.spec
    for role, (dtypes, shape) in expected_tensors(spec).items():
        t = getattr(layer, role)
        if t is None or tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") not in dtypes:
            got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            hint = (
                "; runtime LoRA ranks are attached: unload them (svdq_format.lora.unload_all) before saving"
                if role in ("lora_down", "lora_up")
                and t is not None
                and t.dim() == 2
                and t.shape[0 if role == "lora_down" else 1] > spec.rank
                else ""
            )
            raise TensorError(
                file, names[role], f"is {got}, the layer's spec needs {' or '.join(dtypes)} {list(shape)}{hint}"
            )
        out[names[role]] = t if t.is_meta or not host else t.detach().to("cpu").contiguous()
    return out


def save_file(
    layers: Mapping[str, SVDQLinear],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    header_metadata: Mapping[str, str] | None = None,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
    streaming: bool = False,
    seal: bool = False,
) -> None:
    """Write SVDQuant layers to one safetensors file, atomically.

    Args:
        layers: Layer prefix (e.g. ``"transformer_blocks.0.attn.to_q"``) → layer.
        path: Target file; replaced atomically if it exists.
        metadata: Extra JSON-able fields for the SVDQuant metadata (e.g. ``base_model``);
            cannot override ``format_version``, ``layout``, ``layers`` or ``producer``.
        extra_tensors: Further tensors stored as they are (e.g. the 16-bit layers of a
            model); their names must not collide with a layer's tensors.
        header_metadata: Further string entries for the safetensors ``__metadata__`` (e.g.
            ``"config"``, the model config of a single-file checkpoint); cannot replace
            ``"svdquant"`` or ``"format"``.
        read_tensor: Reads a tensor by its key. Layers and extra tensors may then be on the meta
            device (only their shapes and dtypes known): the file is written by streaming, each
            meta tensor read when its bytes are written and dropped after, so memory holds one
            tensor at a time. The bytes are those the in-memory path writes.
        streaming: Write tensor by tensor even when every tensor is at hand (they may then stay
            on their device: each is copied to the host when written), instead of building the
            whole file in memory (safetensors' writer holds a copy of every tensor's bytes).
            Same bytes.
        seal: Record the sha256 of the data buffer under :data:`DATA_HASH_KEY` (weight files of
            a model directory: ``config.json`` records the set, :mod:`svdq_format.commit`).

    Raises:
        FormatError: a name collision, an invalid layer, or a tensor read back with another
            dtype/shape than announced.
    """
    p = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, LayerSpec] = {}
    for prefix, layer in layers.items():
        if not isinstance(layer, SVDQLinear):
            raise TensorError(p, prefix, f"expected an SVDQLinear, got {type(layer).__name__}")
        spec = layer.spec
        spec.check(where=prefix, file=p)
        specs[prefix] = spec
        tensors.update(layer_state(prefix, layer, file=p, host=not streaming))
    for name, t in (extra_tensors or {}).items():
        if name in tensors:
            raise TensorError(p, name, "extra tensor collides with a layer tensor")
        tensors[name] = t if t.is_meta or streaming else t.detach().to("cpu").contiguous()
    extra = dict(metadata or {})
    for reserved in ("format_version", "layout", "layers", "producer", "quant_method"):
        if reserved in extra:
            raise ManifestError(p, reserved, "is set by svdquant and cannot be given in metadata")
    meta = FormatMetadata(layers=specs, producer=producer_info(), extra=extra)
    header_meta = {METADATA_KEY: meta.dumps(), "format": "pt"}
    if seal:
        header_meta[DATA_HASH_KEY] = _UNSEALED  # filled in once the data is on disk
    for key, value in (header_metadata or {}).items():
        if key in header_meta or key == DATA_HASH_KEY or not isinstance(value, str):
            raise ManifestError(p, key, "header metadata must be a string and cannot replace svdquant/format")
        header_meta[key] = value

    if streaming or any(t.is_meta for t in tensors.values()):
        if read_tensor is None and not streaming:
            name = next(k for k, t in tensors.items() if t.is_meta)
            raise TensorError(p, name, "is on the meta device and no read_tensor was given")
        read = read_tensor or (lambda key: tensors[key])

        def write(tmp: str) -> None:
            write_safetensors_streaming(tensors, tmp, header_meta, read, target=p)
            if seal:
                _seal(tmp)
    else:
        def write(tmp: str) -> None:
            _write_safetensors(tensors, tmp, header_meta, target=p)
            if seal:
                _seal(tmp)
    atomic_write(p, write)


def data_hash(path: str | os.PathLike[str], *, data_start: int | None = None) -> str:
    """sha256 (hex) of a safetensors file's data buffer (every byte after the header)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if data_start is None:
            (n,) = struct.unpack("<Q", f.read(8))
            data_start = 8 + n
        f.seek(data_start)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _seal(path: str) -> None:
    """Fill in the :data:`DATA_HASH_KEY` placeholder of a freshly written file, in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        mark = f'"{DATA_HASH_KEY}":"'.encode()
        at = raw.find(mark + _UNSEALED.encode())
        if at < 0:
            raise HeaderError(path, DATA_HASH_KEY, "placeholder not found in the written header")
        digest = data_hash(path, data_start=8 + n)
        f.seek(8 + at + len(mark))
        f.write(digest.encode())


# --------------------------------------------------------------------------- read


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its data is 64-byte aligned, else an aligned copy.

    BLAS kernels take other code paths (and round differently) on unaligned data, which would
    break bit-identical save → load → forward. Cloning gives torch's own aligned allocation.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()


class TensorReader:
    """Reads the tensors of a checked header with plain file reads (no mmap, no pickle).

    Each tensor is read straight into a fresh torch allocation (64-byte aligned, so BLAS
    rounds the same way as on the tensors that were saved), so the memory used is exactly the
    tensors asked for: reading a file tensor by tensor never holds more than one tensor
    beyond what the caller keeps.

    Use as a context manager; :meth:`get_tensor` raises :class:`TensorError` for a name the
    header lacks and :class:`HeaderError` when the file is shorter than its header says.
    """

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._file = open(header.path, "rb")
        if header.identity is not None and _identity(self._file.fileno()) != header.identity:
            self._file.close()
            raise MixedDirectoryError(header.path, None, "the file was replaced after its header was read "
                                      "(another save committed meanwhile)")

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header.tensors)

    def get_tensor(self, name: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (CPU).

        Args:
            name: Tensor name.
            out: Optional 1-D uint8 staging buffer of at least the tensor's size; the tensor is
                read into its start and returned as a view of it (valid until the next read
                into the same buffer). Streaming loaders use one buffer for every tensor, so
                host memory stays at the largest tensor whatever the allocator keeps.
        """
        entry = self.header.tensors.get(name)
        if entry is None:
            raise TensorError(self.header.path, name, "missing tensor")
        nbytes = entry.end - entry.begin
        if out is not None and out.numel() >= nbytes:
            t = out[:nbytes].view(getattr(torch, entry.dtype)).reshape(entry.shape)
        else:
            t = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        if nbytes:
            buf = t.reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self.header.data_start + entry.begin)
            if self._file.readinto(buf) != nbytes:  # type: ignore[arg-type]  # ndarray is a buffer
                raise HeaderError(self.header.path, name, "file ends inside the tensor data (truncated)")
        return t
