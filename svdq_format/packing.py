"""Bits: nibble packing, int4 and E2M1 codes, group (de)quantization — the only place they live.

Everything here follows docs/format.md §3–§5 and is vectorised torch (no Python loops over
elements). Codes travel as ``torch.uint8`` nibbles (0..15) between functions:

* int4: the nibble is the 4-bit two's complement of the signed code −8..7
  (``code & 0xF``; decode ``(n ^ 8) − 8``).
* nvfp4: the nibble is the E2M1 bit pattern ``s e e m`` (sign bit 3).

Two nibbles share a byte along K: element ``k = 2j`` in bits 0–3 (low nibble), ``k = 2j + 1``
in bits 4–7.
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_VALUES",
    "GROUP_SIZES",
    "INT4_MAX",
    "FP8_E4M3_MAX",
    "pack_nibbles",
    "unpack_nibbles",
    "int4_to_nibbles",
    "nibbles_to_int4",
    "e2m1_encode",
    "e2m1_decode",
    "round_to_e4m3",
    "quantize_int4",
    "dequantize_int4",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_activations",
    "group_view",
    "fp8_weight_row_scales",
    "fp8_weight_scales",
    "fp8_weight_values",
]

INT4_MAX = 7
FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
#: Quantization group size along K for each precision (docs/format.md §3).
GROUP_SIZES = {"int4": 64, "nvfp4": 16}
#: Value of each E2M1 nibble 0..15 (index = code).
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)


# --------------------------------------------------------------------------- nibbles


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """Pack uint8 nibbles ``[..., K]`` (values 0..15, K even) into bytes ``[..., K/2]``.

    Byte ``j`` = ``nibbles[..., 2j] | nibbles[..., 2j+1] << 4``.
    """
    if nibbles.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles wants uint8 nibbles, got {nibbles.dtype}")
    if nibbles.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {nibbles.shape[-1]}")
    lo = nibbles[..., 0::2] & 0xF
    hi = nibbles[..., 1::2] & 0xF
    return lo | (hi << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes ``[..., K/2]`` → nibbles ``[..., K]`` (uint8)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles wants uint8 bytes, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def int4_to_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (any integer dtype, −8..7) → uint8 two's-complement nibbles."""
    return (codes.to(torch.int16) & 0xF).to(torch.uint8)


def nibbles_to_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles → signed int4 codes as ``torch.int8`` (−8..7)."""
    n = nibbles.to(torch.int16) & 0xF
    return ((n ^ 8) - 8).to(torch.int8)


# --------------------------------------------------------------------------- E2M1 / e4m3


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest E2M1 value; return its nibble (uint8).

    Ties go to the even mantissa (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4);
    magnitudes above 6 (and ±inf) saturate to ±6; NaN encodes as 0. A value that rounds to
    zero gets the positive-zero nibble 0, whatever its sign.
    """
    m = x.float().abs()
    mag = (
        (m > 0.25).to(torch.uint8)
        + (m >= 0.75).to(torch.uint8)
        + (m > 1.25).to(torch.uint8)
        + (m >= 1.75).to(torch.uint8)
        + (m > 2.5).to(torch.uint8)
        + (m >= 3.5).to(torch.uint8)
        + (m > 5.0).to(torch.uint8)
    )
    sign = ((x < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 nibbles → float32 values."""
    return E2M1_VALUES.to(nibbles.device)[(nibbles & 0xF).long()]


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to float8_e4m3fn (nearest-even), saturating at ±448; NaN stays NaN."""
    return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


# --------------------------------------------------------------------------- groups


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., K]`` → ``[..., K/group_size, group_size]`` (K must divide)."""
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"last dimension {k} is not a multiple of group size {group_size}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def quantize_int4(
    w: torch.Tensor,
    *,
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.bfloat16,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 group quantization of a weight ``[N, K]`` along K.

    ``scale = absmax(group) / 7`` rounded to ``scale_dtype`` (unless ``scales`` is given, e.g.
    by a clipping search); ``code = clamp(round_half_even(w / scale), −8, 7)``; a zero scale
    gives zero codes.

    Returns:
        ``(nibbles uint8 [N, K], scales [N, K/group_size] in scale_dtype)``.
    """
    wg = group_view(w.float(), group_size)
    if scales is None:
        scales = (wg.abs().amax(dim=-1) / INT4_MAX).to(scale_dtype)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp(-8, INT4_MAX).reshape(w.shape)
    return int4_to_nibbles(q.to(torch.int8)), scales


def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor, *, group_size: int = 64) -> torch.Tensor:
    """int4 nibbles ``[N, K]`` and scales ``[N, K/g]`` → float32 ``[N, K]``."""
    codes = group_view(nibbles_to_int4(nibbles).float(), group_size)
    return (codes * scales.float().unsqueeze(-1)).reshape(nibbles.shape)


