"""Nunchaku's kernel tilings ↔ our canonical row-major layout (pure index permutations).

Nunchaku stores every tensor of a quantized layer pre-permuted for one CUDA kernel's MMA
fragments (reference: ../shared/reference/nunchaku.md §2.2; DeepCompressor
``NunchakuWeightPacker``). This module holds the permutations and nothing else: the nibble
packing itself is :func:`svdq_format.packing.pack_nibbles` (low nibble = even element).

Canonical (ours) ↔ Nunchaku, for a layer with N outputs, K inputs, rank r:

==============  ====================  ==========================================================
ours            Nunchaku              tiling
==============  ====================  ==========================================================
codes [N, K]    ``qweight`` int8      128×64 tiles, [N/128][K/64][p=8][nl=8][kl=4][ns=2][ks=2]
                [N, K/2]              × 8 nibbles (k = 64kt+32ks+8kl+i, n = 128nt+16p+8ns+nl)
wscales [N,K/64] ``wscales`` [K/64,N]  [N/128][group][128 channels permuted within 128]
(int4)
wscales [N,K/16] ``wscales`` [K/16,N]  [N/128][K/64][r=8][q=4][s=4][g=4], n = 32s+8q+r
(nvfp4, e4m3)
vector [N]/[K]  bias/smooth/wcscales  permuted within 128 like one int4 scale group
lora_down [r,K] ``lora_down`` [K, r]  16×16 tiles [K/16][r/16], m16n8k16 fragment order inside
lora_up [N, r]  ``lora_up`` [N, r]    16×16 tiles [N/16][r/16], same fragment order
AWQ codes [N,K] ``qweight`` int32     [N/4][K/64][4 rows][16 units of 4 nibbles
                [N/4, K/2]            k = 32c + 8i + j, nibble i of unit (c, j)]
==============  ====================  ==========================================================

All functions need the padded sizes (N and K multiples of 128 for the W4A4 tensors, ranks
multiples of 16); :func:`pad_to` pads.
"""

from __future__ import annotations

import torch

from svdq_format import packing

__all__ = [
    "TILE_N",
    "TILE_K",
    "RANK_TILE",
    "pad_to",
    "round_up",
    "pack_qweight",
    "unpack_qweight",
    "rowmajor_to_qweight",
    "qweight_to_rowmajor",
    "pack_scales",
    "unpack_scales",
    "pack_vector",
    "unpack_vector",
    "pack_micro_scales",
    "unpack_micro_scales",
    "pack_lora_down",
    "unpack_lora_down",
    "pack_lora_up",
    "unpack_lora_up",
    "pack_awq_qweight",
    "unpack_awq_qweight",
]

#: Nunchaku pads N and K of W4A4 layers to multiples of 128 (one warp tile; K unrolled twice).
TILE_N = 128
TILE_K = 128
#: Low-rank tensors are tiled in 16×16 fragments; the kernel needs rank % 16 == 0.
RANK_TILE = 16


