"""The ``svdquant::linear`` custom op, its reference implementation and the backend registry.

Every :class:`~svdq_format.linear.SVDQLinear` forward goes through one ``torch.library`` custom
op, so ``torch.compile`` traces it as a single node (a fake implementation gives output
shapes). The op hands the call to a *backend*:

* ``"reference"`` — this file: plain torch, any device, the normative math of docs/format.md §6.
* others (e.g. ``"cutlass-sm90"``) are registered by :mod:`svdq_kernels` when it is imported.

Selection is automatic (``backend="auto"``): the registered backend with the highest priority
whose :attr:`Backend.supports` accepts the call, else the reference. Asking for a backend by
name that cannot run the call falls back to the reference with one warning (never a crash);
``SVDQ_BACKEND=<name>`` in the environment forces a backend for every layer.

Activation handling is given by ``act``:

* ``"int4"`` / ``"nvfp4"`` — the W4A4 (``exact``) math: activations quantized per token per
  group as the format defines;
* ``"fp8"`` — the Hopper ``fast`` mode: activations quantized to float8_e4m3 per token
  (scale = absmax / 448), weights exactly as stored; a layer's ``act_shift`` is not applied to
  the quantized activations but added exactly to the bias (:func:`fp8_bias`), in ``"fp8w"`` too;
* ``"fp8w"`` — the Hopper ``fast8`` mode: ``fp8`` activations, and int4 weights rounded to e4m3
  after scaling each row by a power of two (:func:`svdq_format.packing.fp8_weight_values`): the
  math of an FP8 tensor-core GEMM that converts the weights in its mainloop;
* ``"none"`` — W4A16: activations are not quantized.

A layer with ``k_segments`` (format 2, docs/format.md §7.4) gives ``act_shift``/``act_unsigned``
per segment of its input channels (and, for nvfp4, one tensor scale per segment); the op carries
them as ``k_segments`` (:class:`~svdq_format.spec.KSegment`) in :class:`LinearCall` and to the
backend's ``linear`` as the keyword ``k_segments`` (passed only when the layer has segments). A
backend that refuses such a call but accepts each segment as a plain call runs it one call per
segment (:func:`per_segment`, with :mod:`svdq_format.segmented`; chosen by :func:`select_backend` and
counted by :func:`auto_act`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils import _python_dispatch

from . import packing, segmented
from .errors import BackendError
from .spec import KSegment
from .tensor_cache import TensorCache

__all__ = [
    "ACT_MODES",
    "Backend",
    "LinearCall",
    "register_backend",
    "unregister_backend",
    "get_backend",
    "available_backends",
    "select_backend",
    "per_segment",
    "per_segment_refusal",
    "reference_linear",
    "reference_linear_fp8",
    "auto_act",
    "AUTO_FAST_ACTS",
    "load_plugins",
    "PLUGIN_GROUP",
    "quantize_fp8_rows",
    "fp8_activations",
    "graph_fp8_activations",
    "fp8_smoothed",
    "fp8_bias",
    "fp8_one_signed",
    "smooth_reciprocal",
    "smoothed",
    "FP8_ACTS",
    "SPLIT_ACTS",
    "FAST8_PROLOGUE",
    "FAST8_PROLOGUES",
    "env_choice",
    "svdq_linear",
]

ACT_MODES = ("int4", "nvfp4", "fp8", "fp8w", "none")

#: Where a compiled ``fast8`` graph quantizes the activations (``SVDQ_FAST8_PROLOGUE``, read once at
#: import, a constant for ``torch.compile``): ``"fused"`` (default) — the whole layer is
#: ``svdquant::linear``, whose kernel backend finds the rows' absmax in the same pass over ``x``
#: that computes ``x · L2ᵀ`` (then the codes; not fused with ``x``'s producer; eager ``fast8``
#: calls use that prologue too); ``"inductor"`` — :func:`graph_fp8_activations` as plain torch in
#: the graph, fused by Inductor into the op producing ``x``, then ``svdquant::linear_fp8``. The
#: fused prologue is the default since its H100 timing: the compiled layer 1.02–1.15× faster at
#: M = 4608 on FLUX.1's six shapes, with and without a GELU producer (docs/kernels.md, "The fused
#: prologue"). k-segmented layers always take the graph quantizer (one scale spans the segments).
FAST8_PROLOGUES = ("fused", "inductor")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """A setting read from the environment variable ``name``: one of ``choices`` (case and
    surrounding spaces ignored), ``default`` when unset or empty; any other value warns and gives
    ``default`` (a typo must not stop a model from running)."""
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        warnings.warn(f"{name}={value!r} is not one of {choices}; using {default!r}", stacklevel=3)
        return default
    return value


def _fast8_prologue_setting() -> str:
    return env_choice("SVDQ_FAST8_PROLOGUE", FAST8_PROLOGUES, FAST8_PROLOGUES[0])


FAST8_PROLOGUE = _fast8_prologue_setting()

#: In a compiled graph with the fused prologue, quantize a layer without a low-rank branch in the
#: graph (Inductor fuses it into x's producer and x is never written; :func:`svdq_linear`).
GRAPH_QUANTIZE_RANK0 = True


def _has_lowrank(lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor]) -> bool:
    return lora_down is not None and lora_up is not None and lora_down.shape[0] > 0

#: The modes whose activations are FP8 per token (:func:`quantize_fp8_rows`).
FP8_ACTS = ("fp8", "fp8w")
#: The modes whose quantizer runs outside the op when compiled (:func:`svdq_linear`).
SPLIT_ACTS = ("fp8w",)


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """What a backend is asked to compute (used by :attr:`Backend.supports`)."""

    device: torch.device
    dtype: torch.dtype
    precision: str
    act: str
    rows: int
    in_features: int
    out_features: int
    rank: int
    has_bias: bool
    act_shift: float = 0.0
    act_unsigned: bool = False
    #: Per-segment activation handling (empty: ``act_shift``/``act_unsigned`` hold for all of K).
    k_segments: tuple[KSegment, ...] = ()


@dataclasses.dataclass(frozen=True)
class Backend:
    """A compute backend for ``svdquant::linear``.

    Attributes:
        name: Registry key, e.g. ``"reference"`` or ``"cutlass-sm90"``.
        linear: Callable with the signature of :func:`reference_linear` (``k_segments`` is passed
            only for a call whose :attr:`LinearCall.k_segments` is not empty).
        supports: ``supports(call) -> None`` when the backend can run ``call``, else a short
            reason string (shown in the fallback warning). A backend that does not implement
            per-segment activation handling must refuse calls with ``k_segments``.
        priority: Higher wins in automatic selection; the reference has 0.
        linear_fp8: Optional callable with the signature of :func:`reference_linear_fp8`: the
            same layer with its activations already quantized by :func:`quantize_fp8_rows`
            (``svdquant::linear_fp8``, what compiled graphs call for :data:`SPLIT_ACTS`). It may
            return ``None`` for a call it has no such kernel for; then :attr:`linear` runs it.
    """

    name: str
    linear: Callable[..., torch.Tensor]
    supports: Callable[[LinearCall], Optional[str]]
    priority: int = 0
    linear_fp8: Optional[Callable[..., Optional[torch.Tensor]]] = None


_REGISTRY: dict[str, Backend] = {}
_WARNED: set[tuple[str, str]] = set()
_REGISTRY_VERSION = [0]  # bumped on every (un)registration: keys the ``auto`` mode's cache
_PLUGINS_LOADED = [False]

#: Entry-point group of backend plugins: each entry is a callable that registers its backend(s)
#: (``svdq_kernels`` declares ``cutlass-sm90 = svdq_kernels.registry:register``). They are loaded
#: on the first call with a GPU tensor, so ``from_pretrained`` + ``model(x)`` on an H100 finds the
#: kernels without an ``import svdq_kernels``; CPU-only use never imports them.
PLUGIN_GROUP = "svdquant.backends"


def load_plugins() -> list[str]:
    """Load the :data:`PLUGIN_GROUP` entry points once per process; returns the names loaded.
    One that fails to import or register is skipped with a warning naming it and the reason."""
    if _PLUGINS_LOADED[0]:
        return []
    _PLUGINS_LOADED[0] = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()()
            loaded.append(ep.name)
        except Exception as exc:  # a broken plugin must not break the reference path
            _warn_once(("plugin", ep.name), f"svdquant backend plugin {ep.name!r} ({ep.value}) failed to load: "
                       f"{type(exc).__name__}: {exc}")
    return loaded


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend to the registry (``replace=True`` to overwrite one of the same name)."""
    if backend.name in _REGISTRY and not replace:
        raise BackendError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    _REGISTRY_VERSION[0] += 1


