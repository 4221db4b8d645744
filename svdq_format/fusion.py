"""Fused q/k/v projections for quantized diffusers models (``fuse_qkv_projections``).

diffusers fuses an attention module's ``to_q``/``to_k``/``to_v`` (and ``add_q_proj``/…) into one
``to_qkv`` (``to_added_qkv``) linear by concatenating their weights — which an
:class:`~svdq_format.SVDQLinear` has not in that form. This module fuses SVDQ layers instead, per
docs/format.md §10: the members read the same input and share their smoothing vector (the
quantizer gives an input group one), so the fused layer has the members' rows of ``qweight``,
``wscales``, ``bias`` concatenated, the one ``smooth``, the members' ``lora_down`` stacked
(``[Σr, K]``) and a block-diagonal ``lora_up`` (``[ΣN, Σr]``) — or, when the members share one
``lora_down`` (Nunchaku's fused q|k|v, imported), that one and their ``lora_up`` rows stacked. Its
output is the members' outputs side by side, up to fp32 summation order — one activation
quantizer, one low-rank down projection and one GEMM instead of three, fewer launches in eager
mode.

:func:`install` (called when a quantized model is loaded or built) gives each attention module of
a diffusers model ``fuse_projections``/``unfuse_projections`` methods that do this, so
``transformer.fuse_qkv_projections()`` and ``pipe.fuse_qkv_projections()`` work. While fused,
the members keep views of the fused tensors (extra memory: the zeros of the block-diagonal
``lora_up``) and a LoRA loaded for ``to_q`` goes to
the fused layer (:mod:`svdq_format.lora` knows fused layers); unfusing splits the fused layer back
exactly (§10) and is refused while such a LoRA is loaded (unload it first), as fusing is while the
members carry one. Saving a fused model is refused: unfuse first.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .errors import SVDQError, UnsupportedError
from .linear import SVDQLinear

__all__ = ["FUSIONS", "fuse_layers", "split_layer", "fuse_projections", "unfuse_projections", "install",
           "fused_modules", "refuse_if_fused"]

#: Fused module name → its members, in row order (diffusers' names).
FUSIONS: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),  # cross-attention: the query reads another input
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}

#: Attribute of a fused layer made at run time: its (lora_down, lora_up, lora_scales, bias) as fused.
_RUNTIME_FUSED = "_svdq_runtime_fused"
_LORA_ROLES = ("lora_down", "lora_up", "lora_scales", "bias")


def _lowrank(layer: SVDQLinear) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(lora_down, lora_up)``, or None without a low-rank branch."""
    if layer.lora_down is None or layer.lora_up is None:
        return None
    return layer.lora_down, layer.lora_up


def _rank(layer: SVDQLinear) -> int:
    """The low-rank branch's actual rank (rows of ``lora_down``)."""
    lowrank = _lowrank(layer)
    return 0 if lowrank is None else int(lowrank[0].shape[0])


def _same(members: Sequence[SVDQLinear], attr: str) -> bool:
    return all(getattr(m, attr) == getattr(members[0], attr) for m in members[1:])


def _why_not(members: Sequence[SVDQLinear]) -> Optional[str]:
    first = members[0]
    for attr in ("in_features", "precision", "kind", "dtype", "act_shift", "act_unsigned", "k_segments", "mode",
                 "backend"):
        if not _same(members, attr):
            return f"their {attr} differ ({', '.join(str(getattr(m, attr)) for m in members)})"
    if any(m.fused_from for m in members):
        return "one of them is already a fused layer"
    if any(m.lora_scales is not None for m in members):
        return "a LoRA is loaded on them (fuse before loading LoRAs, or unload them first)"
    if any(m.qweight.device != first.qweight.device for m in members):
        return "they are on different devices"
    if any(m.wscales.dtype != first.wscales.dtype for m in members):
        return "their scale dtypes differ"
    if not all(torch.equal(m.smooth, first.smooth) for m in members[1:]):
        return "their smoothing vectors differ (they were not quantized as one input group)"
    tscale = first.wtscale
    if tscale is not None and not all(m.wtscale is not None and torch.equal(m.wtscale, tscale) for m in members[1:]):
        return "their nvfp4 tensor scales differ"
    return None