def quantize_nvfp4(
    w: torch.Tensor, *, group_size: int = 16, tensor_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantization of a weight ``[N, K]``: E2M1 codes, e4m3 scale per 16, fp32 tensor scale.

    ``tensor_scale = absmax(w) / (6 · 448)`` (1 for an all-zero weight);
    ``group_scale = e4m3(absmax(group) / 6 / tensor_scale)``;
    ``code = e2m1(w / (group_scale · tensor_scale))`` (zero codes where the group scale is 0).

    Returns:
        ``(nibbles uint8 [N, K], group scales float8_e4m3fn [N, K/16], tensor scale float32 [])``.
    """
    wf = w.float()
    if tensor_scale is None:
        amax = wf.abs().max() if wf.numel() else torch.tensor(0.0)
        tensor_scale = float(amax) / (E2M1_MAX * FP8_E4M3_MAX) if float(amax) > 0 else 1.0
    ts = torch.tensor(tensor_scale, dtype=torch.float32)
    wg = group_view(wf, group_size)
    gscale = round_to_e4m3(wg.abs().amax(dim=-1) / E2M1_MAX / ts)
    denom = gscale.float().unsqueeze(-1) * ts
    scaled = torch.where(denom > 0, wg / torch.where(denom > 0, denom, 1.0), 0.0)
    return e2m1_encode(scaled).reshape(w.shape), gscale, ts


def dequantize_nvfp4(
    nibbles: torch.Tensor, gscales: torch.Tensor, tensor_scale: torch.Tensor, *, group_size: int = 16
) -> torch.Tensor:
    """NVFP4 nibbles/scales → float32 ``[N, K]`` (``value · group_scale · tensor_scale``)."""
    vals = group_view(e2m1_decode(nibbles), group_size)
    out = vals * gscales.float().unsqueeze(-1) * tensor_scale.float()
    return out.reshape(nibbles.shape)


def quantize_activations(
    x: torch.Tensor, precision: str, *, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time activation quantizer of docs/format.md §5, per token per K-group.

    Args:
        x: Smoothed activations ``x / s`` as float32 ``[M, K]``.
        precision: ``"int4"`` (group 64) or ``"nvfp4"`` (group 16).
        unsigned: int4 only: codes 0..15 with scale ``absmax / 15``; negative inputs clamp to 0.

    Returns:
        ``(values, scales)``: ``values`` float32 ``[M, K]`` holding the *code values* (int4
        integers −8..7, or E2M1 values), ``scales`` float32 ``[M, K/g]``. The quantized
        activation is ``values · scales`` per group. A non-finite input gives a non-finite
        scale for its group (so its token's output becomes NaN) and zero codes.
    """
    if precision == "int4" and unsigned:
        xg = group_view(x, 64).clamp_min(0.0)
        a = xg.amax(dim=-1) / 15.0
        ok = (a > 0) & torch.isfinite(a)
        q = torch.round(xg / torch.where(ok, a, 1.0).unsqueeze(-1))
        q = torch.where(ok.unsqueeze(-1), q, 0.0).clamp(0, 15)
        return q.reshape(x.shape), a
    if unsigned:
        raise ValueError("unsigned activation codes are only defined for int4")
    if precision == "int4":
        xg = group_view(x, 64)
        a = xg.abs().amax(dim=-1) / INT4_MAX
        ok = (a > 0) & torch.isfinite(a)
        q = torch.round(xg / torch.where(ok, a, 1.0).unsqueeze(-1))
        q = torch.where(ok.unsqueeze(-1), q, 0.0).clamp(-8, INT4_MAX)
        return q.reshape(x.shape), a
    if precision == "nvfp4":
        xg = group_view(x, 16)
        amax = xg.abs().amax(dim=-1)
        a = round_to_e4m3(amax / E2M1_MAX).float()
        # round_to_e4m3 saturates; keep non-finite groups non-finite so they poison the output.
        a = torch.where(torch.isfinite(amax), a, amax)
        ok = (a > 0) & torch.isfinite(a)
        v = e2m1_decode(e2m1_encode(xg / torch.where(ok, a, 1.0).unsqueeze(-1)))
        v = torch.where(ok.unsqueeze(-1), v, 0.0)
        return v.reshape(x.shape), a
    raise ValueError(f"unknown precision {precision!r}")


# --------------------------------------------------------------------------- FP8 weights (fast8)


def fp8_weight_row_scales(codes: torch.Tensor, scales: torch.Tensor, *, group_size: int = 64) -> torch.Tensor:
    """Per output row, the power of two ``2^e`` (float32 ``[N]``) that brings the row's largest
    ``|code × scale|`` into [128, 256) — the range in which the ``fast8`` mode rounds weights to
    e4m3 (docs/format.md §6, execution modes). Computed with ``frexp`` (exact, the same on every device); a row
    of zeros or with a non-finite value gets 1.

    Args:
        codes: int4 code values ``[N, K]`` (any real dtype).
        scales: Group scales ``[N, K/group_size]``.
        group_size: Quantization group along K.
    """
    w = group_view(codes.float(), group_size) * scales.float().unsqueeze(-1)
    rmax = w.abs().amax(dim=(1, 2))
    _, exp = torch.frexp(rmax)  # rmax = m · 2^exp, m in [0.5, 1)
    e = (8 - exp).clamp(-100, 100).float()
    ok = (rmax > 0) & torch.isfinite(rmax)
    return torch.where(ok, torch.exp2(e), torch.ones_like(rmax))


def fp8_weight_scales(scales: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """The ``fast8`` group scales: ``scale · 2^e`` rounded to float16 (``[N, K/g]``)."""
    return (scales.float() * row_scales.float().unsqueeze(1)).to(torch.float16)


def fp8_weight_values(codes: torch.Tensor, scales16: torch.Tensor, *, group_size: int = 64) -> torch.Tensor:
    """The ``fast8`` weights before the row scale is divided out: ``e4m3(fp16(code × scale16))``
    as float32 ``[N, K]`` — an fp16 product (exact for bf16-born scales) rounded once to e4m3,
    nearest-even, saturating. This is what an FP8 tensor-core mainloop that converts int4 codes
    on the fly multiplies (svdq_kernels' CUTLASS group-64 GEMM), so the reference matches it
    bit for bit."""
    prod = group_view(codes.to(torch.float16), group_size) * scales16.to(torch.float16).unsqueeze(-1)
    return round_to_e4m3(prod.reshape(codes.shape).float()).float()
