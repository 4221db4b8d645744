"""Attach, scale and detach planned LoRAs on a model (the runtime half of LoRA support).

SVDQuant needs no requantization for a LoRA: its factors are concatenated onto the 16-bit
low-rank branch of each :class:`~svdq_format.linear.SVDQLinear` (which acts on the raw input)::

    lora_down' = cat([L2, A₁, A₂, ...])      [r + r₁ + r₂ ..., K]
    lora_up'   = cat([L1, B₁, B₂, ...], 1)   [N, r + r₁ + r₂ ...]
    lora_scales = [1]*r ++ [s₁·c₁] ++ [s₂·c₂] ...

where ``cᵢ`` are the adapter's per-rank unit scales (``alpha/r`` or ``alpha/√r``) and ``sᵢ``
its strength. The layer's own SVD ranks keep scale 1. Each adapter's rank group is padded with
zero ranks to a multiple of :data:`~svdq_format.lora.types.RANK_MULTIPLE`. A strength change
only rewrites ``lora_scales``; unloading puts back the very tensor objects the layer had before
(bit-identical).

Plain 16-bit ``nn.Linear`` targets (embedders, final projection, modulation linears left in
16 bits) get a PEFT-style additive branch through a forward hook,
``y += Σᵢ sᵢ · ((x Aᵢᵀ) ⊙ cᵢ) Bᵢᵀ (+ sᵢ·bᵢ)``; their weights are never touched. Whole-parameter
replacements (control LoRAs' norm weights) swap the parameter's tensor and put the original
tensor object back on unload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..errors import LoRAError
from ..linear import SVDQLinear
from .state import AdapterRecord, LoraState, lora_state, one_thread, reset_lora_state
from .types import LayerDelta, LoraPlan

__all__ = ["attach_lora", "list_loras", "set_lora_strengths", "set_active_loras", "unload_lora", "unload_all"]


def _layer_recs(st: LoraState, name: str) -> list[tuple[AdapterRecord, LayerDelta]]:
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


def _restore_svdq(layer: SVDQLinear, name: str, st: LoraState) -> None:
    orig_down, orig_up, orig_scales, orig_bias = st.svdq_originals.pop(name)
    _put(layer, lora_down=orig_down, lora_up=orig_up, lora_scales=orig_scales, bias=orig_bias)


def _set_scales(layers: list[tuple[str, SVDQLinear]], st: LoraState) -> None:
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


def _use_ready_made(layer: SVDQLinear, name: str, st: LoraState, recs: list, base_r: int, r: int) -> bool:
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


def _rebuild_all_svdq(modules: Mapping[str, nn.Module], st: LoraState) -> None:
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


def _linear_hook(st: LoraState, name: str):
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


def _rebuild_params(model: nn.Module, names: Iterable[str], st: LoraState) -> None:
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


def _refresh(model: nn.Module, st: LoraState, layer_names: Iterable[str], param_names: Iterable[str],
             *, scales_only: bool = False) -> None:
    with one_thread():
        _refresh_layers(model, st, layer_names, param_names, scales_only=scales_only)


def _refresh_layers(model: nn.Module, st: LoraState, layer_names: Iterable[str], param_names: Iterable[str],
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
    if st.is_empty:
        reset_lora_state(model)


def attach_lora(model: nn.Module, plan: LoraPlan, *, strength: float = 1.0) -> None:
    """Attach a planned adapter (see :func:`plan_lora`) with a strength.

    Raises:
        LoRAError: an adapter of that name is already attached, or the plan is empty.
    """
    st = lora_state(model, create=True)
    if plan.adapter in st.adapters:
        raise LoRAError(f"adapter {plan.adapter!r} is already loaded; unload it first or pick another name")
    if not plan.layers and not plan.params:
        raise LoRAError(f"{plan.source or plan.adapter}: no LoRA target matched the model ({plan.summary()})")
    st.adapters[plan.adapter] = AdapterRecord(plan.adapter, plan.layers, plan.params, float(strength))
    _refresh(model, st, plan.layers, plan.params)


def list_loras(model: nn.Module) -> dict[str, float]:
    """Attached adapters → strength (0 for adapters disabled by :func:`set_active_loras`)."""
    st = lora_state(model)
    return {} if st is None else {n: r.effective for n, r in st.adapters.items()}


def _names(st: LoraState, adapters: Iterable[str]) -> tuple[set[str], set[str]]:
    layers: set[str] = set()
    params: set[str] = set()
    for n in adapters:
        layers |= set(st.adapters[n].layers)
        params |= set(st.adapters[n].params)
    return layers, params


def _require(st: Optional[LoraState], names: Iterable[str]) -> LoraState:
    have = set() if st is None else set(st.adapters)
    missing = sorted(set(names) - have)
    if missing:
        raise LoRAError(f"no adapter named {missing[0]!r} is loaded (loaded: {sorted(have)})")
    assert st is not None
    return st


def set_lora_strengths(model: nn.Module, strengths: Mapping[str, float]) -> None:
    """Change adapters' strengths; only ``lora_scales`` (and LoRA biases) are rewritten."""
    st = _require(lora_state(model), strengths)
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
    st = _require(lora_state(model), names)
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
    st = _require(lora_state(model), [name])
    layers, params = _names(st, [name])
    del st.adapters[name]
    _refresh(model, st, layers, params)


def unload_all(model: nn.Module) -> None:
    """Detach every adapter and restore every original tensor object (bit-identical)."""
    st = lora_state(model)
    if st is None:
        return
    layers, params = _names(st, st.adapters)
    st.adapters.clear()
    _refresh(model, st, layers | set(st.svdq_originals) | set(st.hooks), params | set(st.param_originals))
