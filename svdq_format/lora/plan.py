"""Where an adapter lands in a model: targets resolved (fused members, 16-bit linears,
whole parameters), factors fused, padded and checked — without changing the model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn

from ..errors import LoRAError
from ..linear import SVDQLinear
from .checks import check_delta, check_finite_batch
from .state import one_thread
from .types import RANK_MULTIPLE, LayerDelta, LoraAdapter, LoraDelta, LoraPlan

__all__ = ["plan_lora", "check_plan", "compose_plans"]


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
    with one_thread():
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
            check_delta(where, delta, layer.in_features, size, deferred)
            per_fused.setdefault(lname, []).append((off, size, delta))
            matched[target] = lname
            continue
        mod = modules.get(target)
        if isinstance(mod, (SVDQLinear, nn.Linear)):
            check_delta(where, delta, mod.in_features, mod.out_features, deferred)
            direct[target] = delta
            matched[target] = target
        else:
            unmatched.append(target)
    check_finite_batch(deferred)
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


def check_plan(model: nn.Module, plan: LoraPlan) -> None:
    """Validate a plan (e.g. read from a delta file) against a model before attaching it.

    Raises:
        LoRAError: a layer is missing, of another kind or shape, or a tensor is bad.
    """
    with one_thread():
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
        check_delta(f"{src}: {lname}", LoraDelta(d.down, d.up, d.scales, d.bias), mod.in_features, mod.out_features,
                     deferred)
        if isinstance(mod, SVDQLinear):
            d.down, d.up = d.down.to(mod.dtype), d.up.to(mod.dtype)
        else:  # the hook uses them directly: own copies, not views of a file mapping
            dtype = mod.weight.dtype
            d.down, d.up = d.down.to(dtype, copy=True), d.up.to(dtype, copy=True)
            d.full_down = d.full_up = None
        d.scales = d.scales.float().clone()
        d.bias = None if d.bias is None else d.bias.float().clone()
    check_finite_batch(deferred)
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
