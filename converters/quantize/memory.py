"""Memory of a quantization process: peaks (host ``VmHWM``, the GPU caching allocator's) and
out-of-memory errors recognised (:func:`is_oom`)."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

__all__ = ["host_peak_bytes", "reset_host_peak", "memory_report", "is_oom"]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or the host) ran out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_peak_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` (Linux; resettable), else ``ru_maxrss``."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def reset_host_peak() -> bool:
    """Start :func:`host_peak_bytes` again from the current RSS (Linux ``clear_refs``); False
    where that is not possible. For processes of our own (the CLI), not for a library call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_report(device: torch.device | str, *, rank: int = 0, host_reset: bool = False) -> dict[str, Any]:
    """Peak host and GPU memory of this process (one rank), for the JSON report."""
    dev = torch.device(device)
    gpu = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return {"rank": rank, "peak_host_rss_bytes": host_peak_bytes(), "host_peak_since_start": host_reset,
            "peak_gpu_bytes": int(gpu)}