@torch.no_grad()
def fuse_layers(members: Sequence[SVDQLinear], names: Sequence[str]) -> SVDQLinear:
    """One SVDQ layer computing ``members`` side by side (docs/format.md §10).

    Args:
        members: Layers that read the same input, in output order.
        names: Their module names (recorded as ``fused_from``).

    Returns:
        The fused layer (new tensors; the members are untouched).

    Raises:
        UnsupportedError: the members cannot be fused exactly (the message says why).
    """
    if len(members) < 2 or len(members) != len(names):
        raise UnsupportedError(f"fusing needs two or more layers and one name each, got {len(members)} / {len(names)}")
    why = _why_not(members)
    if why is not None:
        raise UnsupportedError(f"cannot fuse {', '.join(names)}: {why}")
    first = members[0]
    ranks = [_rank(m) for m in members]
    sizes = [m.out_features for m in members]
    has_bias = any(m.bias is not None for m in members)
    lowranks = [_lowrank(m) for m in members]
    # members with one lora_down (Nunchaku's fused q|k|v, imported): keep it shared, lora_up by rows
    down0 = lowranks[0][0] if lowranks[0] is not None else None
    shared_down = down0 is not None and all(lr is not None and torch.equal(lr[0], down0) for lr in lowranks[1:])
    rank = ranks[0] if shared_down else sum(ranks)
    fused = SVDQLinear(first.in_features, sum(sizes), rank=rank, precision=first.precision, kind=first.kind,
                       bias=has_bias, dtype=first.dtype, scale_dtype=first.wscales.dtype, device="meta",
                       fused_from=tuple(names), split_sizes=tuple(sizes), act_shift=first.act_shift,
                       act_unsigned=first.act_unsigned, k_segments=first.k_segments)
    dev = first.qweight.device
    buffers = fused._buffers
    buffers["qweight"] = torch.cat([m.qweight for m in members])
    buffers["wscales"] = torch.cat([m.wscales for m in members])
    buffers["wtscale"] = None if first.wtscale is None else first.wtscale.clone()
    buffers["smooth"] = first.smooth.clone()
    if has_bias:
        buffers["bias"] = torch.cat(
            [m.bias if m.bias is not None else m.qweight.new_zeros(m.out_features, dtype=m.dtype) for m in members]
        )
    present = [lr for lr in lowranks if lr is not None]
    if shared_down and down0 is not None:
        buffers["lora_down"] = down0.clone()
        buffers["lora_up"] = torch.cat([up for _, up in present])
    elif present:
        buffers["lora_down"] = torch.cat([down for down, _ in present])
        up = torch.zeros(sum(sizes), sum(ranks), dtype=first.dtype, device=dev)
        row = col = 0
        for m, lr, r in zip(members, lowranks, ranks):
            if lr is not None:
                up[row : row + m.out_features, col : col + r] = lr[1]
            row, col = row + m.out_features, col + r
        buffers["lora_up"] = up
    fused.mode, fused.backend = first.mode, first.backend
    return fused


def _trimmed(down: Optional[torch.Tensor], up: Optional[torch.Tensor], scales: Optional[torch.Tensor]):
    """Drop the rank columns whose ``up`` column is all zero (exact: they add nothing)."""
    if down is None or up is None:
        return None, None, None
    keep = (up != 0).any(dim=0)
    if bool(keep.all()):
        return down, up, scales
    idx = keep.nonzero().squeeze(1)
    return (down.index_select(0, idx), up.index_select(1, idx),
            None if scales is None else scales.index_select(0, idx))


