"""Runtime LoRA state of a quantized model: attach, strengths, unload.

SVDQuant needs no requantization for a LoRA: its factors are concatenated onto the 16-bit
low-rank branch of each :class:`~svdq_format.linear.SVDQLinear` (which acts on the raw input)::

    lora_down' = cat([L2, A₁, A₂, ...])      [r + r₁ + r₂ ..., K]
    lora_up'   = cat([L1, B₁, B₂, ...], 1)   [N, r + r₁ + r₂ ...]
    lora_scales = [1]*r ++ [s₁·c₁] ++ [s₂·c₂] ...

where ``cᵢ`` are the adapter's per-rank unit scales (``alpha/r`` or ``alpha/√r``) and ``sᵢ``
its strength. The layer's own SVD ranks keep scale 1. Each adapter's rank group is padded with
zero ranks to a multiple of :data:`RANK_MULTIPLE`. A strength change only rewrites
``lora_scales``; unloading puts back the very tensor objects the layer had before (bit-identical).

Plain 16-bit ``nn.Linear`` targets (embedders, final projection, modulation linears left in
16 bits) get a PEFT-style additive branch through a forward hook,
``y += Σᵢ sᵢ · ((x Aᵢᵀ) ⊙ cᵢ) Bᵢᵀ (+ sᵢ·bᵢ)``; their weights are never touched. Whole-parameter
replacements (control LoRAs' norm weights) swap the parameter's tensor and put the original
tensor object back on unload.

This module knows nothing of LoRA *file formats*: :mod:`converters.lora` reads and normalises
files into :class:`LoraAdapter` objects (module name → factors) and calls :func:`plan_lora` /
:func:`attach_lora`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, overload

import torch
from torch import nn

from .errors import LoRAError
from .linear import SVDQLinear

__all__ = [
    "RANK_MULTIPLE",
    "LoraDelta",
    "LayerDelta",
    "LoraAdapter",
    "LoraPlan",
    "plan_lora",
    "attach_lora",
    "set_lora_strengths",
    "set_active_loras",
    "unload_lora",
    "unload_all",
    "list_loras",
    "base_fingerprint",
    "check_plan",
    "compose_plans",
    "original_branches",
]

#: Each adapter's rank group on an SVDQ layer is padded with zero ranks to this multiple.
RANK_MULTIPLE = 16

_STATE_ATTR = "_svdq_lora_state"


# --------------------------------------------------------------------------- data


@dataclass
class LoraDelta:
    """The LoRA of one target module, in canonical form: ``ΔW = B · diag(scales) · A``.

    Args:
        down: ``A`` ``[r, K]`` (float).
        up: ``B`` ``[N, r]`` (float).
        scales: Per-rank unit scales ``[r]`` (``alpha/r`` folded here, not into the factors).
        bias: Optional output bias delta ``[N]`` (PEFT ``lora_B.bias``).
    """

    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraAdapter:
    """One LoRA, normalised: target module names (diffusers names) → :class:`LoraDelta`.

    Args:
        name: Adapter name.
        deltas: Target module name → factors. A name may be a member of a fused SVDQ layer
            (``...attn.to_q`` of a ``to_qkv`` layer with ``fused_from``).
        params: Whole-parameter replacements (``"<module>.weight"`` → tensor), e.g. the norm
            weights of BFL control LoRAs; not scaled by the strength.
        source: Where it came from (shown in messages).
    """

    name: str
    deltas: dict[str, LoraDelta]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""


@dataclass
class LayerDelta:
    """The factors one model layer receives from one adapter (fusion and padding done)."""

    down: torch.Tensor  # [r, K] in the layer dtype
    up: torch.Tensor  # [N, r]
    scales: torch.Tensor  # [r] float32 unit scales (0 on padding ranks)
    bias: Optional[torch.Tensor]  # [N] float32 or None
    # Optional ready-made [own branch ++ this adapter] tensors (from a cache file made for this
    # very base): when this adapter is a layer's only one, they are used as the layer's
    # buffers directly, with no copy.
    full_down: Optional[torch.Tensor] = None
    full_up: Optional[torch.Tensor] = None


@dataclass
class LoraPlan:
    """Where an adapter lands in a model, validated and ready to attach.

    Attributes:
        adapter: The adapter's name.
        layers: Model module name → the factors it receives.
        params: Parameter name → replacement tensor.
        matched: Target module name (as in the LoRA) → model module name it landed in.
        unmatched: Target module names (or parameter names) the model has no place for.
    """

    adapter: str
    layers: dict[str, LayerDelta]
    params: dict[str, torch.Tensor]
    matched: dict[str, str]
    unmatched: list[str]
    source: str = ""

    def summary(self) -> str:
        """One line: how many targets matched and which did not (first few)."""
        text = f"{len(self.matched)} LoRA targets matched {len(self.layers)} layers"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:5]) + (" ..." if len(self.unmatched) > 5 else "")
            text += f"; {len(self.unmatched)} unmatched: {shown}"
        return text


@dataclass
class _AdapterRecord:
    name: str
    layers: dict[str, LayerDelta]
    params: dict[str, torch.Tensor]
    strength: float
    active: bool = True

    @property
    def effective(self) -> float:
        return self.strength if self.active else 0.0


@dataclass
class _LoraState:
    adapters: dict[str, _AdapterRecord] = field(default_factory=dict)
    # SVDQ layer name -> original (lora_down, lora_up, lora_scales, bias) tensor objects
    svdq_originals: dict[str, tuple] = field(default_factory=dict)
    # 16-bit linear name -> forward hook handle
    hooks: dict[str, torch.utils.hooks.RemovableHandle] = field(default_factory=dict)
    # parameter name -> original tensor object
    param_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: Optional[str] = None


@overload
def _state(model: nn.Module, create: Literal[True]) -> _LoraState: ...
@overload
def _state(model: nn.Module, create: bool = False) -> Optional[_LoraState]: ...
def _state(model: nn.Module, create: bool = False) -> Optional[_LoraState]:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = _LoraState()
        model.__dict__[_STATE_ATTR] = st
    return st


@contextlib.contextmanager
def _one_thread():
    """Run the many small memory-bound tensor ops of a LoRA load on one intra-op thread.

    A load issues thousands of short ops (copies, NaN checks); with several OpenMP threads each
    one is a parallel region whose barrier stalls whenever a sibling thread is descheduled, which
    on a busy machine turns a sub-second load into tens of seconds. One thread is as fast for
    memory-bound copies and immune to that. (``torch.set_num_threads`` is process-wide.)
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


