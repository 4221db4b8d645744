"""Export an SVDQuant model directory to diffusers' ``nunchaku_lite`` layout.

diffusers (0.42.1, ``quantizers/nunchaku/``) replaces each target ``nn.Linear`` of a *stock*
model by ``SVDQW4A4Linear`` (tensors ``qweight`` int8 [N, K/2], ``wscales`` [K/g, N],
``smooth_factor`` [K], ``proj_down`` [K, r], ``proj_up`` [N, r], ``bias`` [N] when the stock
module has one, and for nvfp4 ``wcscales`` [N] and ``wtscale`` [1] in the compute dtype) or
``AWQW4A16Linear`` (``qweight`` int32 [N/4, K/2], ``wscales``/``wzeros`` [K/64, N], ``bias``),
then demands the state dict match exactly. Values use Nunchaku's kernel tilings (the kernels
are Nunchaku's), but the shapes are unpadded, one rank serves all targets and there is no
activation shift, so:

* N and K must be multiples of 128 (the tiling unit), else the layer cannot be exported;
* every W4A4 layer gets the largest rank, rounded up to 16, zero-padded;
* fused or K-concatenated layers and shifted (``act_shift``) layers are refused;
* nvfp4's fp32 tensor scale becomes ``wtscale · wcscales`` in the 16-bit compute dtype:
  the pair of 16-bit numbers whose product is nearest ``t`` (:func:`split_tensor_scale`) — the
  only rounding in this export, reported in the return value;
* modulation (``w4a16``) layers keep diffusers' row order and bias (the stock module still does
  ``chunk`` and ``1 + scale``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format import packing
from svdq_format.commit import DirectoryWrite
from svdq_format.errors import UnsupportedError
from svdq_format.io import atomic_write, write_tensors
from svdq_format.linear import SVDQLinear
from svdq_format.model import CONFIG_NAME, WEIGHTS_NAME, is_weight_file
from svdq_format.outputs import check_output

from . import layout as L
from .common import build_skeleton, lora_down, lora_up, tensor_scale
from .exporter import read_model_dir

__all__ = ["export_nunchaku_lite", "lite_config", "split_tensor_scale"]


def lite_config(svdq: dict[str, Any] | None, awq: dict[str, Any] | None, dtype: torch.dtype) -> dict[str, Any]:
    """The ``quantization_config`` object diffusers' ``NunchakuLiteQuantizationConfig`` reads."""
    out: dict[str, Any] = {"quant_method": "nunchaku_lite", "compute_dtype": str(dtype).removeprefix("torch.")}
    if svdq:
        out["svdq_w4a4"] = svdq
    if awq:
        out["awq_w4a16"] = awq
    return out