@torch.no_grad()
def split_layer(fused: SVDQLinear) -> list[SVDQLinear]:
    """The members of a fused layer, exactly (docs/format.md §10): each gets its rows of
    ``qweight``, ``wscales``, ``bias`` and ``lora_up`` and the shared ``smooth`` / ``lora_down``,
    minus the rank columns that are zero in its rows (another member's block or LoRA)."""
    if not fused.fused_from:
        raise UnsupportedError("split_layer needs a fused layer (fused_from is empty)")
    out: list[SVDQLinear] = []
    row = 0
    for size in fused.split_sizes:
        rows = slice(row, row + size)
        row += size
        down, up, scales = _trimmed(fused.lora_down, None if fused.lora_up is None else fused.lora_up[rows],
                                    fused.lora_scales)
        member = SVDQLinear(fused.in_features, size, rank=0 if down is None else down.shape[0],
                            precision=fused.precision, kind=fused.kind, bias=fused.bias is not None,
                            dtype=fused.dtype, scale_dtype=fused.wscales.dtype, device="meta",
                            act_shift=fused.act_shift, act_unsigned=fused.act_unsigned, k_segments=fused.k_segments)
        b = member._buffers
        b["qweight"], b["wscales"] = fused.qweight[rows], fused.wscales[rows]
        b["wtscale"], b["smooth"] = fused.wtscale, fused.smooth
        b["bias"] = None if fused.bias is None else fused.bias[rows]
        b["lora_down"] = down
        b["lora_up"] = None if up is None else up.contiguous()
        b["lora_scales"] = scales
        member.mode, member.backend = fused.mode, fused.backend
        out.append(member)
    return out


