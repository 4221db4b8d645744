"""Nunchaku's AWQ W4A16 modulation layers ↔ our ``w4a16`` int4 layers (both directions).

Nunchaku (DeepCompressor ``convert_to_nunchaku_w4x16_linear_weight``): asymmetric uint4 codes
``q`` with pre-scaled zeros, ``w = q·s + z`` (``z ≈ −7·s``), group 64, tinychat packing; for
AdaLN modulation layers the rows are interleaved (``view(splits, N/splits).T``) and ``+1`` is
baked into the bias of the "scale" chunks (1 and splits−2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from svdq_format import packing
from svdq_format.errors import FormatError, UnsupportedError
from svdq_format.linear import SVDQLinear

from . import layout as L
from .common import EXACT_BIAS_KEY, PRESET_HINT, group_indicator, lora_down, lora_up, new_layer
from .names import adanorm_splits

__all__ = ["awq_to_ours", "ours_to_awq"]


def _chunk_shift(bias: torch.Tensor, splits: int, delta: float) -> torch.Tensor:
    """Add ``delta`` to the scale chunks (1 and splits−2) of a bias in diffusers row order (fp32)."""
    chunks = bias.float().reshape(splits, -1).clone()
    for c in {1, splits - 2}:
        chunks[c] += delta
    return chunks.reshape(-1)


def awq_to_ours(
    name: str, t: Mapping[str, torch.Tensor], n: int, k: int, exact_bias: torch.Tensor | None, file: str
) -> SVDQLinear:
    """AWQ W4A16 (asymmetric uint4, zero pre-scaled) → our ``w4a16`` int4 layer."""
    for role in ("wscales", "wzeros"):
        if role not in t:
            raise FormatError(file, f"{name}.{role}", "missing")
    q = t["qweight"]
    if tuple(q.shape) != (n // 4, k // 2):
        raise FormatError(file, f"{name}.qweight", f"shape {list(q.shape)}, expected {[n // 4, k // 2]}")
    g = k // 64
    for role in ("wscales", "wzeros"):
        shape = tuple(t[role].shape)
        if len(shape) != 2 or shape[1] != n or shape[0] < g:
            raise FormatError(file, f"{name}.{role}", f"shape {list(shape)}, expected [{g} (or padded), {n}]")
    codes_u = L.unpack_awq_qweight(q)
    scales = t["wscales"][:g].t().contiguous()
    zeros = t["wzeros"][:g].t().contiguous()
    bias = t.get("bias")
    dtype = bias.dtype if bias is not None else scales.dtype  # compute dtype
    splits = adanorm_splits(name)
    if splits > 1:

        def deinterleave(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n // splits, splits, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous()

        codes_u, scales, zeros = deinterleave(codes_u), deinterleave(scales), deinterleave(zeros)
        if bias is not None:
            bias = deinterleave(bias)
            unbaked = _chunk_shift(bias, splits, -1.0).to(dtype)
            if exact_bias is not None:
                if not torch.equal(_chunk_shift(exact_bias, splits, 1.0).to(dtype), bias):
                    raise FormatError(file, EXACT_BIAS_KEY, f"{name}: stored exact bias does not match the file")
                unbaked = exact_bias.to(dtype)
            bias = unbaked
    s, z = scales.float(), zeros.float()
    down = up = None
    for c in (8, 7):  # the usual exact zero points: our signed code = q - c
        if torch.equal(z, -c * s) and (codes_u.numel() == 0 or int(codes_u.max()) - c <= 7):
            zp = c
            break
    else:
        # DeepCompressor rounds the zero (7·scale) separately from the scale: keep codes q - 8
        # and carry the remainder z + 8·s (exact: one 16-bit number per group) in a low-rank
        # branch that sums each group of x.
        zp = 8
        delta = z + zp * s
        if not torch.equal(delta.to(dtype).float(), delta):
            raise UnsupportedError(
                f"{file}: layer {name}: AWQ zero points are not an integer multiple of the scales "
                f"and the remainder is not exact in {dtype}"
            )
        down = group_indicator(g, k, dtype)
        up = delta.to(dtype)
    qweight = packing.pack_nibbles(packing.int4_to_nibbles(codes_u.to(torch.int16) - zp))
    return new_layer(
        precision="int4", kind="w4a16", qweight=qweight, wscales=scales, wtscale=None,
        smooth=torch.ones(k, dtype=dtype), down=down, up=up, bias=bias, dtype=dtype,
    )


def ours_to_awq(name: str, layer: SVDQLinear, exact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``w4a16`` int4 layer → Nunchaku AWQ tensors (zero point 8, exact)."""
    if not bool((layer.smooth == 1).all()):
        raise UnsupportedError(f"layer {name}: a w4a16 layer with smoothing has no Nunchaku AWQ form; {PRESET_HINT}")
    if layer.precision != "int4":
        raise UnsupportedError(
            f"layer {name}: Nunchaku's AWQ layers are int4, this one is {layer.precision}; {PRESET_HINT}"
        )
    if layer.wscales.dtype != layer.dtype:
        raise UnsupportedError(
            f"layer {name}: AWQ scales are stored in the compute dtype {layer.dtype}, not {layer.wscales.dtype}"
        )
    n, k = layer.out_features, layer.in_features
    if n % 4 or k % 64:
        raise UnsupportedError(f"layer {name}: AWQ needs N % 4 == 0 and K % 64 == 0, got {n}x{k}")
    codes_u = (packing.nibbles_to_int4(packing.unpack_nibbles(layer.qweight)).to(torch.int16) + 8).to(torch.uint8)
    scales = layer.wscales
    zeros = (-8 * scales.float()).to(scales.dtype)  # exact: a power of two
    if layer.rank:  # only the importer's zero-point remainder (per-group sums) folds back
        g = k // 64
        if layer.rank != g or not torch.equal(lora_down(layer), group_indicator(g, k, layer.dtype)):
            raise UnsupportedError(
                f"layer {name}: a w4a16 layer with a low-rank branch has no Nunchaku AWQ form; {PRESET_HINT}"
            )
        want = lora_up(layer).float() - 8 * scales.float()
        zeros = want.to(scales.dtype)
        if not torch.equal(zeros.float() + 8 * scales.float(), lora_up(layer).float()):
            raise UnsupportedError(f"layer {name}: the zero-point remainder is not exact in {scales.dtype}")
    bias = layer.bias
    splits = adanorm_splits(name)
    if splits > 1:
        if n % splits:
            raise UnsupportedError(f"layer {name}: {n} outputs do not split into {splits} modulation chunks")

        def interleave(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(splits, n // splits, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous()

        codes_u, scales, zeros = interleave(codes_u), interleave(scales), interleave(zeros)
        if bias is None:
            bias = torch.zeros(n, dtype=layer.dtype)
        baked = _chunk_shift(bias, splits, 1.0).to(layer.dtype)
        if not torch.equal(_chunk_shift(baked, splits, -1.0).to(layer.dtype), bias):
            exact[name] = bias.clone()  # the baked +1 rounds: keep the exact bias in the header
        bias = interleave(baked)
    t = {
        "qweight": L.pack_awq_qweight(codes_u),
        "wscales": scales.t().contiguous(),
        "wzeros": zeros.t().contiguous(),
    }
    if bias is not None:
        t["bias"] = bias
    return t