# --------------------------------------------------------------------------- planning


def _fused_members(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Member module name → (fused SVDQ layer name, row offset, rows) for fused layers."""
    out: dict[str, tuple[str, int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SVDQLinear) and mod.fused_from:
            parent = name.rpartition(".")[0]
            off = 0
            for member, size in zip(mod.fused_from, mod.split_sizes):
                full = member if "." in member or not parent else f"{parent}.{member}"
                out[full] = (name, off, size)
                off += size
    return out


def _check_delta(where: str, d: LoraDelta, k: int, n: int,
                 deferred: Optional[list[tuple[str, torch.Tensor]]] = None) -> None:
    """Shape/dtype checks now; NaN/inf checks of CUDA tensors go to ``deferred`` (checked
    together by :func:`_check_finite_batch`: one host sync instead of one per tensor)."""
    for label, t in (("lora_A", d.down), ("lora_B", d.up), ("scales", d.scales)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise LoRAError(f"{where}: {label} is not a floating-point tensor")
    if d.down.ndim != 2 or d.up.ndim != 2:
        raise LoRAError(f"{where}: lora_A/lora_B must be 2-D, got {list(d.down.shape)} and {list(d.up.shape)}")
    r = d.down.shape[0]
    if d.up.shape[1] != r:
        raise LoRAError(f"{where}: rank mismatch: lora_A has rank {r}, lora_B has rank {d.up.shape[1]}")
    if tuple(d.scales.shape) != (r,):
        raise LoRAError(f"{where}: scales shape {list(d.scales.shape)}, expected [{r}]")
    if d.down.shape[1] != k or d.up.shape[0] != n:
        raise LoRAError(
            f"{where}: LoRA is {d.up.shape[0]}x{d.down.shape[1]} (out x in), the layer is {n}x{k}"
        )
    if d.bias is not None and tuple(d.bias.shape) != (n,):
        raise LoRAError(f"{where}: lora_B.bias shape {list(d.bias.shape)}, expected [{n}]")
    checks: tuple[tuple[str, Optional[torch.Tensor]], ...] = (
        ("lora_A", d.down), ("lora_B", d.up), ("scales", d.scales), ("bias", d.bias))
    for label, maybe in checks:
        if maybe is None:
            continue
        if deferred is not None and maybe.is_cuda:
            deferred.append((f"{where}: {label}", maybe))
        elif not _all_finite(maybe):
            raise LoRAError(f"{where}: {label} contains NaN or inf")


def _check_finite_batch(items: list[tuple[str, torch.Tensor]]) -> None:
    """NaN/inf check of many CUDA tensors with one host synchronisation.

    ``torch._foreach_norm`` (2-norm, fp32 accumulation) runs a few multi-tensor kernels for all
    of them: NaN and inf propagate into the norm. A tensor it flags is checked exactly
    (:func:`_all_finite`) before the error, since a 2-norm of huge finite values can overflow.
    """
    if not items:
        return
    tensors = [t.to(torch.bfloat16) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t for _, t in items]
    try:
        norms = torch._foreach_norm(tensors, 2)
        flags = torch.stack([n.float() for n in norms]).isfinite()
    except (RuntimeError, AttributeError, TypeError):  # private API: fall back to one op per tensor
        flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if bool(flags.all()):
        return
    for (label, t), ok in zip(items, flags.tolist()):
        if not ok and not _all_finite(t):
            raise LoRAError(f"{label} contains NaN or inf")


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/inf check in one vectorised pass (``aminmax`` propagates NaN; much faster than
    ``isfinite(t).all()`` on 16-bit CPU tensors)."""
    if t.numel() == 0:
        return True
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.bfloat16)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _pad_rank(down: torch.Tensor, up: torch.Tensor, scales: torch.Tensor, multiple: int):
    r = down.shape[0]
    pad = (-r) % multiple
    if pad == 0:
        return down, up, scales
    return (
        torch.cat([down, down.new_zeros(pad, down.shape[1])]),
        torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1),
        torch.cat([scales, scales.new_zeros(pad)]),
    )