def _plan(attn: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Which fusions apply to this attention module (diffusers' rules)."""
    plan = []
    if getattr(attn, "is_cross_attention", False):
        plan.append(("to_kv", FUSIONS["to_kv"]))
    elif all(isinstance(getattr(attn, n, None), SVDQLinear) for n in FUSIONS["to_qkv"]):
        plan.append(("to_qkv", FUSIONS["to_qkv"]))
    if all(isinstance(getattr(attn, n, None), SVDQLinear) for n in FUSIONS["to_added_qkv"]):
        plan.append(("to_added_qkv", FUSIONS["to_added_qkv"]))
    return plan


@torch.no_grad()
def fuse_projections(attn: nn.Module) -> bool:
    """Fuse one attention module's SVDQ projections (what diffusers' ``fuse_projections`` does for
    ``nn.Linear``), set ``attn.fused_projections``. Returns whether it fused; a module whose
    projections cannot be fused exactly stays as it is, with one warning saying why."""
    if getattr(attn, "fused_projections", False):
        return True
    plan = _plan(attn)
    built: list[tuple[str, tuple[str, ...], SVDQLinear]] = []
    for fused_name, member_names in plan:
        members = [getattr(attn, n) for n in member_names]
        try:
            built.append((fused_name, member_names, fuse_layers(members, member_names)))
        except UnsupportedError as exc:
            warnings.warn(f"svdquant: {type(attn).__name__}: {exc}; its projections stay separate", stacklevel=3)
            return False
    if not built:
        return False
    for fused_name, member_names, fused in built:
        # the low-rank tensors as fused: a LoRA loaded while fused replaces them (svdq_format.lora)
        setattr(fused, _RUNTIME_FUSED, tuple(fused._buffers[r] for r in _LORA_ROLES))
        setattr(attn, fused_name, fused)
        _members_as_views(fused, [getattr(attn, n) for n in member_names])
    setattr(attn, "fused_projections", True)  # noqa: B010  (an nn.Module attribute mypy types as Module)
    return True


def _members_as_views(fused: SVDQLinear, members: Sequence[SVDQLinear]) -> None:
    """Point the (idle) members' tensors into the fused layer's, so fusing costs no memory beyond
    the zeros of a block-diagonal ``lora_up``."""
    ranks = [_rank(m) for m in members]
    lowrank = _lowrank(fused)
    shared_down = lowrank is not None and lowrank[0].shape[0] != sum(ranks)
    row = col = 0
    for m, r in zip(members, ranks):
        rows = slice(row, row + m.out_features)
        b = m._buffers
        b["qweight"], b["wscales"] = fused.qweight[rows], fused.wscales[rows]
        b["smooth"], b["wtscale"] = fused.smooth, fused.wtscale
        if m.bias is not None and fused.bias is not None:
            b["bias"] = fused.bias[rows]
        if r and lowrank is not None:
            down, up = lowrank
            b["lora_down"], b["lora_up"] = (down, up[rows]) if shared_down else (
                down[col : col + r], up[rows, col : col + r])
        row, col = row + m.out_features, col + r


@torch.no_grad()
def unfuse_projections(attn: nn.Module) -> None:
    """Undo :func:`fuse_projections`: each fused layer is split back into its members (exact, §10)
    and removed.

    Raises:
        SVDQError: a LoRA loaded while fused is still loaded (its bookkeeping names the fused layer).
    """
    if not getattr(attn, "fused_projections", False):
        return
    runtime = [(n, f) for n in FUSIONS
               if isinstance(f := getattr(attn, n, None), SVDQLinear) and getattr(f, _RUNTIME_FUSED, None) is not None]
    for fused_name, fused in runtime:
        as_fused = getattr(fused, _RUNTIME_FUSED)
        if any(fused._buffers[r] is not t for r, t in zip(_LORA_ROLES, as_fused)):
            raise SVDQError(f"{type(attn).__name__}.{fused_name}: a LoRA was loaded while its projections were fused; "
                            "unload it (svdq_format.lora.unload_all / converters.lora.unload_lora) before unfusing")
    for fused_name, fused in runtime:
        for name, member in zip(fused.fused_from, split_layer(fused)):
            old = getattr(attn, name)
            # copies: the members must not keep the fused layer's storage alive, nor share tensors
            # (safetensors refuses to save shared ones)
            for role in ("qweight", "wscales", "wtscale", "smooth", "bias", "lora_down", "lora_up", "lora_scales"):
                t = member._buffers[role]
                member._buffers[role] = None if t is None else t.clone()
            member.mode, member.backend = old.mode, old.backend
            setattr(attn, name, member)
        delattr(attn, fused_name)
    setattr(attn, "fused_projections", False)  # noqa: B010


def fused_modules(model: nn.Module) -> list[str]:
    """Names of the fused projection layers :func:`fuse_projections` added to ``model``."""
    return [n for n, m in model.named_modules()
            if isinstance(m, SVDQLinear) and getattr(m, _RUNTIME_FUSED, None) is not None]


def _fuse_method(self: nn.Module) -> None:
    fuse_projections(self)


def _refuse_method(self: nn.Module, fuse: bool = True) -> None:
    if _is_legacy(self):  # the model switches every processor to a fused one next: stop it here
        raise UnsupportedError(
            f"svdquant: fuse_qkv_projections() fuses the SVDQ projections of diffusers' AttentionModuleMixin "
            f"attention (FLUX, …); {type(self).__name__} is diffusers' legacy Attention, whose fused state lives "
            "in the model's processors: its projections stay separate")
    # each AttentionModuleMixin module's processor follows its own fused_projections flag
    warnings.warn(f"svdquant: {type(self).__name__}: its q/k/v projections are not all SVDQ layers; "
                  "they stay separate", stacklevel=3)


def _is_legacy(module: nn.Module) -> bool:
    """diffusers' legacy ``Attention`` (SD3, …), whose ``fuse_projections(fuse=True)`` the model
    pairs with fused processors and whose unfusing only swaps the processors back."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # a diffusers without the mixin: only legacy modules exist
        return True
    return not isinstance(module, AttentionModuleMixin)


def install(model: nn.Module) -> int:
    """Give every attention module of ``model`` whose projections are SVDQ layers the fusing
    ``fuse_projections`` / ``unfuse_projections`` above (as instance methods, so diffusers'
    ``fuse_qkv_projections()`` calls them). Legacy ``Attention`` modules, and modules whose q/k/v
    are only partly SVDQ layers, get a ``fuse_projections`` that refuses with the reason
    (diffusers' own would fail on ``.weight``).
    Returns how many modules can fuse."""
    count = 0
    projections = {n for names in FUSIONS.values() for n in names}
    for module in model.modules():
        if not callable(getattr(module, "fuse_projections", None)):
            continue
        if _plan(module) and not _is_legacy(module):
            setattr(module, "fuse_projections", types.MethodType(_fuse_method, module))  # noqa: B010
            setattr(module, "unfuse_projections", types.MethodType(unfuse_projections, module))  # noqa: B010
            count += 1
        elif any(isinstance(getattr(module, n, None), SVDQLinear) for n in projections):
            setattr(module, "fuse_projections", types.MethodType(_refuse_method, module))  # noqa: B010
    return count


def refuse_if_fused(model: nn.Module) -> None:
    """Raise when ``model`` holds fused projections (saving them would drop what only the fused
    layers carry, e.g. a LoRA loaded while fused)."""
    names = fused_modules(model)
    if names:
        raise SVDQError(f"{names[0]} (and {len(names) - 1} more) are fused q/k/v projections: call "
                        "unfuse_qkv_projections() before saving")
