"""A k-segmented layer on a kernel backend that runs only plain layers: one call per segment.

A layer with ``k_segments`` (format 2, docs/format.md §7.4) is exactly the sum of plain layers, one
per segment: segment i is the plain layer with the i-th column slices of ``qweight`` (bytes
``[lo/2, hi/2)``: two codes a byte along K), ``wscales`` (groups ``[lo/g, hi/g)``), ``smooth`` and
``lora_down``, the whole ``lora_up`` (the low-rank products add up across segments, a runtime LoRA's
concatenated ranks and ``lora_scales`` with them), its segment's ``act_shift`` / ``act_unsigned``
and, for nvfp4, its own tensor scale ``wtscale[i]``; the bias is added once (by segment 0).

:func:`svdq_format.ops.select_backend` runs a layer this way (:func:`svdq_format.ops.per_segment`)
when a kernel backend refuses a call because of its ``k_segments`` but accepts each segment as a
plain call (:func:`svdq_format.ops.per_segment_refusal`); :func:`svdq_format.ops.auto_act` counts
that as the backend running the layer, so ``mode="auto"`` gives such an int4 layer ``fast8`` on
Hopper like any other. This module holds what that needs and nothing of the registry: the cached
slices and the loops (:func:`run_segments`, :func:`run_segments_fp8`), outputs summed in fp32 and
cast once.

The FP8 modes quantize the *whole* row, unshifted, with one per-token scale (``absmax(x̂[m, :]) / 448``,
§6; each segment's shift enters through its bias, :func:`svdq_format.ops.fp8_bias`), which per-segment
calls that quantize their own slice would not reproduce. So these calls get the activations already
quantized — the backend's ``linear_fp8`` with the column slices of one
:func:`~svdq_format.ops.quantize_fp8_rows` of the whole row and the segment's shift (in a compiled
graph that quantizer is the graph's own, fused by Inductor; eager, :func:`svdq_format.ops.per_segment`
runs it in plain torch) — which a backend offers for the :data:`~svdq_format.ops.SPLIT_ACTS` modes (``fp8w``, i.e.
``fast8``); ``fp8`` (``fast``) has no per-segment path, and ``auto`` passes over it to the exact W4A4
math, whose activations are quantized per group and so split exactly. A segment whose
``linear_fp8`` returns ``None`` (no such kernel after all) runs the reference math of that segment.

The slices are made once per weight version and reused (:class:`~svdq_format.tensor_cache.TensorCache`,
keyed by the layer's tensors: dropped when they are freed, remade when they change, e.g. when a
LoRA is attached): ``qweight`` as column views (no second copy of the residual; a kernel copies
the slice it needs), the small ``wscales`` / ``lora_down`` slices as contiguous copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from . import packing
from .errors import BackendError
from .spec import KSegment
from .tensor_cache import TensorCache

__all__ = ["run_segments", "run_segments_fp8", "segment_bounds", "segment_downs", "segment_weights"]

# --------------------------------------------------------------------------- slices (cached)

_WEIGHTS: TensorCache[tuple[tuple[int, ...], tuple[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                       torch.Tensor], ...]]] = TensorCache()
_DOWNS: TensorCache[tuple[tuple[int, ...], tuple[torch.Tensor, ...]]] = TensorCache()


def segment_bounds(k_segments: tuple[KSegment, ...]) -> list[tuple[int, int]]:
    """``[(lo, hi), …]``: the input channels of each segment."""
    out, lo = [], 0
    for seg in k_segments:
        out.append((lo, lo + seg.size))
        lo += seg.size
    return out


def segment_weights(
    qweight: torch.Tensor, wscales: torch.Tensor, wtscale: Optional[torch.Tensor], smooth: torch.Tensor,
    precision: str, k_segments: tuple[KSegment, ...],
) -> tuple[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], ...]:
    """Per segment ``(qweight, wscales, wtscale, smooth)`` of the plain layer it is (cached).

    The views are taken of detached aliases, so a cache entry never keeps the layer's own tensor
    objects alive (their being freed is what drops the entry)."""
    sizes = tuple(seg.size for seg in k_segments)
    keys = (qweight, wscales, smooth) + ((wtscale,) if wtscale is not None else ())

    def make() -> tuple[tuple[int, ...], tuple[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                      torch.Tensor], ...]]:
        g = packing.GROUP_SIZES[precision]
        qw, ws, sm = qweight.detach(), wscales.detach(), smooth.detach()
        ts = None if wtscale is None else wtscale.detach().reshape(-1)
        if ts is not None and ts.numel() != len(sizes):
            raise BackendError(f"wtscale has {ts.numel()} values for {len(sizes)} k_segments")
        parts = []
        for i, (lo, hi) in enumerate(segment_bounds(k_segments)):
            if lo % g or hi % g:
                raise BackendError(f"k_segment [{lo}, {hi}) is not on whole {precision} groups of {g}")
            parts.append((qw[:, lo // 2 : hi // 2], ws[:, lo // g : hi // g].contiguous(),
                          None if ts is None else ts[i].clone(), sm[lo:hi]))
        return sizes, tuple(parts)

    cached = _WEIGHTS.get(keys, make)
    return cached[1] if cached[0] == sizes else make()[1]


def segment_downs(lora_down: torch.Tensor, k_segments: tuple[KSegment, ...]) -> tuple[torch.Tensor, ...]:
    """``lora_down``'s column slices, one contiguous ``[r, size]`` per segment (cached)."""
    sizes = tuple(seg.size for seg in k_segments)

    def make() -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]]:
        down = lora_down.detach()
        return sizes, tuple(down[:, lo:hi].contiguous() for lo, hi in segment_bounds(k_segments))

    cached = _DOWNS.get((lora_down,), make)
    return cached[1] if cached[0] == sizes else make()[1]