def _fuse(members: list[tuple[int, int, LoraDelta]], n: int, k: int) -> LoraDelta:
    """Combine member LoRAs of a fused layer: shared A with stacked B, else block-diagonal B."""
    first = members[0][2]
    shared = all(
        m.down.shape == first.down.shape
        and torch.equal(m.down, first.down)
        and torch.equal(m.scales, first.scales)
        for _, _, m in members[1:]
    )
    dtype = torch.promote_types(first.down.dtype, first.up.dtype)
    bias = None
    if any(m.bias is not None for _, _, m in members):
        bias = torch.zeros(n, dtype=torch.float32)
        for off, size, m in members:
            if m.bias is not None:
                bias[off : off + size] = m.bias.float()
    if shared:
        up = torch.zeros(n, first.rank, dtype=dtype)
        for off, size, m in members:
            up[off : off + size] = m.up
        return LoraDelta(first.down, up, first.scales, bias)
    total = sum(m.rank for _, _, m in members)
    down = torch.empty(total, k, dtype=dtype)
    up = torch.zeros(n, total, dtype=dtype)
    scales = torch.empty(total, dtype=torch.float32)
    r0 = 0
    for off, size, m in members:
        down[r0 : r0 + m.rank] = m.down
        up[off : off + size, r0 : r0 + m.rank] = m.up
        scales[r0 : r0 + m.rank] = m.scales.float()
        r0 += m.rank
    return LoraDelta(down, up, scales, bias)


def _pad_inputs(d: LoraDelta, modules: Mapping[str, nn.Module], fused: Mapping[str, tuple], target: str) -> LoraDelta:
    """diffusers' Flux rule: a ``lora_A`` narrower than the layer input is zero-padded on the
    right (XLabs single-block ``proj_lora`` covers only the attention part of ``proj_out``)."""
    mod = modules.get(fused[target][0]) if target in fused else modules.get(target)
    k = getattr(mod, "in_features", None)
    if k is None or d.down.ndim != 2 or d.down.shape[1] >= k:
        return d
    down = torch.cat([d.down, d.down.new_zeros(d.down.shape[0], k - d.down.shape[1])], dim=1)
    return LoraDelta(down, d.up, d.scales, d.bias)


