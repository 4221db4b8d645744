"""Export an SVDQuant model directory to Nunchaku's single-file layout.

The inverse of :mod:`converters.nunchaku.importer`: diffusers module names → Nunchaku modules
(q|k|v fused, FLUX single-block ``proj_out`` split along K into ``out_proj`` + ``mlp_fc2``,
``proj_mlp`` → ``mlp_fc1``), canonical tensors → kernel tilings padded to 128, nvfp4 tensor
scales → ``wtscale`` (fp32, which the C++ loader accepts) plus ``wcscales`` for fused layers,
``w4a16`` layers → AWQ (zero point 8, rows interleaved and ``+1`` baked into the scale chunks of
modulation layers), and the four header strings Nunchaku's loaders read.

A FLUX single-block ``proj_out`` with ``k_segments`` (format 2: attention half signed, MLP half
GELU-shifted unsigned, as :func:`converters.nunchaku.importer.import_nunchaku` writes an int4 file's)
splits into exactly Nunchaku's two layers, each with its segment's tensor scale.

Errors that ``svdq quantize --target nunchaku`` would have avoided say so (:data:`PRESET_HINT`).

Everything is exact, except a case Nunchaku cannot store: where the baked ``+1`` rounds a
modulation bias in 16 bits, the exact bias is kept in the header under
:data:`~converters.nunchaku.importer.EXACT_BIAS_KEY` (Nunchaku ignores it; our importer uses it,
so ours → Nunchaku → ours is bit-identical).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format import packing
from svdq_format.checkpoint import load_tensors, open_checkpoint
from svdq_format.errors import UnsupportedError
from svdq_format.io import write_tensors
from svdq_format.linear import SVDQLinear
from svdq_format.outputs import check_output
from svdq_format.spec import FormatMetadata

from . import layout as L
from .awq import ours_to_awq
from .common import (
    EXACT_BIAS_KEY,
    GELU_SHIFT,
    PRESET_HINT,
    build_skeleton,
    find_linear,
    is_gelu_fc2,
    lora_down,
    lora_up,
    tensor_scale,
)
from .names import FUSED, REBUILT_FUSED, REBUILT_PLAIN, adanorm_splits, from_native, stock_to_unquantized

__all__ = ["export_nunchaku", "read_model_dir", "NUNCHAKU_MODEL_CLASSES"]

#: diffusers class → (Nunchaku class, default dialect).
NUNCHAKU_MODEL_CLASSES = {
    "FluxTransformer2DModel": ("NunchakuFluxTransformer2dModel", "flux-cpp"),
    "QwenImageTransformer2DModel": ("NunchakuQwenImageTransformer2DModel", "native"),
    "ZImageTransformer2DModel": ("NunchakuZImageTransformer2DModel", "native"),
    "UNet2DConditionModel": ("NunchakuSDXLUNet2DConditionModel", "sdxl"),
}


def read_model_dir(
    model_dir: str | os.PathLike[str],
) -> tuple[dict[str, Any], FormatMetadata, dict[str, SVDQLinear], dict[str, torch.Tensor]]:
    """``(config, metadata, layers, other tensors)`` of an SVDQuant model directory (through the
    loading core: :func:`svdq_format.checkpoint.open_checkpoint`, :func:`~svdq_format.checkpoint.load_tensors`)."""
    ckpt = open_checkpoint(model_dir, need_config=True)
    assert ckpt.config is not None and ckpt.config_metadata is not None
    layers, extras = load_tensors(ckpt)
    return dict(ckpt.config), ckpt.config_metadata, layers, extras


def _codes(layer: SVDQLinear) -> torch.Tensor:
    """Our packed codes uint8 [N, K/2] (the export keeps them packed: Nunchaku moves 32-bit words)."""
    return layer.qweight


class _Out:
    """A Nunchaku W4A4 layer being assembled (canonical order, real sizes)."""

    def __init__(self, precision: str, codes: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor,
                 down: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
                 alpha: float | None, wcscales: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.precision, self.codes, self.wscales, self.smooth = precision, codes, wscales, smooth
        self.down, self.up, self.bias, self.alpha, self.wcscales, self.dtype = down, up, bias, alpha, wcscales, dtype


def _single(layer: SVDQLinear) -> _Out:
    if layer.k_segments:
        raise UnsupportedError(
            "per-segment activation handling (k_segments) has a Nunchaku form only on FLUX single-block proj_out"
        )
    return _Out(layer.precision, _codes(layer), layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                layer.bias, None if layer.wtscale is None else float(layer.wtscale), None, layer.dtype)


def _fuse(name: str, members: list[tuple[str, SVDQLinear]]) -> _Out:
    """q|k|v → one layer: rows concatenated; one smooth; lora shared or rank-concatenated."""
    first = members[0][1]
    for m, layer in members[1:]:
        if layer.precision != first.precision or layer.dtype != first.dtype or layer.in_features != first.in_features:
            raise UnsupportedError(
                f"layer {m}: precision/dtype/in_features differ from {members[0][0]}; cannot fuse into {name}"
            )
        if not torch.equal(layer.smooth, first.smooth):
            raise UnsupportedError(
                f"layer {m}: smoothing differs from {members[0][0]}; Nunchaku's fused {name} has one smooth; "
                f"{PRESET_HINT}"
            )
        if layer.act_shift or layer.act_unsigned or layer.k_segments:
            raise UnsupportedError(f"layer {m}: shifted activations cannot be fused into {name}; {PRESET_HINT}")
    layers = [layer for _, layer in members]
    codes = torch.cat([_codes(x) for x in layers])
    wscales = torch.cat([x.wscales for x in layers])
    ranks = [x.rank for x in layers]
    dtype = first.dtype
    n_total = sum(x.out_features for x in layers)
    down: torch.Tensor | None
    up: torch.Tensor | None
    if (
        all(r == ranks[0] for r in ranks)
        and ranks[0]
        and all(torch.equal(lora_down(x), lora_down(first)) for x in layers)
    ):
        down, up = lora_down(first), torch.cat([lora_up(x) for x in layers])
    elif any(ranks):
        down = torch.cat([lora_down(x) for x in layers if x.rank])
        up = torch.zeros(n_total, sum(ranks), dtype=dtype)
        row = col = 0
        for x in layers:
            if x.rank:
                up[row : row + x.out_features, col : col + x.rank] = lora_up(x)
            row, col = row + x.out_features, col + x.rank
    else:
        down = up = None
    has_bias = [x.bias is not None for x in layers]
    bias = (
        torch.cat([x.bias if x.bias is not None else torch.zeros(x.out_features, dtype=dtype) for x in layers])
        if any(has_bias)
        else None
    )
    alpha = wc = None
    if first.precision == "nvfp4":
        alpha = float(tensor_scale(first))
        a32 = torch.tensor(alpha, dtype=torch.float32)
        parts = []
        for m, x in members:
            ratio = (tensor_scale(x).float() / a32).to(dtype)
            if not torch.equal(a32 * ratio.float(), tensor_scale(x).float()):
                raise UnsupportedError(
                    f"layer {m}: its nvfp4 tensor scale is not {members[0][0]}'s times a "
                    f"{str(dtype).removeprefix('torch.')} "
                    f"number, so Nunchaku's fused {name} (alpha × wcscales) cannot express it exactly; {PRESET_HINT}"
                )
            parts.append(ratio.expand(x.out_features))
        wc = torch.cat(parts)
    return _Out(first.precision, codes, wscales, first.smooth, down, up, bias, alpha, wc, dtype)


def _split_k(name: str, layer: SVDQLinear, k_attn: int) -> tuple[_Out, _Out, list[tuple[float, bool]]]:
    """Our FLUX single-block ``proj_out`` → (``out_proj`` on attn, ``mlp_fc2`` on the MLP, each
    half's (act_shift, act_unsigned)); with ``k_segments`` the segments must be these halves."""
    g = layer.group_size
    if k_attn % g:
        raise UnsupportedError(f"layer {name}: attention width {k_attn} is not a multiple of the group size {g}")
    bounds = ((0, k_attn), (k_attn, layer.in_features))
    if layer.k_segments:
        sizes = tuple(seg.size for seg in layer.k_segments)
        if sizes != (k_attn, layer.in_features - k_attn):
            raise UnsupportedError(
                f"layer {name}: k_segments {list(sizes)} are not the attention and MLP halves "
                f"[{k_attn}, {layer.in_features - k_attn}] that Nunchaku stores as two layers"
            )
        handling = [(seg.act_shift, seg.act_unsigned) for seg in layer.k_segments]
    else:
        handling = [(layer.act_shift, layer.act_unsigned)] * 2
    codes, ws = _codes(layer), layer.wscales
    scales = [None, None] if layer.wtscale is None else [float(t) for t in layer.wtscale.reshape(-1)]
    if len(scales) == 1:
        scales = scales * 2
    down, up = layer.lora_down, layer.lora_up
    halves = []
    for (lo, hi), alpha in zip(bounds, scales):
        d_half, u_half = None, None
        if down is not None and up is not None:
            # rank columns that act on the other half only (an imported block-diagonal branch) are dropped
            keep = (down[:, lo:hi] != 0).any(dim=1) & (up != 0).any(dim=0)
            if bool(keep.any()):
                d_half, u_half = down[keep, lo:hi], up[:, keep]
        halves.append(_Out(layer.precision, codes[:, lo // 2 : hi // 2], ws[:, lo // g : hi // g], layer.smooth[lo:hi],
                           d_half, u_half, None, alpha, None, layer.dtype))
    halves[1].bias = layer.bias
    halves[0].bias = torch.zeros(layer.out_features, dtype=layer.dtype)
    return halves[0], halves[1], handling


def _tile(out: _Out, rank: int) -> dict[str, torch.Tensor]:
    """Canonical → Nunchaku tensors, padded to 128 (N, K) and to ``rank``."""
    n, k = out.codes.shape[0], 2 * out.codes.shape[1]
    n_pad, k_pad = L.round_up(n, L.TILE_N), L.round_up(k, L.TILE_K)
    g = packing.GROUP_SIZES[out.precision]
    t: dict[str, torch.Tensor] = {"qweight": L.rowmajor_to_qweight(L.pad_to(out.codes, (n_pad, k_pad // 2)))}
    if out.precision == "nvfp4":
        t["wscales"] = L.pack_micro_scales(L.pad_to(out.wscales, (n_pad, k_pad // g)))
        t["wtscale"] = torch.tensor([out.alpha], dtype=torch.float32)
        if out.wcscales is not None:
            t["wcscales"] = L.pack_vector(L.pad_to(out.wcscales, (n_pad,), 1.0))
    else:
        t["wscales"] = L.pack_scales(L.pad_to(out.wscales, (n_pad, k_pad // g)))
    smooth = L.pack_vector(L.pad_to(out.smooth, (k_pad,), 1.0))
    t["smooth"], t["smooth_orig"] = smooth, smooth.clone()
    down = torch.zeros(rank, k_pad, dtype=out.dtype)
    up = torch.zeros(n_pad, rank, dtype=out.dtype)
    if out.down is not None:
        assert out.up is not None  # a low-rank branch has both halves
        down[: out.down.shape[0], :k] = out.down
        up[:n, : out.up.shape[1]] = out.up
    t["lora_down"], t["lora_up"] = L.pack_lora_down(down), L.pack_lora_up(up)
    if out.bias is not None:
        t["bias"] = L.pack_vector(L.pad_to(out.bias, (n_pad,)))
    return t


def _rebuilt_target(name: str, layers: Mapping[str, SVDQLinear]) -> tuple[str, list[str]] | None:
    """Our stock module → (Nunchaku's rebuilt module, its members), e.g. Z-Image w1/w3 → net.0.proj."""
    for target, members in list(REBUILT_FUSED.items()) + [(t, (m,)) for t, m in REBUILT_PLAIN.items()]:
        for m in members:
            if name == m or name.endswith("." + m):
                base = name[: -len(m)]
                full = [base + x for x in members]
                if all(x in layers for x in full):
                    return base + target, full
                raise UnsupportedError(
                    f"layer {name}: Nunchaku fuses {full} into {base + target}; all must be quantized"
                )
    return None


def _check_coverage(model: nn.Module, layers: Mapping[str, SVDQLinear], dialect: str, file: str) -> None:
    """FLUX C++ models quantize every linear inside the transformer blocks: refuse gaps."""
    if dialect != "flux-cpp":
        return
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        block = name.split(".")[0] + "." + name.split(".")[1]
        covered = name in layers or (
            name == f"{block}.proj_out" and f"{block}.attn.to_out" in layers and f"{block}.mlp_fc2" in layers
        )
        if not covered:
            raise UnsupportedError(
                f"layer {name}: not quantized, but Nunchaku's FLUX model runs it as a 4-bit layer; {PRESET_HINT}"
            )


def export_nunchaku(
    model_dir: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    dialect: str | None = None,
) -> Path:
    """Write an SVDQuant model directory as one Nunchaku single-file checkpoint.

    ``out_file`` must not be, contain or lie inside ``model_dir`` (one ``OutputError`` line).

    Args:
        model_dir: An SVDQuant model directory (``config.json`` + weights).
        out_file: The ``.safetensors`` file to write (atomically).
        dialect: ``"flux-cpp"`` / ``"sdxl"`` / ``"native"``; default: the dialect a model
            imported from Nunchaku came in, else the one Nunchaku's loader for the model class
            reads (``flux-cpp`` for FLUX).

    Returns:
        The written file.

    Raises:
        UnsupportedError: a layer Nunchaku cannot express (mixed precisions, unfusable q|k|v,
            fc2 without/with the GELU shift Nunchaku's int4 kernels apply, ...), naming it.
    """
    check_output(out_file, [model_dir], directory=False)
    cfg, meta, layers, extras = read_model_dir(model_dir)
    file = os.fspath(model_dir)
    class_name = str(cfg.get("_class_name"))
    if class_name not in NUNCHAKU_MODEL_CLASSES and dialect is None:
        raise UnsupportedError(
            f"{file}: Nunchaku has no loader for {class_name} here (known: {', '.join(NUNCHAKU_MODEL_CLASSES)}); "
            "pass dialect= to write the layout anyway"
        )
    nclass, default_dialect = NUNCHAKU_MODEL_CLASSES.get(class_name, (f"Nunchaku{class_name}", "native"))
    source = meta.extra.get("source")
    if not isinstance(source, dict):
        source = {}
    if source.get("format") == "nunchaku" and source.get("dialect") and not dialect:
        dialect = str(source["dialect"])  # write back in the dialect it came from
    dialect = dialect or default_dialect
    model = build_skeleton(cfg, file=file)
    precisions = {x.precision for x in layers.values() if x.kind == "w4a4"}
    if len(precisions) > 1:
        raise UnsupportedError(f"{file}: Nunchaku files hold one precision, this model mixes {sorted(precisions)}")
    precision = precisions.pop() if precisions else "int4"
    dtypes = {x.dtype for x in layers.values()}
    if not dtypes <= {torch.bfloat16, torch.float16} or len(dtypes) > 1:
        raise UnsupportedError(
            f"{file}: Nunchaku needs one 16-bit compute dtype, this model has {sorted(map(str, dtypes))}"
        )


    outs: dict[str, _Out] = {}
    awq: dict[str, dict[str, torch.Tensor]] = {}
    exact: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name in sorted(layers):
        if name in done:
            continue
        layer = layers[name]
        if layer.fused_from:
            raise UnsupportedError(f"layer {name}: split fused layers into their members before export")
        if (layer.kind == "w4a16") != (adanorm_splits(name) > 1):
            raise UnsupportedError(
                f"layer {name}: Nunchaku runs "
                f"{'only AdaLN modulation layers' if layer.kind == 'w4a16' else 'AdaLN modulation layers'} "
                f"as AWQ W4A16; this layer is {layer.kind}; {PRESET_HINT}"
            )
        if layer.kind == "w4a16":
            awq[name] = ours_to_awq(name, layer, exact)
            done.add(name)
            continue
        if layer.precision == "int4" and layer.wscales.dtype != layer.dtype:
            raise UnsupportedError(
                f"layer {name}: int4 scales are {layer.wscales.dtype}, "
                f"Nunchaku stores them in the compute dtype {layer.dtype}; {PRESET_HINT}"
            )
        parent, _, leaf = name.rpartition(".")
        rebuilt = _rebuilt_target(name, layers)
        if rebuilt is not None:
            target, members = rebuilt
            if any(layers[m].act_shift or layers[m].act_unsigned or layers[m].k_segments for m in members):
                raise UnsupportedError(f"layer {name}: Nunchaku does not shift this layer's activations; {PRESET_HINT}")
            if len(members) == 1:
                outs[target] = _single(layer)
            else:
                outs[target] = _fuse(target, [(m, layers[m]) for m in members])
            done.update(members)
            continue
        fused_parent = next((f for f, ms in FUSED.items() if leaf in ms), None)
        if fused_parent is not None:
            members = [f"{parent}.{m}" for m in FUSED[fused_parent]]
            present = [m for m in members if m in layers]
            if len(present) == len(members):
                outs[f"{parent}.{fused_parent}"] = _fuse(f"{parent}.{fused_parent}", [(m, layers[m]) for m in members])
                done.update(members)
                continue
            if present != [members[0]]:
                raise UnsupportedError(
                    f"layer {name}: only {present} of {members} are quantized; Nunchaku fuses all three"
                )
        single = name.startswith("single_transformer_blocks.")
        if single and leaf == "proj_out":
            block_k = find_linear(model, parent + ".proj_mlp")
            if block_k is None:
                raise UnsupportedError(f"layer {name}: model has no {parent}.proj_mlp")
            a, b, handling = _split_k(name, layer, layer.in_features - block_k.out_features)
            shifted = (GELU_SHIFT, True) if precision == "int4" else (0.0, False)
            if handling != [(0.0, False), shifted]:
                have = ", ".join(f"act_shift={h[0]:g} act_unsigned={h[1]}" for h in handling)
                raise UnsupportedError(
                    f"layer {name}: Nunchaku runs the attention half of a proj_out on signed activations and the MLP "
                    + (f"half on GELU outputs shifted by {GELU_SHIFT} with unsigned codes (int4)"
                       if precision == "int4" else "half unshifted (nvfp4)")
                    + f"; this layer's halves have ({have}); {PRESET_HINT}"
                )
            outs[f"{parent}.attn.to_out"], outs[f"{parent}.mlp_fc2"] = a, b
            done.add(name)
            continue
        target = f"{parent}.mlp_fc1" if single and leaf == "proj_mlp" else name
        shifted_kernel = precision == "int4" and (
            is_gelu_fc2(model, name) or name == f"{parent}.mlp_fc2" and single
        )
        if layer.k_segments:
            raise UnsupportedError(
                f"layer {name}: per-segment activation handling (k_segments) has a Nunchaku form only on FLUX "
                f"single-block proj_out; {PRESET_HINT}"
            )
        if shifted_kernel != bool(layer.act_unsigned) or (layer.act_unsigned and layer.act_shift != GELU_SHIFT):
            raise UnsupportedError(
                f"layer {name}: Nunchaku {'shifts' if shifted_kernel else 'does not shift'} this layer's activations "
                f"(int4 GELU shift {GELU_SHIFT}, unsigned codes) but the layer has act_shift={layer.act_shift}, "
                f"act_unsigned={layer.act_unsigned}; {PRESET_HINT}"
            )
        if layer.act_shift and not layer.act_unsigned:
            raise UnsupportedError(
                f"layer {name}: act_shift without unsigned codes has no Nunchaku form; {PRESET_HINT}"
            )
        outs[target] = _single(layer)
        if single and name.endswith(".attn.to_out") and layer.bias is None:
            outs[target].bias = torch.zeros(layer.out_features, dtype=layer.dtype)  # C++ out_proj has one
        done.add(name)
    _check_coverage(model, layers, dialect, file)

    rank = max([0] + [o.down.shape[0] for o in outs.values() if o.down is not None])
    rank = max(L.RANK_TILE, L.round_up(rank, L.RANK_TILE))
    tensors: dict[str, torch.Tensor] = {}
    for name, out in outs.items():
        for role, t in _tile(out, rank).items():
            tensors[from_native(f"{name}.{role}", dialect)] = t.contiguous()
    for name, t_awq in awq.items():
        for role, t in t_awq.items():
            tensors[from_native(f"{name}.{role}", dialect)] = t.contiguous()
    extras, rebuilt_dense = stock_to_unquantized(extras)  # e.g. Z-Image refiners left 16-bit
    for k, t in extras.items():
        key = from_native(k, dialect)
        if key in tensors:
            raise UnsupportedError(f"{file}: tensor {k} collides with a quantized layer's tensor {key}")
        tensors[key] = t.contiguous()

    fp4 = precision == "nvfp4"
    qcfg = {
        "method": "svdquant",
        "weight": {"dtype": "fp4_e2m1_all" if fp4 else "int4",
                   "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None, "group_size": 16 if fp4 else 64},
        "activation": {"dtype": "fp4_e2m1_all" if fp4 else "int4",
                       "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": 16 if fp4 else 64},
        "rank": rank,
    }
    if rebuilt_dense:
        qcfg["skip_refiners"] = True  # Nunchaku's Z-Image loader: refiners rebuilt, not quantized
    comfy = {
        "model_class": (
            ("Flux" if cfg.get("guidance_embeds") else "FluxSchnell")
            if class_name == "FluxTransformer2DModel"
            else class_name
        ),
        "model_config": {},
    }
    header = {
        "config": json.dumps(
            {k: v for k, v in cfg.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}
        ),
        "comfy_config": json.dumps(comfy),
        "model_class": nclass,
        "quantization_config": json.dumps(qcfg),
        "format": "pt",
    }
    if exact:
        header[EXACT_BIAS_KEY] = json.dumps({
            k: {"dtype": str(v.dtype).removeprefix("torch."),
                "data": base64.b64encode(v.contiguous().view(torch.uint8).numpy().tobytes()).decode()}
            for k, v in exact.items()
        })
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out_path, tensors, metadata=header)
    return out_path