def unregister_backend(name: str) -> None:
    """Remove a backend (the reference cannot be removed)."""
    if name == "reference":
        raise BackendError("the reference backend cannot be unregistered")
    _REGISTRY.pop(name, None)
    _REGISTRY_VERSION[0] += 1


def get_backend(name: str) -> Backend:
    """Look a backend up by name; raises :class:`BackendError` naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BackendError(f"unknown backend {name!r} (registered: {known})") from None


def available_backends() -> list[str]:
    """Names of registered backends, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def _warn_once(key: tuple[str, str], message: str) -> None:
    """Warn once per ``key`` per process — counting only warnings the caller's filters let
    through: one silenced by ``catch_warnings`` / ``simplefilter("ignore")`` is shown next time."""
    if key in _WARNED:
        return
    with warnings.catch_warnings(record=True) as caught:  # the caller's filters apply; "error" raises
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    if caught:
        _WARNED.add(key)
        for w in caught:  # to the caller's handlers (stderr, pytest.warns, record=True lists)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def select_backend(call: LinearCall, requested: str = "auto") -> Backend:
    """Pick the backend that runs ``call``.

    Args:
        call: Description of the computation.
        requested: ``"auto"`` or a backend name. The environment variable ``SVDQ_BACKEND``
            overrides it when set.

    Returns:
        The chosen backend; the reference when nothing better accepts the call (with one
        warning when a named backend was refused, or when a CUDA tensor has no kernel). A
        k-segmented call that a backend refuses but whose segments it accepts as plain calls gets
        that backend run once per segment (:func:`per_segment`, named
        ``"<backend> per segment"``).
    """
    requested = os.environ.get("SVDQ_BACKEND", requested) or "auto"
    if call.device.type == "cuda":
        load_plugins()
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.supports(call)
        if reason is None:
            return backend
        if call.k_segments and requested != "reference" and per_segment_refusal(backend, call) is None:
            return per_segment(backend)
        _warn_once(
            (requested, reason),
            f"svdquant backend {requested!r} cannot run this layer ({reason}); "
            "using the reference backend",
        )
        return _REGISTRY["reference"]
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if backend.name == "reference":
            continue
        if backend.supports(call) is None:
            return backend
        if call.k_segments and per_segment_refusal(backend, call) is None:
            return per_segment(backend)
    if call.device.type == "cuda":
        _warn_once(
            ("auto", "cuda"),
            "no svdquant GPU kernel accepts this layer on this device "
            "(the fast path needs a Hopper GPU and the installed svdquant package's kernels: "
            "pip install 'svdquant[kernels]', or import svdq_kernels); using the slow reference backend",
        )
    return _REGISTRY["reference"]