def plan_lora(model: nn.Module, adapter: LoraAdapter) -> LoraPlan:
    """Resolve and validate an adapter against a model without changing the model.

    Targets land on SVDQ layers (directly, or as a member of a fused layer), on 16-bit
    ``nn.Linear`` modules, or (``params``) on existing parameters of the same shape.

    Raises:
        LoRAError: a factor has the wrong shape/dtype, a rank mismatch, or NaN/inf (the first
            problem found, one line naming the target).
    """
    with _one_thread():
        return _plan_lora(model, adapter)


def _plan_lora(model: nn.Module, adapter: LoraAdapter) -> LoraPlan:
    fused = _fused_members(model)
    modules = dict(model.named_modules())
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    per_fused: dict[str, list[tuple[int, int, LoraDelta]]] = {}
    direct: dict[str, LoraDelta] = {}
    deferred: list[tuple[str, torch.Tensor]] = []
    for target, delta in adapter.deltas.items():
        where = f"{adapter.source or adapter.name}: {target}"
        delta = _pad_inputs(delta, modules, fused, target)
        if target in fused:
            lname, off, size = fused[target]
            layer = modules[lname]
            _check_delta(where, delta, layer.in_features, size, deferred)
            per_fused.setdefault(lname, []).append((off, size, delta))
            matched[target] = lname
            continue
        mod = modules.get(target)
        if isinstance(mod, (SVDQLinear, nn.Linear)):
            _check_delta(where, delta, mod.in_features, mod.out_features, deferred)
            direct[target] = delta
            matched[target] = target
        else:
            unmatched.append(target)
    _check_finite_batch(deferred)
    for lname in per_fused:
        if lname in direct:
            raise LoRAError(
                f"{adapter.source or adapter.name}: {lname}: LoRA targets both the fused layer and its members"
            )
    combined: dict[str, LoraDelta] = dict(direct)
    for lname, members in per_fused.items():
        layer = modules[lname]
        combined[lname] = _fuse(sorted(members, key=lambda t: t[0]), layer.out_features, layer.in_features)
    layers: dict[str, LayerDelta] = {}
    for lname, d in combined.items():
        mod = modules[lname]
        if isinstance(mod, SVDQLinear):
            # may stay views of the (memory-mapped) source: attaching concatenates them into
            # the layer's buffers and re-points the record at those (see _rebuild_svdq)
            down, up, scales = _pad_rank(d.down, d.up, d.scales.float(), RANK_MULTIPLE)
            down, up = down.to(mod.dtype), up.to(mod.dtype)
        else:  # the hook uses them directly: own copies
            dtype = mod.weight.dtype
            down, up, scales = d.down.to(dtype, copy=True), d.up.to(dtype, copy=True), d.scales.float()
        layers[lname] = LayerDelta(
            down=down,
            up=up,
            scales=scales.clone(),
            bias=None if d.bias is None else d.bias.float().clone(),
        )
    params: dict[str, torch.Tensor] = {}
    named_params = dict(model.named_parameters())
    for pname, t in adapter.params.items():
        p = named_params.get(pname)
        if p is None:
            unmatched.append(pname)
            continue
        if tuple(t.shape) != tuple(p.shape):
            raise LoRAError(
                f"{adapter.source or adapter.name}: {pname}: shape {list(t.shape)}, model has {list(p.shape)}"
            )
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise LoRAError(f"{adapter.source or adapter.name}: {pname}: not a finite floating-point tensor")
        params[pname] = t.to(p.dtype)
        matched[pname] = pname
    return LoraPlan(adapter.name, layers, params, matched, sorted(unmatched), adapter.source)


# --------------------------------------------------------------------------- mutation


def _layer_recs(st: _LoraState, name: str) -> list[tuple[_AdapterRecord, LayerDelta]]:
    return [(r, r.layers[name]) for r in st.adapters.values() if name in r.layers]


def _put(layer: SVDQLinear, **tensors: Optional[torch.Tensor]) -> None:
    """Replace registered buffers directly (``Module.__setattr__`` costs ~10 µs a call, and a
    LoRA load makes thousands); names that are not buffers go through ``setattr``."""
    bufs = layer._buffers
    for key, value in tensors.items():
        if key in bufs:
            bufs[key] = value
        else:
            setattr(layer, key, value)


