"""GPTQ's Triton column loop (converters/quantize/gptq_triton.py) checked on the CPU with Triton's
interpreter against the torch loop: the same codes, bit for bit (the GPU runs the same kernel;
tests/test_gptq_gpu.py runs it compiled on a GPU). Skipped without triton or with a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import interpreted_triton

triton = interpreted_triton()

from converters.quantize.residual import gptq_int4, int4_clip_scales  # noqa: E402


@pytest.mark.parametrize("n, k, block", [(40, 192, 128), (17, 128, 64), (8, 320, 128)])
def test_triton_column_loop_equals_the_torch_loop(n, k, block):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(3 * k, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)
    r = torch.randn(n, k, generator=g) * 0.02
    r[:, 5] *= 20  # an outlier channel
    r[3, 64:128] = 0  # an all-zero group: scale 0, codes 0
    h = x.T @ x
    scales = int4_clip_scales(r, h.diagonal(), scale_dtype=torch.float16)
    q_torch, _ = gptq_int4(r, h, scales=scales, block=block, kernel="torch")
    q_triton, _ = gptq_int4(r, h, scales=scales, block=block, kernel="triton")
    codes_torch = q_torch / scales.float().repeat_interleave(64, dim=1).clamp_min(1e-30)
    codes_triton = q_triton / scales.float().repeat_interleave(64, dim=1).clamp_min(1e-30)
    # the same grid values; a code may differ by one where float32 sums round differently
    assert (codes_torch - codes_triton).abs().max() <= 1
    assert (q_torch != q_triton).float().mean() < 0.001
    assert torch.equal(q_triton[3, 64:128], torch.zeros(64))


def test_the_environment_picks_the_column_loop(monkeypatch):
    from converters.quantize import residual

    used = []
    for name in ("_columns_torch", "_columns_triton"):
        real = getattr(residual, name)
        monkeypatch.setattr(residual, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=g)
    r = torch.randn(8, 128, generator=g) * 0.02
    h = x.T @ x
    for env, want in ((None, "_columns_torch"), ("triton", "_columns_triton"), ("torch", "_columns_torch"),
                      ("bogus", "_columns_torch")):  # auto on the CPU: torch; the variable overrides it
        if env is None:
            monkeypatch.delenv("SVDQ_GPTQ_KERNEL", raising=False)
        else:
            monkeypatch.setenv("SVDQ_GPTQ_KERNEL", env)
        used.clear()
        gptq_int4(r, h)
        assert used == [want], env