def _segment_calls(call: LinearCall) -> tuple[LinearCall, ...]:
    """The plain calls, one per segment, that compute a k-segmented ``call`` (the bias on the first)."""
    return tuple(
        dataclasses.replace(call, in_features=seg.size, act_shift=seg.act_shift, act_unsigned=seg.act_unsigned,
                            has_bias=call.has_bias and i == 0, k_segments=())
        for i, seg in enumerate(call.k_segments)
    )


def per_segment_refusal(backend: Backend, call: LinearCall) -> Optional[str]:
    """``None`` when ``backend`` can run the k-segmented ``call`` as one plain call per segment
    (:func:`per_segment`), else why not: no segments, an FP8 mode without pre-quantized activations
    (only :data:`SPLIT_ACTS` with a :attr:`Backend.linear_fp8`: the per-token scale spans the whole
    row), or a segment the backend refuses."""
    if not call.k_segments:
        return "the layer has no k_segments"
    if call.act in FP8_ACTS and (call.act not in SPLIT_ACTS or backend.linear_fp8 is None):
        return (f"activation mode {call.act!r} quantizes the whole row: per segment it needs pre-quantized "
                "activations (linear_fp8)")
    for i, seg_call in enumerate(_segment_calls(call)):
        reason = backend.supports(seg_call)
        if reason is not None:
            return f"segment {i}: {reason}"
    return None


_PER_SEGMENT: dict[str, tuple[Backend, Backend]] = {}


def per_segment(backend: Backend) -> Backend:
    """``backend`` running a k-segmented call as one plain call per segment, named
    ``"<name> per segment"`` (made once per registered backend; :mod:`svdq_format.segmented`).

    FP8 modes: the whole row is quantized once, unshifted (:func:`quantize_fp8_rows`; in a compiled
    graph, by the graph before ``svdquant::linear_fp8``) and each segment gets its columns of the
    codes through ``backend.linear_fp8``, with its shift (which that entry adds to its bias,
    :func:`fp8_bias`); a segment for which that returns ``None`` runs :func:`reference_linear_fp8`."""
    hit = _PER_SEGMENT.get(backend.name)
    if hit is not None and hit[0] is backend:
        return hit[1]

    def linear_fp8(*args: Any) -> torch.Tensor:
        y = backend.linear_fp8(*args) if backend.linear_fp8 is not None else None
        return y if y is not None else reference_linear_fp8(*args)

    def run_fp8(x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
                act_shift=0.0, act_unsigned=False, *, k_segments):
        return segmented.run_segments_fp8(linear_fp8, x, q, a, qweight, wscales, wtscale, smooth, lora_down,
                                          lora_up, bias, lora_scales, precision, act, k_segments=k_segments)

    def run(x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
            act_shift=0.0, act_unsigned=False, *, k_segments):
        if act in FP8_ACTS:
            k = x.shape[-1]
            q, a = fp8_activations(x.reshape(-1, k).float(), smooth)  # unshifted (fp8_bias)
            return run_fp8(x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
                           precision, act, k_segments=k_segments)
        return segmented.run_segments(backend.linear, x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias,
                                      lora_scales, precision, act, k_segments=k_segments)

    wrapped = Backend(backend.name + " per segment", run, lambda call: per_segment_refusal(backend, call),
                      backend.priority, linear_fp8=run_fp8)
    _PER_SEGMENT[backend.name] = (backend, wrapped)
    return wrapped


#: The FP8 activation modes the ``auto`` execution mode tries, fastest first, per weight precision.
AUTO_FAST_ACTS: dict[str, tuple[str, ...]] = {"int4": ("fp8w", "fp8"), "nvfp4": ("fp8",)}


def auto_act(
    device: torch.device, dtype: torch.dtype, precision: str, in_features: int, out_features: int, rank: int,
    has_bias: bool, act_shift: float, act_unsigned: bool, backend: str,
    k_segments: Sequence[KSegment | tuple[int, float, bool]] = (),
) -> str:
    """The activation mode of a W4A4 layer whose execution mode is ``"auto"``.

    The fastest FP8 mode (:data:`AUTO_FAST_ACTS`: ``fast8``'s ``"fp8w"``, then ``fast``'s
    ``"fp8"``) that a kernel backend runs for this layer on ``device`` — their outputs are no worse
    than the exact W4A4 math's on the fidelity layers (docs/benchmarks.md) and much faster on
    Hopper (a k-segmented layer's too, when the backend runs it one plain call per segment:
    :mod:`svdq_format.segmented`); else the exact W4A4 math (``precision``), which the reference
    backend runs anywhere.
    A layer forced onto the reference (``backend="reference"`` or ``SVDQ_BACKEND=reference``)
    therefore stays exact. Constant for ``torch.compile`` (evaluated once while tracing): a traced
    caller passes ``k_segments`` as ``(size, act_shift, act_unsigned)`` tuples, which dynamo can hand
    to a constant function (it cannot rebuild a frozen dataclass instance for it). No backend's
    choice reads ``act_shift``: :meth:`svdq_format.SVDQLinear.act_for` passes 0.0 (dynamo may hold a
    layer's shift as a symbolic float, which a constant function cannot take).
    """
    segments = tuple(seg if isinstance(seg, KSegment) else KSegment(*seg) for seg in k_segments)
    return _auto_act(device, dtype, precision, in_features, out_features, rank, has_bias, act_shift, act_unsigned,
                     segments, os.environ.get("SVDQ_BACKEND", backend) or "auto",
                     os.environ.get("SVDQ_DISABLE_KERNELS", ""), _REGISTRY_VERSION[0])


