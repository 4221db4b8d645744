"""The ``f16s`` datapath's premise, checked on the CPU: with the per-row power of two of
``svdq_kernels.triton_gemm.row_pow2``, every int4 code times its bf16 group scale is exactly an
fp16 number, so folding the scales into fp16 weights loses nothing."""

from __future__ import annotations

import torch

from svdq_kernels.triton_gemm import row_pow2


def _products(wscales: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    codes = torch.arange(-8, 8, dtype=torch.float64)
    return codes[None, None, :] * wscales.double()[:, :, None] * pw.double()[:, None, None]


def test_every_code_times_scale_is_exact_in_fp16() -> None:
    g = torch.Generator().manual_seed(0)
    # scales over many binades per row, some zero, rows of very different magnitude
    s = torch.exp2(torch.randint(-20, 4, (64, 48), generator=g).double()) * (1 + torch.rand(64, 48, generator=g))
    s[3, 5] = 0.0
    s[7] = 0.0
    s[9] *= 2.0**-40
    wscales = s.bfloat16()
    pw = row_pow2(wscales)
    assert pw is not None and pw.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(pw).round()), pw)  # powers of two
    prod = _products(wscales, pw)
    assert torch.equal(prod.to(torch.float16).double(), prod)  # exact
    assert prod.abs().max() <= 2.0**15


def test_no_folding_when_it_could_not_be_exact() -> None:
    g = torch.Generator().manual_seed(1)
    fp16_scales = (torch.rand(8, 4, generator=g) * 0.01 + 1e-3).half()  # 11 significant bits
    assert row_pow2(fp16_scales) is None
    wide = torch.full((2, 4), 1.0)
    wide[0, 0] = 2.0**-30  # one row spans more binades than fp16 has
    assert row_pow2(wide.bfloat16()) is None


def test_cached_per_tensor_until_modified() -> None:
    s = (torch.rand(4, 2) + 0.5).bfloat16()
    first = row_pow2(s)
    assert row_pow2(s) is first
    s.mul_(1024)
    again = row_pow2(s)
    assert again is not first and torch.equal(again, first / 1024)