def _restore_svdq(layer: SVDQLinear, name: str, st: _LoraState) -> None:
    orig_down, orig_up, orig_scales, orig_bias = st.svdq_originals.pop(name)
    _put(layer, lora_down=orig_down, lora_up=orig_up, lora_scales=orig_scales, bias=orig_bias)


def _set_scales(layers: list[tuple[str, SVDQLinear]], st: _LoraState) -> None:
    """Rewrite ``lora_scales`` (and a LoRA-shifted bias) of these layers from the adapters' strengths.

    All layers' scale vectors are made by one concatenation per device (a few kernels instead of
    several per layer on a GPU) and handed out as views of it.
    """
    by_dev: dict[torch.device, list[tuple[str, SVDQLinear]]] = {}
    for name, layer in layers:
        by_dev.setdefault(layer.qweight.device, []).append((name, layer))
    for dev, items in by_dev.items():
        plans = []
        max_base = 0
        for name, layer in items:
            _, _, orig_scales, orig_bias = st.svdq_originals[name]
            recs = _layer_recs(st, name)
            assert layer.lora_down is not None
            base_r = layer.lora_down.shape[0] - sum(d.down.shape[0] for _, d in recs)
            if orig_scales is None:
                max_base = max(max_base, base_r)
            plans.append((name, layer, recs, orig_scales, orig_bias, base_r))
        ones = torch.ones(max_base, dtype=torch.float32, device=dev)
        pieces: list[torch.Tensor] = []
        strengths: dict[float, list[int]] = {}  # strength → positions in pieces to multiply
        for _, layer, recs, orig_scales, _, base_r in plans:
            pieces.append(orig_scales.float().to(dev) if orig_scales is not None else ones[:base_r])
            for rec, d in recs:
                if rec.effective != 1.0:
                    strengths.setdefault(rec.effective, []).append(len(pieces))
                pieces.append(d.scales.to(dev))
        for value, where in strengths.items():  # one multi-tensor multiply per strength
            for i, t in zip(where, torch._foreach_mul([pieces[i] for i in where], value)):
                pieces[i] = t
        sizes = [layer.lora_down.shape[0] for _, layer, *_ in plans]  # type: ignore[union-attr]
        for (_, layer, recs, _, orig_bias, _), scales in zip(plans, torch.cat(pieces).split(sizes)):
            if any(d.bias is not None for _, d in recs):
                b = torch.zeros(layer.out_features, dtype=torch.float32, device=dev)
                if orig_bias is not None:
                    b += orig_bias.float()
                for rec, d in recs:
                    if d.bias is not None:
                        b += rec.effective * d.bias.to(dev)
                _put(layer, lora_scales=scales, bias=b.to(layer.dtype))
            else:
                _put(layer, lora_scales=scales, bias=orig_bias)


def _use_ready_made(layer: SVDQLinear, name: str, st: _LoraState, recs: list, base_r: int, r: int) -> bool:
    if len(recs) != 1 or recs[0][1].full_down is None:
        return False
    d = recs[0][1]
    fd, fu = d.full_down, d.full_up
    if fd.shape != (r, layer.in_features) or fu.shape != (layer.out_features, r):
        return False
    if fd.device != layer.qweight.device or fd.dtype != layer.dtype or fu.dtype != layer.dtype:
        return False
    _put(layer, lora_down=fd, lora_up=fu)
    d.down, d.up = fd[base_r:], fu[:, base_r:]
    return True