def split_tensor_scale(ts: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 scale ``t`` → ``(a, c)`` in ``dtype`` with ``a · c`` as close to ``t`` as possible.

    Tries every significand for ``c`` in [1, 2) and takes the best ``a = dtype(t / c)``: the
    product of two 16-bit floats carries about twice their precision.
    """
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]  # stored significand bits
    cands = (torch.arange(2**bits, 2 ** (bits + 1), dtype=torch.float32) / 2**bits).to(dtype)
    alphas = (ts / cands.float()).to(dtype)
    errs = (alphas.float() * cands.float() - ts).abs()
    best = int(torch.argmin(errs))
    return alphas[best], cands[best]


def _svdq_tensors(
    name: str, layer: SVDQLinear, module: nn.Linear, rank: int, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], float]:
    n, k = layer.out_features, layer.in_features
    if n % L.TILE_N or k % L.TILE_K:
        raise UnsupportedError(f"layer {name}: nunchaku_lite stores unpadded tiles; {n}x{k} is not a multiple of 128")
    if layer.act_shift or layer.act_unsigned or layer.k_segments:
        raise UnsupportedError(
            f"layer {name}: nunchaku_lite has no activation shift / unsigned codes / per-segment handling (k_segments)"
        )
    if layer.dtype != dtype or (layer.precision == "int4" and layer.wscales.dtype != dtype):
        raise UnsupportedError(f"layer {name}: tensors are not all in the compute dtype {dtype}")
    t: dict[str, torch.Tensor] = {
        "qweight": L.rowmajor_to_qweight(layer.qweight),
        "smooth_factor": L.pack_vector(layer.smooth),
    }
    err = 0.0
    if layer.precision == "nvfp4":
        t["wscales"] = L.pack_micro_scales(layer.wscales)
        wt, wc = split_tensor_scale(tensor_scale(layer).float(), dtype)
        ts = tensor_scale(layer).float()
        err = float(((wt.float() * wc.float() - ts) / ts).abs())
        t["wcscales"] = wc.expand(n).contiguous()
        t["wtscale"] = wt.reshape(1)
    else:
        t["wscales"] = L.pack_scales(layer.wscales)
    down = torch.zeros(rank, k, dtype=dtype)
    up = torch.zeros(n, rank, dtype=dtype)
    if layer.rank:
        down[: layer.rank] = lora_down(layer)
        up[:, : layer.rank] = lora_up(layer)
    t["proj_down"], t["proj_up"] = L.pack_lora_down(down), L.pack_lora_up(up)
    if module.bias is not None:
        t["bias"] = L.pack_vector(layer.bias if layer.bias is not None else torch.zeros(n, dtype=dtype))
    elif layer.bias is not None and bool((layer.bias != 0).any()):
        raise UnsupportedError(f"layer {name}: has a bias but the stock module has none")
    return t, err


def _awq_tensors(name: str, layer: SVDQLinear, module: nn.Linear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, k = layer.out_features, layer.in_features
    if layer.precision != "int4" or layer.rank or not bool((layer.smooth == 1).all()):
        raise UnsupportedError(
            f"layer {name}: only plain int4 w4a16 layers (no low-rank branch, no smoothing) map to AWQ"
        )
    if n % 4 or k % 64:
        raise UnsupportedError(f"layer {name}: AWQ needs N % 4 == 0 and K % 64 == 0, got {n}x{k}")
    if layer.wscales.dtype != dtype or layer.dtype != dtype:
        raise UnsupportedError(f"layer {name}: tensors are not all in the compute dtype {dtype}")
    codes_u = (packing.nibbles_to_int4(packing.unpack_nibbles(layer.qweight)).to(torch.int16) + 8).to(torch.uint8)
    t = {
        "qweight": L.pack_awq_qweight(codes_u),
        "wscales": layer.wscales.t().contiguous(),
        "wzeros": (-8 * layer.wscales.float()).to(dtype).t().contiguous(),
    }
    if module.bias is not None:
        t["bias"] = layer.bias if layer.bias is not None else torch.zeros(n, dtype=dtype)
    elif layer.bias is not None and bool((layer.bias != 0).any()):
        raise UnsupportedError(f"layer {name}: has a bias but the stock module has none")
    return t


def export_nunchaku_lite(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                         overwrite: bool = False) -> dict[str, Any]:
    """Write an SVDQuant model directory as a diffusers ``nunchaku_lite`` model directory.

    The result (``config.json`` with the compact ``quantization_config`` +
    ``diffusion_pytorch_model.safetensors``) is what ``<ModelClass>.from_pretrained(out_dir)``
    (or a pipeline repo's ``transformer/`` folder) loads with ``quant_method="nunchaku_lite"``.

    Returns:
        ``{"quantization_config": ..., "max_rel_scale_error": float}`` — the second is the
        largest relative rounding of an nvfp4 tensor scale (0 for int4).

    Args:
        model_dir: The SVDQuant model directory.
        out_dir: The output directory.
        overwrite: Replace the files of a non-empty ``out_dir`` (else refused).

    Raises:
        UnsupportedError: a layer nunchaku_lite cannot express, naming it.
        OutputError: ``out_dir`` is or overlaps ``model_dir``, is a file, or is a non-empty
            directory without ``overwrite``.
    """
    check_output(out_dir, [model_dir], directory=True, overwrite=overwrite)
    cfg, _meta, layers, extras = read_model_dir(model_dir)
    file = os.fspath(model_dir)
    model = build_skeleton(cfg, file=file)
    dtypes = {x.dtype for x in layers.values()}
    if len(dtypes) != 1 or not dtypes <= {torch.bfloat16, torch.float16}:
        raise UnsupportedError(f"{file}: nunchaku_lite needs one 16-bit compute dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    svdq = {n: x for n, x in layers.items() if x.kind == "w4a4"}
    awq = {n: x for n, x in layers.items() if x.kind == "w4a16"}
    precisions = {x.precision for x in svdq.values()}
    if len(precisions) > 1:
        raise UnsupportedError(f"{file}: nunchaku_lite has one SVDQ precision, this model mixes {sorted(precisions)}")
    rank = max([0] + [x.rank for x in svdq.values()])
    rank = L.round_up(rank, L.RANK_TILE)
    tensors: dict[str, torch.Tensor] = {}
    err = 0.0
    modules: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        if layer.fused_from:
            raise UnsupportedError(f"layer {name}: fused layers do not load into a stock {cfg.get('_class_name')}")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise UnsupportedError(
                f"layer {name}: not a module of the stock {cfg.get('_class_name')} (a Nunchaku-only split layer?)"
            ) from None
        if not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (
            layer.in_features,
            layer.out_features,
        ):
            raise UnsupportedError(
                f"layer {name}: the stock module is not a {layer.out_features}x{layer.in_features} Linear"
            )
        modules[name] = mod
    for name, layer in svdq.items():
        t, e = _svdq_tensors(name, layer, modules[name], rank, dtype)
        err = max(err, e)
        tensors.update({f"{name}.{role}": v.contiguous() for role, v in t.items()})
    for name, layer in awq.items():
        tensors.update(
            {f"{name}.{role}": v.contiguous() for role, v in _awq_tensors(name, layer, modules[name], dtype).items()}
        )
    for k, v in extras.items():
        tensors[k] = v.contiguous()
    precision = precisions.pop() if precisions else None
    qc = lite_config(
        (
            {
                "precision": precision,
                "group_size": packing.GROUP_SIZES[precision],
                "rank": rank,
                "targets": sorted(svdq),
            }
            if precision is not None
            else None
        ),
        {"precision": "int4", "group_size": 64, "targets": sorted(awq)} if awq else None,
        dtype,
    )
    with DirectoryWrite(out_dir) as w:  # one writer, staged, config.json last, old weights removed
        write_tensors(w.path(WEIGHTS_NAME), tensors, metadata={"format": "pt"})
        new_cfg = dict(cfg)
        new_cfg["quantization_config"] = qc
        text = json.dumps(new_cfg, indent=2, sort_keys=True) + "\n"
        atomic_write(w.path(CONFIG_NAME), lambda tmp: Path(tmp).write_text(text))
        w.commit([WEIGHTS_NAME], config=CONFIG_NAME, stale=is_weight_file)
    return {"quantization_config": qc, "max_rel_scale_error": err}