def round_up(x: int, m: int) -> int:
    """Smallest multiple of ``m`` that is ≥ ``x``."""
    return -(-x // m) * m


def pad_to(t: torch.Tensor, shape: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Pad ``t`` at the end of each dimension to ``shape`` with ``value`` (a copy)."""
    if tuple(t.shape) == tuple(shape):
        return t.clone()
    if t.dtype == torch.float8_e4m3fn:  # pad the bytes: e4m3 0x00 is +0
        if value != 0.0:
            raise ValueError("float8 tensors are padded with 0 only")
        return pad_to(t.view(torch.uint8), shape).view(t.dtype)
    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


# --------------------------------------------------------------------------- W4A4 weights


def rowmajor_to_qweight(packed: torch.Tensor) -> torch.Tensor:
    """Our packed codes uint8 ``[N, K/2]`` → Nunchaku ``qweight`` int8 ``[N, K/2]``.

    Eight consecutive codes along K are one little-endian 32-bit word in *both* layouts (code i
    in bits 4i..4i+3, i.e. :func:`svdq_format.packing.pack_nibbles` order), so the tiling is a
    permutation of whole words.
    """
    n, half = packed.shape
    k = 2 * half
    _check(n % TILE_N == 0 and k % TILE_K == 0, f"qweight {n}x{k} is not padded to 128x128")
    words = packed.contiguous().view(torch.int32).reshape(n // 128, 8, 2, 8, k // 64, 2, 4)  # nt p ns nl kt ks kl
    words = words.permute(0, 4, 1, 3, 6, 2, 5).contiguous()  # nt kt p nl kl ns ks
    return words.view(torch.int8).reshape(n, half)


def qweight_to_rowmajor(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rowmajor_to_qweight`: Nunchaku int8 ``[N, K/2]`` → our uint8 ``[N, K/2]``."""
    n, half = qweight.shape
    k = 2 * half
    _check(n % TILE_N == 0 and k % TILE_K == 0, f"qweight {n}x{k} is not padded to 128x128")
    words = qweight.contiguous().view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)  # nt kt p nl kl ns ks
    words = words.permute(0, 2, 5, 3, 1, 6, 4).contiguous()  # nt p ns nl kt ks kl
    return words.view(torch.uint8).reshape(n, half)


def pack_qweight(nibbles: torch.Tensor) -> torch.Tensor:
    """Canonical nibbles uint8 ``[N, K]`` → Nunchaku ``qweight`` int8 ``[N, K/2]``."""
    return rowmajor_to_qweight(packing.pack_nibbles(nibbles))


def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_qweight`: int8 ``[N, K/2]`` → nibbles uint8 ``[N, K]``."""
    return packing.unpack_nibbles(qweight_to_rowmajor(qweight))


# --------------------------------------------------------------------------- scales / vectors


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """Canonical int4 group scales ``[N, G]`` → Nunchaku ``wscales`` ``[G, N]`` (tiled)."""
    n, g = scales.shape
    _check(n % TILE_N == 0, f"scales for {n} channels are not padded to 128")
    t = scales.reshape(n // 128, 8, 2, 4, 2, g)  # nt a b c d g  (n = 16a + 8b + 2c + d)
    return t.permute(0, 5, 1, 3, 2, 4).contiguous().view(g, n)  # nt g a c b d


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_scales`: ``[G, N]`` → ``[N, G]``."""
    g, n = packed.shape
    _check(n % TILE_N == 0, f"scales for {n} channels are not padded to 128")
    t = packed.contiguous().view(n // 128, g, 8, 4, 2, 2)  # nt g a c b d
    return t.permute(0, 2, 4, 3, 5, 1).reshape(n, g).contiguous()


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """Canonical per-channel vector ``[N]`` (bias, smooth, wcscales) → Nunchaku order ``[N]``."""
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_vector`."""
    return unpack_scales(v.reshape(1, -1)).reshape(-1)


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    """Canonical nvfp4 e4m3 scales ``[N, K/16]`` → Nunchaku ``wscales`` ``[K/16, N]`` (tiled)."""
    n, g = scales.shape
    _check(n % TILE_N == 0 and g % 4 == 0, f"micro-scales {n}x{g} are not padded (128, 4)")
    t = scales.contiguous().view(torch.uint8).reshape(n // 128, 4, 4, 8, g // 4, 4)  # nt s q r kt g
    t = t.permute(0, 4, 3, 2, 1, 5).contiguous()  # nt kt r q s g
    return t.view(g, n).view(scales.dtype)


def unpack_micro_scales(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_micro_scales`: ``[K/16, N]`` → ``[N, K/16]``."""
    g, n = packed.shape
    _check(n % TILE_N == 0 and g % 4 == 0, f"micro-scales {n}x{g} are not padded (128, 4)")
    t = packed.contiguous().view(torch.uint8).reshape(n // 128, g // 4, 8, 4, 4, 4)  # nt kt r q s g
    t = t.permute(0, 4, 3, 2, 1, 5).reshape(n, g).contiguous()  # nt s q r kt g
    return t.view(packed.dtype)


# --------------------------------------------------------------------------- low-rank


def _fragment(t: torch.Tensor) -> torch.Tensor:
    """``[..., 16 rows, 16 cols]`` → fragment order ``[..., nl, kl, ns, ks, e]``."""
    lead = t.shape[:-2]
    t = t.reshape(*lead, 2, 8, 2, 4, 2)  # ns nl ks kl e
    d = len(lead)
    return t.permute(*range(d), d + 1, d + 3, d, d + 2, d + 4)


def _unfragment(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_fragment`: ``[..., 256]`` in fragment order → ``[..., 16, 16]``."""
    lead = t.shape[:-1]
    t = t.reshape(*lead, 8, 4, 2, 2, 2)  # nl kl ns ks e
    d = len(lead)
    return t.permute(*range(d), d + 2, d, d + 3, d + 1, d + 4).reshape(*lead, 16, 16)


def pack_lora_down(down: torch.Tensor) -> torch.Tensor:
    """Canonical ``lora_down`` ``[r, K]`` → Nunchaku ``lora_down``/``proj_down`` ``[K, r]``."""
    r, k = down.shape
    _check(r % 16 == 0 and k % 16 == 0, f"lora_down {r}x{k} is not padded to 16")
    t = down.reshape(r // 16, 16, k // 16, 16).permute(2, 0, 1, 3)  # K-tile, r-tile, 16, 16
    return _fragment(t).contiguous().view(k, r)


def unpack_lora_down(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_lora_down`: ``[K, r]`` → ``[r, K]``."""
    k, r = packed.shape
    _check(r % 16 == 0 and k % 16 == 0, f"lora_down {k}x{r} is not padded to 16")
    t = _unfragment(packed.contiguous().view(k // 16, r // 16, 256))
    return t.permute(1, 2, 0, 3).reshape(r, k).contiguous()


def pack_lora_up(up: torch.Tensor) -> torch.Tensor:
    """Canonical ``lora_up`` ``[N, r]`` → Nunchaku ``lora_up``/``proj_up`` ``[N, r]`` (tiled)."""
    n, r = up.shape
    _check(r % 16 == 0 and n % 16 == 0, f"lora_up {n}x{r} is not padded to 16")
    t = up.reshape(n // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    return _fragment(t).contiguous().view(n, r)


def unpack_lora_up(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_lora_up`."""
    n, r = packed.shape
    _check(r % 16 == 0 and n % 16 == 0, f"lora_up {n}x{r} is not padded to 16")
    t = _unfragment(packed.contiguous().view(n // 16, r // 16, 256))
    return t.permute(0, 2, 1, 3).reshape(n, r).contiguous()


# --------------------------------------------------------------------------- AWQ W4A16


def pack_awq_qweight(nibbles: torch.Tensor) -> torch.Tensor:
    """Unsigned AWQ codes uint8 ``[N, K]`` (0..15) → ``qweight`` int32 ``[N/4, K/2]``."""
    n, k = nibbles.shape
    _check(n % 4 == 0 and k % 64 == 0, f"AWQ weight {n}x{k}: N must divide by 4 and K by 64")
    t = nibbles.reshape(n // 4, 4, k // 64, 2, 4, 8)  # o4 row kc c i j   (k = 64kc + 32c + 8i + j)
    t = t.permute(0, 2, 1, 3, 5, 4).reshape(-1)  # o4 kc row c j i
    return packing.pack_nibbles(t).view(torch.int32).view(n // 4, k // 2)


def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq_qweight`: int32 ``[N/4, K/2]`` → codes uint8 ``[N, K]``."""
    n4, half = qweight.shape
    n, k = 4 * n4, 2 * half
    _check(k % 64 == 0, f"AWQ qweight with K={k} is not a multiple of 64")
    t = packing.unpack_nibbles(qweight.contiguous().view(torch.uint8).reshape(-1))
    t = t.reshape(n4, k // 64, 4, 2, 8, 4)  # o4 kc row c j i
    return t.permute(0, 2, 1, 3, 5, 4).reshape(n, k).contiguous()
