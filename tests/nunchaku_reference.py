"""Test-side, independent model of Nunchaku's storage and math (from ../shared/reference/nunchaku.md).

Written from the reference notes with explicit index formulas (numpy scatter), sharing no code
with ``converters.nunchaku_*``: a packer for every tiled tensor, the AWQ packer, the row
interleave of modulation layers, and the W4A4 / W4A16 forward math of §2.3.
"""

from __future__ import annotations

import numpy as np
import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _grid(*sizes: int) -> list[np.ndarray]:
    return list(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"))


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit patterns [N, K] (0..15) → int8 [N, K/2] via the int32 word formula of §2.2."""
    n_, k_ = codes.shape
    n, k = _grid(n_, k_)
    nt, p, ns, nl = n // 128, (n % 128) // 16, (n % 16) // 8, n % 8
    kt, ks, kl, r = k // 64, (k % 64) // 32, (k % 32) // 8, k % 8
    word = ((((((nt * (k_ // 64) + kt) * 8 + p) * 8 + nl) * 4 + kl) * 2 + ns) * 2 + ks)
    words = np.zeros(n_ * k_ // 8, dtype=np.uint32)
    np.add.at(words, word.ravel(), (codes.numpy().astype(np.uint32) & 0xF).ravel() << (4 * r.ravel()).astype(np.uint32))
    return torch.from_numpy(words.view(np.int8).reshape(n_, k_ // 2).copy())


def _scatter(values: torch.Tensor, index: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    flat = values.reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype == torch.float8_e4m3fn else flat
    out = torch.empty_like(raw)
    out[torch.from_numpy(index.ravel().astype(np.int64))] = raw
    out = out.view(flat.dtype) if flat.dtype == torch.float8_e4m3fn else out
    return out.reshape(shape)


def pack_scale(s: torch.Tensor) -> torch.Tensor:
    """[N, G] → [G, N]: memory [N/128][g][128], channel 16a+8b+2c+d at 16a+4c+2b+d."""
    n_, g_ = s.shape
    n, g = _grid(n_, g_)
    m = n % 128
    a, b, c, d = m // 16, (m % 16) // 8, (m % 8) // 2, m % 2
    idx = ((n // 128) * g_ + g) * 128 + 16 * a + 4 * c + 2 * b + d
    return _scatter(s, idx, (g_, n_))


def pack_vec(v: torch.Tensor) -> torch.Tensor:
    return pack_scale(v.reshape(-1, 1)).reshape(-1)


def pack_micro(s: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K/16] → [K/16, N]: memory [N/128][K/64][r][q][s][g], channel 32s+8q+r."""
    n_, g_ = s.shape
    n, gg = _grid(n_, g_)
    m = n % 128
    sidx, q, r = m // 32, (m % 32) // 8, m % 8
    kt, g4 = gg // 4, gg % 4
    idx = (((((n // 128) * (g_ // 4) + kt) * 8 + r) * 4 + q) * 4 + sidx) * 4 + g4
    return _scatter(s, idx, (g_, n_))


def _inner(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    ns, nl = row // 8, row % 8
    ks, kl, e = col // 8, (col % 8) // 2, col % 2
    return (((nl * 4 + kl) * 2 + ns) * 2 + ks) * 2 + e


def pack_down(dn: torch.Tensor) -> torch.Tensor:
    """D' [r, K] → [K, r]: 16×16 tiles [K/16][r/16], fragment order inside."""
    r_, k_ = dn.shape
    rr, k = _grid(r_, k_)
    idx = ((k // 16) * (r_ // 16) + rr // 16) * 256 + _inner(rr % 16, k % 16)
    return _scatter(dn, idx, (k_, r_))


def pack_up(up: torch.Tensor) -> torch.Tensor:
    """U [N, r] → [N, r]: tiles [N/16][r/16], fragment order inside."""
    n_, r_ = up.shape
    n, rr = _grid(n_, r_)
    idx = ((n // 16) * (r_ // 16) + rr // 16) * 256 + _inner(n % 16, rr % 16)
    return _scatter(up, idx, (n_, r_))


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [N, K] → int32 [N/4, K/2] (tinychat pack_w4, then [oc/4, ic/64, 4, 16])."""
    n_, k_ = q.shape
    n, k = _grid(n_, k_)
    o4, orow, kc, m = n // 4, n % 4, k // 64, k % 64
    i, j16 = (m % 32) // 8, (m // 32) * 8 + m % 8
    unit = ((o4 * (k_ // 64) + kc) * 4 + orow) * 16 + j16
    units = np.zeros(n_ * k_ // 4, dtype=np.uint16)
    np.add.at(units, unit.ravel(), (q.numpy().astype(np.uint16).ravel() << (4 * i.ravel()).astype(np.uint16)))
    return torch.from_numpy(units.view(np.int32).reshape(n_ // 4, k_ // 2).copy())


def interleave_perm(n: int, splits: int) -> torch.Tensor:
    """Stored row j holds original row (j % splits)·(n/splits) + j // splits."""
    j = torch.arange(n)
    return (j % splits) * (n // splits) + j // splits


def pad(t: torch.Tensor, shape: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = torch.full(shape, value if t.dtype != torch.float8_e4m3fn else 0, dtype=raw.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = raw
    return out.view(t.dtype) if t.dtype == torch.float8_e4m3fn else out


def up128(x: int) -> int:
    return -(-x // 128) * 128


# --------------------------------------------------------------------------- math


def w4a4_forward(x: torch.Tensor, lay: dict, shift: float, unsigned: bool) -> torch.Tensor:
    """§2.3 on the logical (un-tiled) tensors, fp32: y = Q(x̃)·Q(R)ᵀ[⊙wc·α] + b + (x·D'ᵀ)·Uᵀ."""
    x = x.float()
    m, k = x.shape
    fp4 = lay["precision"] == "nvfp4"
    g = 16 if fp4 else 64
    xt = ((x + shift) / lay["smooth"].float()).reshape(m, k // g, g)
    if fp4:
        a = (xt.abs().amax(-1) / 6).clamp(max=448).to(torch.float8_e4m3fn).float()
        v = xt / torch.where(a > 0, a, 1).unsqueeze(-1)
        q = E2M1[:8][(v.abs().unsqueeze(-1) - E2M1[:8]).abs().argmin(-1)] * torch.sign(v)
        w = E2M1[lay["codes"].long()]
    elif unsigned:
        xt = xt.clamp(min=0)
        a = xt.amax(-1) / 15
        q = torch.round(xt / torch.where(a > 0, a, 1).unsqueeze(-1)).clamp(0, 15)
        w = lay["codes"].float()
    else:
        a = xt.abs().amax(-1) / 7
        q = torch.round(xt / torch.where(a > 0, a, 1).unsqueeze(-1)).clamp(-8, 7)
        w = lay["codes"].float()
    q = torch.where((a > 0).unsqueeze(-1), q, 0.0)
    n = w.shape[0]
    per_group = torch.einsum("mgk,ngk->mng", q, w.reshape(n, k // g, g))
    y = (per_group * a.unsqueeze(1) * lay["wscales"].float().unsqueeze(0)).sum(-1)
    if fp4:
        if lay.get("wcscales") is not None:
            y = y * lay["wcscales"].float()
        y = y * lay["alpha"]
    if lay.get("bias") is not None:
        y = y + lay["bias"].float()
    if lay.get("down") is not None:
        y = y + (x @ lay["down"].float().T) @ lay["up"].float().T
    return y


def awq_forward(x: torch.Tensor, lay: dict) -> torch.Tensor:
    """W4A16 AWQ in stored (interleaved) row order: y = x·(q·s + z)ᵀ + b."""
    n, k = lay["q"].shape
    s = lay["scales"].float().repeat_interleave(64, dim=1)
    z = lay["zeros"].float().repeat_interleave(64, dim=1)
    w = lay["q"].float() * s + z
    return x.float() @ w.T + lay["bias"].float()
