"""The ``cutlass-sm90`` backend of ``svdquant::linear`` (Hopper), registered on import.

Which call runs on which kernels is one table, :data:`PATHS`, keyed by (weight precision,
activation mode). Each path names what it needs (``triton``, or ``nvcc`` + ``nvidia-cutlass``
for CUTLASS-built kernels); :func:`supports` turns anything missing into a one-line reason, so
the layer falls back to the reference backend with one warning instead of failing.

Validated on an H100 (GPU tests, see docs/kernels.md) and all on by default: the ``fast8`` mode
of int4 layers (``act="fp8w"``: the Triton prologue + our CUTLASS group-64 int4 × FP8 GEMM,
:mod:`svdq_kernels.cutlass_fast8`, built by :mod:`svdq_kernels.build` on first use), the
``fast`` mode (``act="fp8"``: a Triton prologue + a Triton group-64 GEMM,
:mod:`svdq_kernels.triton_fast`), int4 ``exact`` (``act="int4"``, equal to the reference up to
fp32 summation order), int4 W4A16 (``"none"``) and nvfp4 (``"nvfp4"`` / ``"none"``). A path
added later starts in :data:`EXPERIMENTAL_PATHS` (used only with ``SVDQ_EXPERIMENTAL_KERNELS=1``)
until its GPU tests pass. A path may add host-side limits (``KernelPath.check``: ``fast8`` takes
bf16 layers with ``in_features % 128 == 0`` and ``out_features % 128 == 0``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

from svdq_format import ops
from svdq_format.errors import BackendError

from . import cutlass_w4a16
from .cutlass_fast8 import fast8_linear, fast8_linear_fp8, fast8_unsupported
from .triton_fast import exact_linear, fast_linear, nvfp4_linear, w4a16_linear

__all__ = ["BACKEND_NAME", "PRIORITY", "KernelPath", "PATHS", "EXPERIMENTAL_PATHS", "experimental_kernels", "supports",
           "register", "unregister", "requirement_missing"]

#: Registry name (``SVDQ_BACKEND=cutlass-sm90`` / ``layer.backend = "cutlass-sm90"``).
BACKEND_NAME = "cutlass-sm90"
#: Above the reference (0): chosen automatically when it accepts a call.
PRIORITY = 100
_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class KernelPath:
    """One implemented (precision, act) combination."""

    name: str
    linear: Callable[..., torch.Tensor]
    needs: tuple[str, ...]
    #: Extra host-side limits: ``check(in_features, out_features, dtype)`` → reason or None.
    check: Optional[Callable[[int, int, torch.dtype], Optional[str]]] = None
    #: The same layer with FP8 activations given (``svdquant::linear_fp8``; compiled graphs).
    linear_fp8: Optional[Callable[..., torch.Tensor]] = None


#: (precision, act) -> kernels. Missing combinations fall back to the reference.
PATHS: dict[tuple[str, str], KernelPath] = {
    ("int4", "fp8"): KernelPath("fast-int4 (triton prologue + group-64 fp8 gemm)", fast_linear, ("triton",)),
    ("int4", "int4"): KernelPath("exact-int4 (triton int4 prologue + group-64 gemm)", exact_linear, ("triton",)),
    ("int4", "none"): KernelPath("w4a16-int4 (triton fp16 prologue + scale-folded fp16 gemm)", w4a16_linear,
                                 ("triton",)),
    ("nvfp4", "nvfp4"): KernelPath("nvfp4 (triton: both operands dequantized exactly to fp16)", nvfp4_linear,
                                   ("triton",)),
    ("int4", "fp8w"): KernelPath("fast8-int4 (triton prologue + CUTLASS group-64 int4 x fp8 gemm)", fast8_linear,
                                 ("triton", "nvcc", "nvidia-cutlass"), fast8_unsupported, fast8_linear_fp8),
    ("nvfp4", "none"): KernelPath("w4a16-nvfp4 (triton: fp16 activations, exact fp16 weights)", nvfp4_linear,
                                  ("triton",)),
}

#: Paths written and checked on the CPU (source generation, sm_90a compilation, Triton's
#: interpreter) but not yet run on a GPU: used only with ``SVDQ_EXPERIMENTAL_KERNELS=1`` — then
#: in place of the :data:`PATHS` entry for the same combination — until the GPU tests pass.
EXPERIMENTAL_PATHS: dict[tuple[str, str], KernelPath] = {
    ("int4", "none"): KernelPath("w4a16-int4 (triton fp16 prologue + CUTLASS group-64 int4 x fp16 gemm)",
                                 cutlass_w4a16.w4a16_linear, ("triton", "nvcc", "nvidia-cutlass"), fast8_unsupported),
}


def experimental_kernels() -> bool:
    """Whether ``SVDQ_EXPERIMENTAL_KERNELS=1``: the paths of :data:`EXPERIMENTAL_PATHS` replace
    the :data:`PATHS` entries of the same combinations (kernels not yet validated on a GPU)."""
    return os.environ.get("SVDQ_EXPERIMENTAL_KERNELS") == "1"


def _path(precision: str, act: str) -> Optional[KernelPath]:
    if experimental_kernels() and (precision, act) in EXPERIMENTAL_PATHS:
        return EXPERIMENTAL_PATHS[(precision, act)]
    return PATHS.get((precision, act))


@functools.lru_cache(maxsize=None)
def _module_present(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def requirement_missing(need: str) -> Optional[str]:
    """Why requirement ``need`` (``triton`` | ``nvcc`` | ``nvidia-cutlass``) is unmet, else None."""
    if need == "triton":
        return None if _module_present("triton") else "triton is not installed"
    if need == "nvidia-cutlass":
        return None if _module_present("cutlass_library") else (
            "nvidia-cutlass is not installed (pip install 'svdquant[kernels]')")
    if need == "nvcc":
        from .build import find_nvcc

        return None if find_nvcc() else "nvcc (CUDA toolkit) was not found"
    return f"unknown requirement {need!r}"


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of CUDA device ``index``; None when torch has no CUDA device."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(index)


def supports(call: ops.LinearCall) -> Optional[str]:
    """``None`` if this backend runs ``call``, else a one-line reason (see the module doc)."""
    if os.environ.get("SVDQ_DISABLE_KERNELS"):
        return "disabled by SVDQ_DISABLE_KERNELS"
    if call.device.type != "cuda":
        return f"input is on {call.device.type}, not a CUDA GPU"
    capability = _capability(call.device.index if call.device.index is not None else 0)
    if capability is None:
        return "this torch build has no CUDA device available"
    major, minor = capability
    if (major, minor) != (9, 0):
        return f"GPU is sm_{major}{minor}; these kernels are for Hopper (sm_90)"
    if call.k_segments:
        return ("per-segment activation handling (k_segments, format 2) has no sm90 kernel: "
                "the layer runs one plain call per segment where each is accepted (svdq_format.segmented)")
    path = _path(call.precision, call.act)
    broken = BROKEN.get((call.precision, call.act))
    if broken:
        return broken
    if path is None:
        return (f"no sm90 kernel yet for precision {call.precision!r} with activations "
                f"{call.act!r} (implemented: {', '.join(f'{p}/{a}' for p, a in PATHS)})")
    if call.dtype not in _DTYPES:
        return f"compute dtype {call.dtype} (kernels take bfloat16 or float16)"
    if call.in_features % 64:
        return f"in_features {call.in_features} is not a multiple of 64"
    if call.rows == 0:
        return "empty input"
    if path.check is not None:
        reason = path.check(call.in_features, call.out_features, call.dtype)
        if reason:
            return reason
    for need in path.needs:
        reason = requirement_missing(need)
        if reason:
            return reason
    return None


#: Paths whose kernels failed to build or load in this process: (precision, act) → reason.
#: :func:`supports` refuses them from then on (the ``auto`` mode then picks the next mode).
BROKEN: dict[tuple[str, str], str] = {}


def _guarded(path: KernelPath, precision: str, act: str, run: Callable[[], Optional[torch.Tensor]],
             fallback: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """Run a path; when it needs an on-demand build (``nvcc``) and that build or load fails, record
    the path as broken (one warning naming the reason), re-register so the ``auto`` mode decides
    again, and compute this call with ``fallback`` (the reference math of the same mode)."""
    try:
        return run()
    except BackendError as exc:
        if "nvcc" not in path.needs:
            raise
        reason = f"{path.name} is unavailable: {exc}"
        BROKEN[(precision, act)] = reason
        warnings.warn(f"svdquant: {reason}; this call runs on the reference backend, later ones on the next "
                      "fastest kernels", RuntimeWarning, stacklevel=2)
        register()
        return fallback()


def _linear(x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
            precision, act, act_shift=0.0, act_unsigned=False):
    path = _path(precision, act)
    assert path is not None  # supports() accepted the call
    args = (x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act, act_shift,
            act_unsigned)
    return _guarded(path, precision, act, lambda: path.linear(*args), lambda: ops.reference_linear(*args))


def _linear_fp8(x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
                precision, act, act_shift=0.0, act_unsigned=False):
    path = _path(precision, act)
    assert path is not None  # supports() accepted the call
    if path.linear_fp8 is None:
        return None  # ops runs path.linear, which quantizes x itself
    args = (x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
            act_shift, act_unsigned)
    return _guarded(path, precision, act, lambda: path.linear_fp8(*args), lambda: ops.reference_linear_fp8(*args))


def register() -> None:
    """Register (or re-register) the backend in :mod:`svdq_format.ops`."""
    ops.register_backend(ops.Backend(BACKEND_NAME, _linear, supports, PRIORITY, linear_fp8=_linear_fp8),
                         replace=True)


def unregister() -> None:
    """Remove the backend from the registry."""
    ops.unregister_backend(BACKEND_NAME)
