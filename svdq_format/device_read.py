"""Read a whole safetensors file straight into GPU memory: threaded reads, pinned staging, one buffer.

Reading tensor by tensor into pageable host memory and copying each to the GPU costs a page
fault per 4 KiB and a synchronous copy per tensor. Here the file's data region is read by
several threads (``os.preadv`` releases the GIL) into a small ring of pinned staging buffers
and each chunk is copied asynchronously into **one** device allocation; the tensors are views
of it. Host memory used: the ring (``threads × chunk``, allocated once per process), whatever
the file size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import HeaderError
from .io import SafetensorsHeader

__all__ = ["read_to_device"]

_CHUNK = 8 << 20
_RING = 8
_lock = threading.Lock()
_staging: list[torch.Tensor] = []
_readers: list[ThreadPoolExecutor] = []


def _ring() -> tuple[list[torch.Tensor], ThreadPoolExecutor]:
    """The process's pinned staging buffers and reader threads (made on first use: pinning
    memory and starting threads are slow)."""
    with _lock:
        if not _staging:
            _staging.extend(torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(_RING))
        if not _readers:
            _readers.append(ThreadPoolExecutor(_RING, thread_name_prefix="svdq-read"))
        return _staging, _readers[0]


def _pread(fd: int, buf: torch.Tensor, offset: int, nbytes: int, path: str) -> None:
    view = memoryview(buf.numpy())[:nbytes]  # type: ignore[arg-type]  # ndarray is a buffer
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise HeaderError(path, None, "file ends inside the tensor data (truncated)")
        got += n


def read_to_device(
    header: SafetensorsHeader, device: torch.device | str, *, names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of a checked safetensors file, on a CUDA device, as views of one allocation.

    Args:
        header: From :func:`svdq_format.io.read_header` (offsets already checked to tile the data).
        device: A CUDA device.
        names: Read only these tensors (default: all). Only their bytes are read; they are
            packed into the allocation, each at a 256-byte aligned offset (as a separate CUDA
            allocation would be, so kernels choose the same code paths for them).

    Returns:
        Tensor name → tensor on ``device`` (header order; ``names`` order when given). A tensor
        of the whole file whose offset is not a multiple of its element size is copied to its
        own allocation.

    Raises:
        KeyError: a name in ``names`` is not in the file.
        HeaderError: the file is shorter than its header says.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"read_to_device needs a CUDA device, got {dev}")
    if names is None:
        entries = header.tensors
        total = max((e.end for e in entries.values()), default=0)
        where = {name: e.begin for name, e in entries.items()}
        ranges = [(0, 0, total)]  # (file offset in the data region, device offset, bytes)
    else:
        missing = [n for n in names if n not in header.tensors]
        if missing:
            raise KeyError(f"{header.path}: no tensor {missing[0]!r}")
        entries = {n: header.tensors[n] for n in names}
        where, ranges, total = {}, [], 0
        for name in sorted(entries, key=lambda n: entries[n].begin):  # file order: sequential reads
            e = entries[name]
            total = -(-total // 256) * 256
            where[name] = total
            ranges.append((e.begin, total, e.end - e.begin))
            total += e.end - e.begin
    data = torch.empty(total, dtype=torch.uint8, device=dev)
    pieces = [(f + o, d + o, min(_CHUNK, n - o)) for f, d, n in ranges for o in range(0, n, _CHUNK)]
    if pieces:
        _copy_pieces(header, pieces, data, dev)
    out: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        dtype = getattr(torch, e.dtype)
        raw = data[where[name] : where[name] + e.end - e.begin]
        if where[name] % dtype.itemsize:
            raw = raw.clone()
        out[name] = raw.view(dtype).view(e.shape)
    return out


def _copy_pieces(header: SafetensorsHeader, pieces: list[tuple[int, int, int]], data: torch.Tensor,
                 dev: torch.device) -> None:
    """Read each (file offset, device offset, bytes ≤ chunk) piece through the pinned ring into ``data``."""
    ring, pool = _ring()
    stream = torch.cuda.Stream(dev)
    done = [torch.cuda.Event() for _ in ring]
    used = [False] * len(ring)
    fd = os.open(header.path, os.O_RDONLY)
    pending: dict[int, Future[None]] = {}

    def submit(i: int) -> None:
        slot = i % len(ring)
        if used[slot]:
            done[slot].synchronize()  # its previous chunk has left for the GPU
        used[slot] = True
        off, _, n = pieces[i]
        pending[i] = pool.submit(_pread, fd, ring[slot], header.data_start + off, n, header.path)

    try:
        for i in range(min(len(ring), len(pieces))):
            submit(i)
        for i, (_, dst, n) in enumerate(pieces):
            pending.pop(i).result()
            slot = i % len(ring)
            with torch.cuda.stream(stream):
                data[dst : dst + n].copy_(ring[slot][:n], non_blocking=True)
                done[slot].record(stream)
            if i + len(ring) < len(pieces):
                submit(i + len(ring))
    finally:
        for f in pending.values():  # an error: let in-flight reads finish before closing
            f.exception()
        os.close(fd)
    torch.cuda.current_stream(dev).wait_stream(stream)
    data.record_stream(stream)