# What ``torch.compiler.assume_constant_result`` does (dynamo calls the function while tracing and
# uses its result as a constant), without importing torch._dynamo (and with it triton) whenever
# svdq_format is imported; tests/test_auto_mode.py checks that dynamo honours it (fullgraph).
auto_act._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4096)
def _auto_act(
    device: torch.device, dtype: torch.dtype, precision: str, in_features: int, out_features: int, rank: int,
    has_bias: bool, act_shift: float, act_unsigned: bool, k_segments: tuple[KSegment, ...], requested: str,
    _disabled: str, _version: int,
) -> str:
    if requested == "reference":
        return precision
    if device.type == "cuda":
        load_plugins()  # (registering bumps the version: the next call re-decides; this one sees them too)
    if requested == "auto":
        candidates = [b for b in _REGISTRY.values() if b.name != "reference"]
    else:
        candidates = [_REGISTRY[requested]] if requested in _REGISTRY else []
    for act in AUTO_FAST_ACTS.get(precision, ()):
        call = LinearCall(device=device, dtype=dtype, precision=precision, act=act, rows=1, in_features=in_features,
                          out_features=out_features, rank=rank, has_bias=has_bias, act_shift=act_shift,
                          act_unsigned=act_unsigned, k_segments=k_segments)
        if any(b.supports(call) is None or (k_segments and per_segment_refusal(b, call) is None) for b in candidates):
            return act
    return precision


# --------------------------------------------------------------------------- reference


def _weight_values(qweight: torch.Tensor, precision: str) -> torch.Tensor:
    """Code values of the stored residual as float32 ``[N, K]`` (integers or E2M1 values)."""
    nibbles = packing.unpack_nibbles(qweight)
    if precision == "int4":
        return packing.nibbles_to_int4(nibbles).float()
    return packing.e2m1_decode(nibbles)


def reference_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
    *,
    k_segments: tuple[KSegment, ...] = (),
) -> torch.Tensor:
    """The normative forward of one SVDQuant linear (docs/format.md §6), in plain torch.

    Args:
        x: Input ``[..., K]`` in the compute dtype.
        qweight: Packed residual codes, uint8 ``[N, K/2]``.
        wscales: Residual group scales ``[N, K/g]`` (16-bit for int4, e4m3 for nvfp4).
        wtscale: nvfp4 tensor scale (float32 scalar), ``None`` for int4.
        smooth: Smoothing vector ``s`` ``[K]``.
        lora_down: Low-rank down projection on the raw input ``[r, K]`` or ``None``.
        lora_up: Low-rank up projection ``[N, r]`` or ``None``.
        bias: ``[N]`` or ``None``.
        lora_scales: Optional per-rank multipliers ``[r]`` of the low-rank branch (runtime LoRA
            strengths); ``None`` means all ones.
        precision: ``"int4"`` or ``"nvfp4"`` (of the stored residual).
        act: Activation handling, one of :data:`ACT_MODES`.
        act_shift: Added to ``x`` before smoothing on the 4-bit branch only:
            ``x̂ = (x + act_shift) / s`` (W4A4 ``int4`` / ``nvfp4``). The FP8 modes
            (:data:`FP8_ACTS`) quantize the unshifted ``x · (1/s)`` and add the shift's exact
            contribution to the bias instead (:func:`fp8_bias`): the same function up to the
            activation rounding, with signed activations.
        act_unsigned: int4 activations with unsigned codes 0..15 (see
            :func:`svdq_format.packing.quantize_activations`); ignored by the FP8 modes' math.
        k_segments: Per-segment ``act_shift``/``act_unsigned`` (docs/format.md §7.4; then the two
            arguments above are 0 / false); for nvfp4, ``wtscale`` holds one scale per segment.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    if act in FP8_ACTS:  # unshifted: the shift's contribution is in the bias (fp8_bias)
        q, a = quantize_fp8_rows(fp8_smoothed(xf, smooth_reciprocal(smooth)))
        return reference_linear_fp8(x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias,
                                    lora_scales, precision, act, act_shift, act_unsigned, k_segments=k_segments)
    xs = smoothed(xf, smooth, shift_vector(k, act_shift, k_segments, device=x.device))
    n = qweight.shape[0]
    wv = _weight_values(qweight, precision)
    g = packing.GROUP_SIZES[precision]
    ws = wscales.float()
    if act in ("int4", "nvfp4"):
        if act != precision:
            raise BackendError(f"activation mode {act!r} does not match weight precision {precision!r}")
        segments = k_segments or (KSegment(k, act_shift, act_unsigned),)
        tscales = None if wtscale is None else wtscale.float().reshape(-1)
        y = torch.zeros(xf.shape[0], n, dtype=torch.float32, device=x.device)
        lo = 0
        for i, seg in enumerate(segments):
            # One partial sum per segment (one for a plain layer), scaled by its nvfp4 tensor scale.
            ys = y if tscales is None or len(segments) == 1 else torch.zeros_like(y)
            av, asc = packing.quantize_activations(xs[:, lo : lo + seg.size], act, unsigned=seg.act_unsigned)
            # Integer (int4) or quarter-integer (E2M1) products summed over one group are exact in
            # fp32; scales are applied per group and groups are summed in order.
            for j in range(seg.size // g):
                c = lo + j * g
                part = av[:, j * g : (j + 1) * g] @ wv[:, c : c + g].T
                ys += part * (asc[:, j : j + 1] * ws[:, c // g].unsqueeze(0))
            if tscales is not None:
                if ys is y:
                    y *= tscales[i]
                else:
                    y += ys * tscales[i]
            lo += seg.size
    elif act == "none":
        y = xs @ _dense_weight(wv, wscales, wtscale, precision, act, k_segments).T
    else:
        raise BackendError(f"unknown activation mode {act!r} (expected one of {ACT_MODES})")
    return _finish(y, xf, x, lora_down, lora_up, bias, lora_scales)


def shift_vector(
    k: int, act_shift: float, k_segments: tuple[KSegment, ...] = (), *, device: torch.device | None = None,
) -> float | torch.Tensor:
    """The 4-bit branch's input shift: ``act_shift`` (a number) for a plain layer, or the
    per-channel float32 vector ``[K]`` of a layer with ``k_segments``."""
    if not k_segments:
        return act_shift
    if sum(seg.size for seg in k_segments) != k:
        raise BackendError(f"k_segments cover {sum(seg.size for seg in k_segments)} input channels, not {k}")
    return torch.cat([torch.full((seg.size,), float(seg.act_shift), device=device) for seg in k_segments])


def smoothed(xf: torch.Tensor, smooth: torch.Tensor, act_shift: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``x̂ = (x + act_shift) / s`` in float32 (the 4-bit branch's input); ``act_shift`` is a number
    or a per-channel vector (:func:`shift_vector`)."""
    if isinstance(act_shift, torch.Tensor):
        return (xf + act_shift) / smooth.float()
    return (xf + act_shift) / smooth.float() if act_shift else xf / smooth.float()


