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
  (scale = absmax / 448), weights exactly as stored;
* ``"fp8w"`` — the Hopper ``fast8`` mode: ``fp8`` activations, and int4 weights rounded to e4m3
  after scaling each row by a power of two (:func:`svdq_format.packing.fp8_weight_values`): the
  math of an FP8 tensor-core GEMM that converts the weights in its mainloop;
* ``"none"`` — W4A16: activations are not quantized.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from . import packing
from .errors import BackendError

__all__ = [
    "ACT_MODES",
    "Backend",
    "LinearCall",
    "register_backend",
    "unregister_backend",
    "get_backend",
    "available_backends",
    "select_backend",
    "reference_linear",
    "svdq_linear",
]

ACT_MODES = ("int4", "nvfp4", "fp8", "fp8w", "none")


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


@dataclasses.dataclass(frozen=True)
class Backend:
    """A compute backend for ``svdquant::linear``.

    Attributes:
        name: Registry key, e.g. ``"reference"`` or ``"cutlass-sm90"``.
        linear: Callable with the signature of :func:`reference_linear`.
        supports: ``supports(call) -> None`` when the backend can run ``call``, else a short
            reason string (shown in the fallback warning).
        priority: Higher wins in automatic selection; the reference has 0.
    """

    name: str
    linear: Callable[..., torch.Tensor]
    supports: Callable[[LinearCall], Optional[str]]
    priority: int = 0


_REGISTRY: dict[str, Backend] = {}
_WARNED: set[tuple[str, str]] = set()


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend to the registry (``replace=True`` to overwrite one of the same name)."""
    if backend.name in _REGISTRY and not replace:
        raise BackendError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend (the reference cannot be removed)."""
    if name == "reference":
        raise BackendError("the reference backend cannot be unregistered")
    _REGISTRY.pop(name, None)


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
        warning when a named backend was refused, or when a CUDA tensor has no kernel).
    """
    requested = os.environ.get("SVDQ_BACKEND", requested) or "auto"
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.supports(call)
        if reason is None:
            return backend
        _warn_once(
            (requested, reason),
            f"svdquant backend {requested!r} cannot run this layer ({reason}); "
            "using the reference backend",
        )
        return _REGISTRY["reference"]
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        if backend.name != "reference" and backend.supports(call) is None:
            return backend
    if call.device.type == "cuda":
        _warn_once(
            ("auto", "cuda"),
            "no svdquant GPU kernel accepts this layer on this device "
            "(import svdq_kernels on a Hopper GPU for the fast path); using the slow "
            "reference backend",
        )
    return _REGISTRY["reference"]


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
            ``x̂ = (x + act_shift) / s``.
        act_unsigned: int4 activations with unsigned codes 0..15 (see
            :func:`svdq_format.packing.quantize_activations`).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    n = qweight.shape[0]
    xf = x.reshape(-1, k).float()
    xs = (xf + act_shift) / smooth.float() if act_shift else xf / smooth.float()
    wv = _weight_values(qweight, precision)
    g = packing.GROUP_SIZES[precision]
    ws = wscales.float()
    if act in ("int4", "nvfp4"):
        if act != precision:
            raise BackendError(f"activation mode {act!r} does not match weight precision {precision!r}")
        av, asc = packing.quantize_activations(xs, act, unsigned=act_unsigned)
        y = torch.zeros(xf.shape[0], n, dtype=torch.float32, device=x.device)
        # Integer (int4) or quarter-integer (E2M1) products summed over one group are exact in
        # fp32; scales are applied per group and groups are summed in order.
        for j in range(k // g):
            part = av[:, j * g : (j + 1) * g] @ wv[:, j * g : (j + 1) * g].T
            y += part * (asc[:, j : j + 1] * ws[:, j].unsqueeze(0))
        if wtscale is not None:
            y *= wtscale.float()
    else:
        if act == "fp8w":
            if precision != "int4":
                raise BackendError(f"activation mode 'fp8w' (fast8) needs int4 weights, not {precision!r}")
            pw = packing.fp8_weight_row_scales(wv, wscales, group_size=g)
            w = packing.fp8_weight_values(wv, packing.fp8_weight_scales(wscales, pw), group_size=g) / pw.unsqueeze(1)
        else:
            w = (packing.group_view(wv, g) * ws.unsqueeze(-1)).reshape(n, k)
        if wtscale is not None:
            w = w * wtscale.float()
        if act in ("fp8", "fp8w"):
            amax = xs.abs().amax(dim=-1, keepdim=True)
            a = amax / packing.FP8_E4M3_MAX
            ok = (a > 0) & torch.isfinite(a)
            q = packing.round_to_e4m3(xs / torch.where(ok, a, 1.0)).float()
            q = torch.where(ok, q, 0.0)
            y = (q @ w.T) * a
        elif act == "none":
            y = xs @ w.T
        else:
            raise BackendError(f"unknown activation mode {act!r} (expected one of {ACT_MODES})")
    if lora_down is not None and lora_up is not None and lora_down.shape[0] > 0:
        lr = xf @ lora_down.float().T
        if lora_scales is not None:
            lr = lr * lora_scales.float()
        y = y + lr @ lora_up.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _reference_supports(call: LinearCall) -> Optional[str]:
    return None


register_backend(Backend("reference", reference_linear, _reference_supports, priority=0))


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("svdquant::linear", mutates_args=())
def _linear_op(
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
) -> torch.Tensor:
    call = LinearCall(
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
    )
    chosen = select_backend(call, backend)
    return chosen.linear(
        x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision,
        act, act_shift, act_unsigned,
    )


@_linear_op.register_fake
def _linear_fake(
    x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales, precision, act,
    act_shift, act_unsigned, backend,
):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


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
) -> torch.Tensor:
    """Call the ``svdquant::linear`` op (see :func:`reference_linear` for the arguments)."""
    if act not in ACT_MODES:
        raise BackendError(f"unknown activation mode {act!r} (expected one of {ACT_MODES})")
    return torch.ops.svdquant.linear(
        x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias, lora_scales,
        precision, act, float(act_shift), bool(act_unsigned), backend,
    )