# --------------------------------------------------------------------------- running


def _sum(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The segments' outputs added in fp32, in order, and cast once."""
    y = parts[0].float()
    for p in parts[1:]:
        y = y + p.float()
    return y.to(dtype)


Linear = Callable[..., torch.Tensor]


def run_segments(
    linear: Linear, x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor, lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor], precision: str, act: str, *,
    k_segments: tuple[KSegment, ...],
) -> torch.Tensor:
    """The k-segmented layer's output from ``linear`` (signature of
    :func:`svdq_format.ops.reference_linear`) called once per segment as a plain layer; for the
    modes whose activations are quantized per group (W4A4 exact, W4A16), where the split is exact."""
    weights = segment_weights(qweight, wscales, wtscale, smooth, precision, k_segments)
    downs = segment_downs(lora_down, k_segments) if lora_down is not None else None
    parts = []
    for i, ((lo, hi), seg, (qw, ws, ts, sm)) in enumerate(zip(segment_bounds(k_segments), k_segments, weights)):
        parts.append(linear(x[..., lo:hi], qw, ws, ts, sm, None if downs is None else downs[i], lora_up,
                            bias if i == 0 else None, lora_scales, precision, act, seg.act_shift, seg.act_unsigned))
    return _sum(parts, x.dtype)


def run_segments_fp8(
    linear_fp8: Linear, x: torch.Tensor, q: torch.Tensor, a: torch.Tensor, qweight: torch.Tensor,
    wscales: torch.Tensor, wtscale: Optional[torch.Tensor], smooth: torch.Tensor, lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor],
    precision: str, act: str, *, k_segments: tuple[KSegment, ...],
) -> torch.Tensor:
    """The same with the activations already quantized over the whole row (``q`` ``[M, K]``, ``a``
    ``[M]``): ``linear_fp8`` (signature of :func:`svdq_format.ops.reference_linear_fp8`) gets segment
    i's columns ``[lo, hi)`` of ``q`` and the rows' scales ``a`` as they are."""
    weights = segment_weights(qweight, wscales, wtscale, smooth, precision, k_segments)
    downs = segment_downs(lora_down, k_segments) if lora_down is not None else None
    q2 = q.reshape(-1, x.shape[-1])
    parts = []
    for i, ((lo, hi), seg, (qw, ws, ts, sm)) in enumerate(zip(segment_bounds(k_segments), k_segments, weights)):
        parts.append(linear_fp8(x[..., lo:hi], q2[:, lo:hi], a, qw, ws, ts, sm, None if downs is None else downs[i],
                                lora_up, bias if i == 0 else None, lora_scales, precision, act, seg.act_shift,
                                seg.act_unsigned))
    return _sum(parts, x.dtype)