_RECIPROCALS: TensorCache[torch.Tensor] = TensorCache()


def smooth_reciprocal(smooth: torch.Tensor) -> torch.Tensor:
    """``1 / s`` in float32 (correctly rounded), the ``fast``/``fast8`` quantizer's smoothing factor.

    Made once per smoothing tensor and version (:class:`~svdq_format.tensor_cache.TensorCache`), so
    an eager layer pays no division per call; a tensor that requires grad or is not a plain tensor
    (a tracer's) gets it computed afresh.
    """
    if type(smooth) is not torch.Tensor or smooth.requires_grad:
        return 1.0 / smooth.float()
    return _RECIPROCALS.get((smooth,), lambda: (1.0 / smooth.float()).contiguous())


def fp8_smoothed(xf: torch.Tensor, smooth_rcp: torch.Tensor, act_shift: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``(x + act_shift) · (1/s)`` in float32 — a multiplication by :func:`smooth_reciprocal` where
    :func:`smoothed` (``exact``, W4A16) divides by ``s``. The ``fast``/``fast8`` modes' smoothed
    input is ``x · (1/s)``, without a shift (docs/format.md §6, execution modes; the shift is in
    :func:`fp8_bias`)."""
    if isinstance(act_shift, torch.Tensor) or act_shift:
        return (xf + act_shift) * smooth_rcp
    return xf * smooth_rcp


def fp8_activations(
    xf: torch.Tensor, smooth: torch.Tensor, act_shift: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fast``/``fast8`` activation quantizer of float32 rows ``[M, K]``:
    :func:`quantize_fp8_rows` of :func:`fp8_smoothed`. The modes call it without ``act_shift``
    (a number or :func:`shift_vector`: for measurements of the shifted quantizer only)."""
    return quantize_fp8_rows(fp8_smoothed(xf, smooth_reciprocal(smooth), act_shift))


def fp8_one_signed(act_shift: float, act_unsigned: bool) -> bool:
    """Whether an FP8-activation call's activations are one-signed: ``act_unsigned`` without a shift
    (e.g. a ReLU-fed layer). A layer whose unsigned codes come from its ``act_shift`` (a GELU) is
    quantized unshifted in the FP8 modes (:func:`fp8_bias`), so its FP8 activations are signed."""
    return bool(act_unsigned) and not act_shift


_SHIFT_BIASES: TensorCache[torch.Tensor] = TensorCache()
#: Output rows per step of :func:`fp8_bias`'s product (bounds its temporaries: ~12 bytes per weight).
_SHIFT_BIAS_ROWS = 256


def _shift_bias(
    qweight: torch.Tensor, wscales: torch.Tensor, wtscale: Optional[torch.Tensor], smooth: torch.Tensor,
    bias: Optional[torch.Tensor], precision: str, act: str, shift: float | torch.Tensor,
    k_segments: tuple[KSegment, ...], dtype: torch.dtype,
) -> torch.Tensor:
    n, k = qweight.shape[0], smooth.shape[0]
    rcp = smooth_reciprocal(smooth).double()
    sv = (shift.double() if isinstance(shift, torch.Tensor)
          else torch.full((k,), float(shift), dtype=torch.float64, device=rcp.device))
    v = torch.where(sv == 0, 0.0, sv * rcp)  # a segment without shift adds nothing, whatever its 1/s
    corr = torch.empty(n, dtype=torch.float64, device=qweight.device)
    with torch.no_grad():
        for lo in range(0, n, _SHIFT_BIAS_ROWS):  # the weights' values, a block of rows at a time, in float64
            hi = min(lo + _SHIFT_BIAS_ROWS, n)
            w = _dense_weight(_weight_values(qweight[lo:hi], precision), wscales[lo:hi], wtscale, precision, act,
                              k_segments)
            corr[lo:hi] = w.double() @ v
    return (corr if bias is None else bias.double() + corr).to(dtype)


def fp8_bias(
    qweight: torch.Tensor, wscales: torch.Tensor, wtscale: Optional[torch.Tensor], smooth: torch.Tensor,
    bias: Optional[torch.Tensor], precision: str, act: str, act_shift: float = 0.0, *,
    k_segments: tuple[KSegment, ...] = (), dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """The bias of an FP8-activation call (``act`` in :data:`FP8_ACTS`): the layer's ``bias`` when it
    has no shift, else ``b' = bias + Σ_k shift_k · fp32(1/s_k) · W[n, k]`` — the shift's exact
    contribution to the 4-bit branch, which the FP8 modes quantize unshifted (``x · (1/s)``): an
    e4m3 rounding of ``x`` instead of ``x + shift`` (finer, and signed activations, on which
    Hopper's FP8 accumulation keeps its accuracy).

    ``W`` are the weight values the mode's GEMM multiplies (:func:`reference_linear_fp8`: for
    ``fp8w`` the e4m3-rounded weights of :func:`svdq_format.packing.fp8_weight_values` over the row's
    power of two; for ``fp8`` ``code × scale``; nvfp4's tensor scale(s) applied). The product is
    summed in float64 and ``b'`` rounded once to the bias's dtype (``dtype`` when the layer has no
    bias), which is what the reference adds and the kernels read — so they agree bit for bit.

    Made once per weight version, bias, shift, mode and dtype
    (:class:`~svdq_format.tensor_cache.TensorCache`: remade when a tensor changes, dropped when one
    is freed, a CUDA entry made outside CUDA graphs' pool); tensors that require grad or are not
    plain tensors (a tracer's) get it computed afresh.

    Args:
        qweight, wscales, wtscale, smooth, bias, precision, act: The layer's (as
            :func:`reference_linear`).
        act_shift: A plain layer's shift (0 with ``k_segments``).
        k_segments: Per-segment shifts (and nvfp4 tensor scales) of a k-segmented layer.
        dtype: The dtype of ``b'`` when ``bias`` is ``None`` (the compute dtype).

    Returns:
        ``bias`` itself when no channel is shifted, else ``b'`` ``[N]``.
    """
    if act not in FP8_ACTS:
        raise BackendError(f"fp8_bias is for the FP8 activation modes {FP8_ACTS}, not {act!r}")
    segments = tuple(k_segments)
    if not (any(seg.act_shift for seg in segments) if segments else act_shift):
        return bias
    out_dtype = bias.dtype if bias is not None else dtype
    keys = (qweight, wscales, smooth) + ((wtscale,) if wtscale is not None else ()) + (
        (bias,) if bias is not None else ())

    def make() -> torch.Tensor:
        shift = shift_vector(smooth.shape[0], act_shift, segments, device=smooth.device)
        return _shift_bias(qweight, wscales, wtscale, smooth, bias, precision, act, shift, segments, out_dtype)

    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.requires_grad for t in keys):
        return make()
    variant = (act, precision, float(act_shift), tuple((seg.size, float(seg.act_shift)) for seg in segments),
               out_dtype)
    return _SHIFT_BIASES.get(keys, make, variant=variant)


def quantize_fp8_rows(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fast``/``fast8`` activation quantizer: float8_e4m3fn per token, ``a = absmax / 448``,
    ``q = e4m3(x̂ · (1/a))`` (one correctly rounded reciprocal per row, then a multiplication per
    element — what the kernels compute; docs/format.md §6).

    Plain torch (so ``torch.compile`` can fuse it into the op that produces ``x``; see
    :func:`svdq_linear`). A row with no finite positive absmax (all zeros, or a NaN/inf) gets
    codes 0 and keeps its ``a`` (0, NaN or inf), so the GEMM's ``acc · a`` is 0 or NaN as the
    math says.

    Args:
        xs: Smoothed activations ``[M, K]`` (float32; :func:`fp8_smoothed`).

    Returns:
        ``(q [M, K] float8_e4m3fn, a [M] float32)`` with ``x̂ ≈ q · a`` per row.
    """
    a = xs.abs().amax(dim=-1, keepdim=True) / packing.FP8_E4M3_MAX
    ok = (a > 0) & torch.isfinite(a)
    ra = 1.0 / torch.where(ok, a, 1.0)
    q = packing.round_to_e4m3(torch.where(ok, xs * ra, 0.0))
    return q, a.squeeze(-1).float()


def _dense_weight(
    wv: torch.Tensor, wscales: torch.Tensor, wtscale: Optional[torch.Tensor], precision: str, act: str,
    k_segments: tuple[KSegment, ...] = (),
) -> torch.Tensor:
    """The float32 ``[N, K]`` weight the non-W4A4 modes multiply by (``fp8w``: rounded to e4m3)."""
    n, k = wv.shape
    g = packing.GROUP_SIZES[precision]
    if act == "fp8w":
        if precision != "int4":
            raise BackendError(f"activation mode 'fp8w' (fast8) needs int4 weights, not {precision!r}")
        pw = packing.fp8_weight_row_scales(wv, wscales, group_size=g)
        w = packing.fp8_weight_values(wv, packing.fp8_weight_scales(wscales, pw), group_size=g) / pw.unsqueeze(1)
    else:
        w = (packing.group_view(wv, g) * wscales.float().unsqueeze(-1)).reshape(n, k)
    if wtscale is not None and k_segments:  # one tensor scale per segment of the columns
        sizes = torch.tensor([seg.size for seg in k_segments], device=w.device)
        w = w * wtscale.float().reshape(-1).repeat_interleave(sizes).unsqueeze(0)
    elif wtscale is not None:
        w = w * wtscale.float()
    return w


def _finish(
    y: torch.Tensor, xf: torch.Tensor, x: torch.Tensor, lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor],
) -> torch.Tensor:
    """Add the low-rank branch (on the raw input) and the bias; cast and reshape like ``x``."""
    if lora_down is not None and lora_up is not None and lora_down.shape[0] > 0:
        lr = xf @ lora_down.float().T
        if lora_scales is not None:
            lr = lr * lora_scales.float()
        y = y + lr @ lora_up.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def reference_linear_fp8(
    x: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
    *,
    k_segments: tuple[KSegment, ...] = (),
) -> torch.Tensor:
    """:func:`reference_linear` for ``act`` in :data:`FP8_ACTS` with the activations already
    quantized: ``q``, ``a`` from :func:`quantize_fp8_rows` of ``x``'s smoothed, unshifted rows
    ``x · (1/s)`` (``[M, K]``, ``[M]``; :func:`fp8_activations`). ``x`` still feeds the low-rank
    branch; ``act_shift`` / ``k_segments``' shifts enter through the bias (:func:`fp8_bias`). Equal
    to :func:`reference_linear` bit for bit.
    """
    if act not in FP8_ACTS:
        raise BackendError(f"pre-quantized activations are FP8 ({FP8_ACTS}), not {act!r}")
    k = x.shape[-1]
    bias = fp8_bias(qweight, wscales, wtscale, smooth, bias, precision, act, act_shift, k_segments=k_segments,
                    dtype=x.dtype)
    w = _dense_weight(_weight_values(qweight, precision), wscales, wtscale, precision, act, k_segments)
    y = (q.float() @ w.T) * a.float().unsqueeze(-1)
    return _finish(y, x.reshape(q.shape[0], k).float(), x, lora_down, lora_up, bias, lora_scales)


def _reference_supports(call: LinearCall) -> Optional[str]:
    return None


register_backend(Backend("reference", reference_linear, _reference_supports, priority=0,
                         linear_fp8=reference_linear_fp8))


# --------------------------------------------------------------------------- custom op


def _run_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float,
    act_unsigned: bool,
    backend: str,
    seg_sizes: Optional[list[int]] = None,
    seg_shifts: Optional[list[float]] = None,
    seg_unsigned: Optional[list[bool]] = None,
) -> torch.Tensor:
    """What ``svdquant::linear`` does: pick the backend for the call and run it (``seg_*``: the
    layer's ``k_segments`` as three lists, empty for a plain layer)."""
    segments = _segments(seg_sizes, seg_shifts, seg_unsigned)
    chosen = select_backend(_call(x, qweight, lora_down, bias, precision, act, act_shift, act_unsigned, segments),
                            backend)
    extra = {"k_segments": segments} if segments else {}
    return chosen.linear(
        x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision,
        act, act_shift, act_unsigned, **extra,
    )


def _segments(
    sizes: Optional[list[int]], shifts: Optional[list[float]], unsigned: Optional[list[bool]],
) -> tuple[KSegment, ...]:
    if not sizes:
        return ()
    if shifts is None or unsigned is None or not len(sizes) == len(shifts) == len(unsigned):
        raise BackendError("seg_sizes, seg_shifts and seg_unsigned must be given together, of one length")
    return tuple(KSegment(int(n), float(a), bool(u)) for n, a, u in zip(sizes, shifts, unsigned))


def _segment_lists(
    k_segments: tuple[KSegment, ...],
) -> tuple[Optional[list[int]], Optional[list[float]], Optional[list[bool]]]:
    if not k_segments:
        return None, None, None
    return ([seg.size for seg in k_segments], [float(seg.act_shift) for seg in k_segments],
            [bool(seg.act_unsigned) for seg in k_segments])


_linear_op = torch.library.custom_op("svdquant::linear", _run_linear, mutates_args=())


def _plain_eager(x: torch.Tensor) -> bool:
    """An ordinary eager call: no compiler or tracer (dynamo, jit), no tensor subclass or
    functorch wrapper, no torch-function / dispatch mode, no autograd, a CPU or CUDA tensor. Such
    a call skips the op's torch.library dispatch (~13 µs of host time per layer on the CPU
    machine, which an eager model pays ~500 times a step) and runs :func:`_run_linear` directly —
    the same function the op runs."""
    return (
        type(x) is torch.Tensor
        and x.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and not torch._C._get_tracing_state()  # torch.jit.trace records the op
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch._C._is_torch_function_mode_enabled()
        and _python_dispatch._get_current_dispatch_mode() is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def _call(
    x: torch.Tensor, qweight: torch.Tensor, lora_down: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    precision: str, act: str, act_shift: float, act_unsigned: bool, k_segments: tuple[KSegment, ...] = (),
) -> LinearCall:
    return LinearCall(
        device=x.device,
        dtype=x.dtype,
        precision=precision,
        act=act,
        rows=x.numel() // max(x.shape[-1], 1),
        in_features=x.shape[-1],
        out_features=qweight.shape[0],
        rank=0 if lora_down is None else lora_down.shape[0],
        has_bias=bias is not None,
        act_shift=act_shift,
        act_unsigned=act_unsigned,
        k_segments=k_segments,
    )


@_linear_op.register_fake
def _linear_fake(
    x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
    act_shift, act_unsigned, backend, seg_sizes=None, seg_shifts=None, seg_unsigned=None,
):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("svdquant::linear_fp8", mutates_args=())
def _linear_fp8_op(
    x: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float,
    act_unsigned: bool,
    backend: str,
    seg_sizes: Optional[list[int]] = None,
    seg_shifts: Optional[list[float]] = None,
    seg_unsigned: Optional[list[bool]] = None,
) -> torch.Tensor:
    """``svdquant::linear`` with the FP8 activations given (``q``, ``a`` of
    :func:`quantize_fp8_rows`); a backend without :attr:`Backend.linear_fp8` recomputes them.

    A layer without a low-rank branch may pass an empty stand-in for ``x`` (``[..., 0]``, its
    leading shape and dtype; :func:`svdq_linear` in a compiled graph does): the codes are then all
    the op reads of the input."""
    segments = _segments(seg_sizes, seg_shifts, seg_unsigned)
    call = _call(x, qweight, lora_down, bias, precision, act, act_shift, act_unsigned, segments)
    stand_in = x.shape[-1] == 0 and q.shape[-1] > 0
    if stand_in:
        if _has_lowrank(lora_down, lora_up) or segments:
            raise BackendError("svdquant::linear_fp8: an empty stand-in for x needs a layer without a low-rank "
                               "branch or k_segments")
        call = dataclasses.replace(call, in_features=q.shape[-1], rows=q.numel() // q.shape[-1])
    chosen = select_backend(call, backend)
    args = (qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act, act_shift,
            act_unsigned)
    extra = {"k_segments": segments} if segments else {}
    if chosen.linear_fp8 is not None:
        y = chosen.linear_fp8(x, q, a, *args, **extra)
        if y is not None:
            return y
    if stand_in:
        raise BackendError(f"svdquant::linear_fp8: backend {chosen.name!r} cannot take pre-quantized activations "
                           "without x")
    return chosen.linear(x, *args, **extra)


@_linear_fp8_op.register_fake
def _linear_fp8_fake(
    x, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
    act_shift, act_unsigned, backend, seg_sizes=None, seg_shifts=None, seg_unsigned=None,
):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("svdquant::smooth_reciprocal", mutates_args=())
def _smooth_reciprocal_op(smooth: torch.Tensor) -> torch.Tensor:
    """:func:`smooth_reciprocal` as a node of a compiled graph: a copy of the cached ``1/s`` (an op
    returns a fresh tensor). Inductor cannot inline it into the quantizer, where it would be a
    division per element again (and an approximate one in Triton)."""
    return smooth_reciprocal(smooth).clone()


@_smooth_reciprocal_op.register_fake
def _smooth_reciprocal_fake(smooth):
    return smooth.new_empty(smooth.shape, dtype=torch.float32)


def graph_fp8_activations(
    xf: torch.Tensor, smooth: torch.Tensor, act_shift: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_activations` as a compiled ``fast8`` graph holds it: ``1/s`` from the
    ``svdquant::smooth_reciprocal`` op (inlined into Inductor's fused quantizer, ``1/s`` would be a
    division per element again), the rest plain torch for Inductor to fuse into ``x``'s producer."""
    return quantize_fp8_rows(fp8_smoothed(xf, torch.ops.svdquant.smooth_reciprocal(smooth), act_shift))


def svdq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    precision: str,
    act: str,
    lora_scales: Optional[torch.Tensor] = None,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
    backend: str = "auto",
    k_segments: tuple[KSegment, ...] = (),
) -> torch.Tensor:
    """Call the ``svdquant::linear`` op (see :func:`reference_linear` for the arguments)."""
    if act not in ACT_MODES:
        raise BackendError(f"unknown activation mode {act!r} (expected one of {ACT_MODES})")
    segs = _segment_lists(tuple(k_segments))
    rank0 = not _has_lowrank(lora_down, lora_up)
    if act in SPLIT_ACTS and torch.compiler.is_compiling() and (
            k_segments or FAST8_PROLOGUE != "fused" or (rank0 and GRAPH_QUANTIZE_RANK0)):
        # Compiled: the activation quantizer is plain torch in the graph, so Inductor fuses it
        # into whatever produces x (a norm, a modulation, a GELU) instead of a separate pass.
        # (SVDQ_FAST8_PROLOGUE=fused: the op quantizes x itself, in the pass that computes x · L2ᵀ —
        # except for a layer without a low-rank branch, which needs nothing of x but its codes: the op
        # then gets an empty stand-in for x, so x itself is never written, only q and a.)
        # Unshifted: a shift's contribution is added to the bias inside the op (fp8_bias).
        q, a = graph_fp8_activations(x.reshape(-1, x.shape[-1]).float(), smooth)
        xin = x.new_empty((*x.shape[:-1], 0)) if rank0 and not k_segments else x
        return torch.ops.svdquant.linear_fp8(
            xin, q, a, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
            precision, act, float(act_shift), bool(act_unsigned), backend, *segs,
        )
    run = _run_linear if _plain_eager(x) else torch.ops.svdquant.linear
    return run(
        x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
        precision, act, float(act_shift), bool(act_unsigned), backend, *segs,
    )