def _rebuild_all_svdq(modules: Mapping[str, nn.Module], st: _LoraState) -> None:
    """Concatenate ``[own branch, adapter 1, adapter 2 ...]`` for every SVDQ layer with LoRAs.

    A layer whose only adapter comes with ready-made full tensors (a cache file for this base)
    uses them as they are. All other new ``lora_down``/``lora_up`` tensors are views of one
    freshly allocated arena per device: one large allocation instead of ~1000 medium ones
    (fresh CPU memory is page-fault bound), and the previous arena is freed as a whole.
    Adapter records are re-pointed at their slices, so no file mapping is kept alive.
    """
    align = 64
    todo: dict[torch.device, list] = {}
    sizes: dict[torch.device, int] = {}
    layers: list[tuple[str, SVDQLinear]] = []
    for name in st.svdq_originals:
        layer = modules[name]
        assert isinstance(layer, SVDQLinear)
        layers.append((name, layer))
        recs = _layer_recs(st, name)
        orig_down, orig_up = st.svdq_originals[name][:2]
        base_r = 0 if orig_down is None else orig_down.shape[0]
        r = base_r + sum(d.down.shape[0] for _, d in recs)
        if _use_ready_made(layer, name, st, recs, base_r, r):
            continue
        esz = torch.empty((), dtype=layer.dtype).element_size()
        dev = layer.qweight.device
        off = sizes.get(dev, 0)
        off_d = -(-off // align) * align
        off_u = -(-(off_d + r * layer.in_features * esz) // align) * align
        sizes[dev] = off_u + layer.out_features * r * esz
        todo.setdefault(dev, []).append((name, layer, recs, orig_down, orig_up, base_r, r, off_d, off_u, esz))
    for dev, items in todo.items():
        arena = torch.empty(sizes[dev], dtype=torch.uint8, device=dev)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for name, layer, recs, orig_down, orig_up, base_r, r, off_d, off_u, esz in items:
            k, n = layer.in_features, layer.out_features
            down = arena[off_d : off_d + r * k * esz].view(layer.dtype).view(r, k)
            up = arena[off_u : off_u + n * r * esz].view(layer.dtype).view(n, r)
            if base_r:
                dst += [down[:base_r], up[:, :base_r]]
                src += [orig_down, orig_up]
            r0 = base_r
            for _, d in recs:
                rr = d.down.shape[0]
                dst += [down[r0 : r0 + rr], up[:, r0 : r0 + rr]]
                src += [d.down.to(dev), d.up.to(dev)]
                d.down, d.up = dst[-2], dst[-1]  # the record now points at its slice
                r0 += rr
            _put(layer, lora_down=down, lora_up=up)
        if dev.type == "cuda":
            torch._foreach_copy_(dst, src)  # a few multi-tensor kernels for every layer
        else:
            for t, v in zip(dst, src):
                t.copy_(v)
    _set_scales(layers, st)


def _linear_hook(st: _LoraState, name: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        out = output
        for rec in st.adapters.values():
            d = rec.layers.get(name)
            s = rec.effective
            if d is None or s == 0.0:
                continue
            h = (x.to(d.down.dtype) @ d.down.to(x.device).T) * (d.scales.to(x.device) * s)
            out = out + (h.to(d.up.dtype) @ d.up.to(x.device).T).to(out.dtype)
            if d.bias is not None:
                out = out + (s * d.bias.to(x.device)).to(out.dtype)
        return out

    return hook


def _rebuild_params(model: nn.Module, names: Iterable[str], st: _LoraState) -> None:
    named = dict(model.named_parameters())
    for pname in names:
        p = named[pname]
        chosen = None
        for rec in st.adapters.values():
            if pname in rec.params and rec.active:
                chosen = rec.params[pname]
        if chosen is None:
            p.data = st.param_originals.pop(pname)
        else:
            st.param_originals.setdefault(pname, p.data)
            p.data = chosen.to(p.device)


def _refresh(model: nn.Module, st: _LoraState, layer_names: Iterable[str], param_names: Iterable[str],
             *, scales_only: bool = False) -> None:
    with _one_thread():
        _refresh_layers(model, st, layer_names, param_names, scales_only=scales_only)


def _refresh_layers(model: nn.Module, st: _LoraState, layer_names: Iterable[str], param_names: Iterable[str],
                    *, scales_only: bool = False) -> None:
    modules = dict(model.named_modules())
    rescale: list[tuple[str, SVDQLinear]] = []
    for lname in layer_names:
        mod = modules[lname]
        used = any(lname in r.layers for r in st.adapters.values())
        if isinstance(mod, SVDQLinear):
            if used and lname not in st.svdq_originals:
                st.svdq_originals[lname] = (mod.lora_down, mod.lora_up, mod.lora_scales, mod.bias)
                scales_only = False
            elif not used and lname in st.svdq_originals:
                _restore_svdq(mod, lname, st)
            elif used and scales_only:
                rescale.append((lname, mod))
        else:
            if used and lname not in st.hooks:
                st.hooks[lname] = mod.register_forward_hook(_linear_hook(st, lname))
            elif not used and lname in st.hooks:
                st.hooks.pop(lname).remove()
    if not scales_only and st.svdq_originals:
        _rebuild_all_svdq(modules, st)
    elif rescale:
        _set_scales(rescale, st)
    _rebuild_params(model, param_names, st)
    if not st.adapters and not st.svdq_originals and not st.hooks and not st.param_originals:
        fp = st.fingerprint
        model.__dict__.pop(_STATE_ATTR, None)
        if fp is not None:  # keep the (expensive) fingerprint of the unchanged base
            _state(model, create=True).fingerprint = fp


def attach_lora(model: nn.Module, plan: LoraPlan, *, strength: float = 1.0) -> None:
    """Attach a planned adapter (see :func:`plan_lora`) with a strength.

    Raises:
        LoRAError: an adapter of that name is already attached, or the plan is empty.
    """
    st = _state(model, create=True)
    if plan.adapter in st.adapters:
        raise LoRAError(f"adapter {plan.adapter!r} is already loaded; unload it first or pick another name")
    if not plan.layers and not plan.params:
        raise LoRAError(f"{plan.source or plan.adapter}: no LoRA target matched the model ({plan.summary()})")
    st.adapters[plan.adapter] = _AdapterRecord(plan.adapter, plan.layers, plan.params, float(strength))
    _refresh(model, st, plan.layers, plan.params)


def list_loras(model: nn.Module) -> dict[str, float]:
    """Attached adapters → strength (0 for adapters disabled by :func:`set_active_loras`)."""
    st = _state(model)
    return {} if st is None else {n: r.effective for n, r in st.adapters.items()}


def _names(st: _LoraState, adapters: Iterable[str]) -> tuple[set[str], set[str]]:
    layers: set[str] = set()
    params: set[str] = set()
    for n in adapters:
        layers |= set(st.adapters[n].layers)
        params |= set(st.adapters[n].params)
    return layers, params


def _require(st: Optional[_LoraState], names: Iterable[str]) -> _LoraState:
    have = set() if st is None else set(st.adapters)
    missing = sorted(set(names) - have)
    if missing:
        raise LoRAError(f"no adapter named {missing[0]!r} is loaded (loaded: {sorted(have)})")
    assert st is not None
    return st


def set_lora_strengths(model: nn.Module, strengths: Mapping[str, float]) -> None:
    """Change adapters' strengths; only ``lora_scales`` (and LoRA biases) are rewritten."""
    st = _require(_state(model), strengths)
    for n, s in strengths.items():
        s = float(s)
        if s != s or s in (float("inf"), float("-inf")):
            raise LoRAError(f"strength of {n!r} is not finite: {s}")
    for n, s in strengths.items():
        st.adapters[n].strength = float(s)
    layers, params = _names(st, strengths)
    _refresh(model, st, layers, params, scales_only=True)


def set_active_loras(model: nn.Module, names: Iterable[str], strengths: Optional[Iterable[Any]] = None) -> None:
    """diffusers ``set_adapters`` semantics: the listed adapters are active (with strengths,
    default 1), every other attached adapter is disabled (strength 0, still attached)."""
    names = list(names)
    st = _require(_state(model), names)
    given = [None] * len(names) if strengths is None else list(strengths)
    if len(given) != len(names):
        raise LoRAError(f"{len(names)} adapter names but {len(given)} strengths")
    values: list[float] = []
    for n, s in zip(names, given):
        if s is None:
            s = 1.0
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise LoRAError(
                f"strength of {n!r} must be a number, not {type(s).__name__} (per-block weights are not supported)"
            )
        values.append(float(s))
    for rec in st.adapters.values():
        rec.active = rec.name in names
    for n, v in zip(names, values):
        st.adapters[n].strength = v
    layers, params = _names(st, st.adapters)
    _refresh(model, st, layers, params, scales_only=True)


def unload_lora(model: nn.Module, name: str) -> None:
    """Detach one adapter; layers no other adapter uses get their original tensors back."""
    st = _require(_state(model), [name])
    layers, params = _names(st, [name])
    del st.adapters[name]
    _refresh(model, st, layers, params)


def unload_all(model: nn.Module) -> None:
    """Detach every adapter and restore every original tensor object (bit-identical)."""
    st = _state(model)
    if st is None:
        return
    layers, params = _names(st, st.adapters)
    st.adapters.clear()
    _refresh(model, st, layers | set(st.svdq_originals) | set(st.hooks), params | set(st.param_originals))


# --------------------------------------------------------------------------- fingerprint


def original_branches(model: nn.Module) -> dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """``{layer: (lora_down, lora_up)}`` of every SVDQ layer as it is without any LoRA."""
    st = _state(model)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SVDQLinear):
            if st is not None and name in st.svdq_originals:
                out[name] = st.svdq_originals[name][:2]
            else:
                out[name] = (mod.lora_down, mod.lora_up)
    return out


def base_fingerprint(model: nn.Module) -> str:
    """A hash identifying a quantized base: its manifest and original low-rank branches.

    Computed once per model (memoised; the originals are used while LoRAs are attached).
    """
    st = _state(model)
    if st is not None and st.fingerprint is not None:
        return st.fingerprint
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        if not isinstance(mod, SVDQLinear):
            continue
        h.update(json.dumps([name, mod.spec.to_json()], sort_keys=True).encode())
        down, up = mod.lora_down, mod.lora_up
        if st is not None and name in st.svdq_originals:
            down, up = st.svdq_originals[name][:2]
        for t in (down, up):
            if t is not None:
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().data)
    value = h.hexdigest()[:32]
    _state(model, create=True).fingerprint = value
    return value


def check_plan(model: nn.Module, plan: LoraPlan) -> None:
    """Validate a plan (e.g. read from a delta file) against a model before attaching it.

    Raises:
        LoRAError: a layer is missing, of another kind or shape, or a tensor is bad.
    """
    with _one_thread():
        _check_plan(model, plan)


def _check_plan(model: nn.Module, plan: LoraPlan) -> None:
    modules = dict(model.named_modules())
    named_params = dict(model.named_parameters())
    src = plan.source or plan.adapter
    deferred: list[tuple[str, torch.Tensor]] = []
    for lname, d in plan.layers.items():
        mod = modules.get(lname)
        if not isinstance(mod, (SVDQLinear, nn.Linear)):
            raise LoRAError(f"{src}: {lname}: the model has no linear layer of that name")
        _check_delta(f"{src}: {lname}", LoraDelta(d.down, d.up, d.scales, d.bias), mod.in_features, mod.out_features,
                     deferred)
        if isinstance(mod, SVDQLinear):
            d.down, d.up = d.down.to(mod.dtype), d.up.to(mod.dtype)
        else:  # the hook uses them directly: own copies, not views of a file mapping
            dtype = mod.weight.dtype
            d.down, d.up = d.down.to(dtype, copy=True), d.up.to(dtype, copy=True)
            d.full_down = d.full_up = None
        d.scales = d.scales.float().clone()
        d.bias = None if d.bias is None else d.bias.float().clone()
    _check_finite_batch(deferred)
    for pname, t in plan.params.items():
        p = named_params.get(pname)
        if p is None or tuple(p.shape) != tuple(t.shape):
            raise LoRAError(f"{src}: {pname}: the model has no parameter of that name and shape")


def compose_plans(plans: Iterable[LoraPlan], strengths: Iterable[float], *, name: str) -> LoraPlan:
    """Several planned adapters as one (ranks concatenated, strengths folded into the unit
    scales) — what a multi-LoRA delta file stores."""
    plans, strengths = list(plans), [float(s) for s in strengths]
    if len(plans) != len(strengths) or not plans:
        raise LoRAError("compose_plans needs one strength per plan and at least one plan")
    layers: dict[str, list[tuple[LayerDelta, float]]] = {}
    params: dict[str, torch.Tensor] = {}
    matched: dict[str, str] = {}
    unmatched: set[str] = set()
    for plan, s in zip(plans, strengths):
        for lname, d in plan.layers.items():
            layers.setdefault(lname, []).append((d, s))
        params.update(plan.params)
        matched.update(plan.matched)
        unmatched |= set(plan.unmatched)
    out: dict[str, LayerDelta] = {}
    for lname, parts in layers.items():
        bias: Optional[torch.Tensor] = None
        for d, s in parts:
            if d.bias is not None:
                bias = s * d.bias if bias is None else bias + s * d.bias
        out[lname] = LayerDelta(
            down=torch.cat([d.down for d, _ in parts]),
            up=torch.cat([d.up for d, _ in parts], dim=1),
            scales=torch.cat([d.scales * s for d, s in parts]),
            bias=bias,
        )
    return LoraPlan(name, out, params, matched, sorted(unmatched), source=name)
