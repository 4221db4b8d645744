"""GPTQ's Triton column loop on a GPU (converters/quantize/gptq_triton.py, compiled, not
interpreted): the same codes as the torch loop, and a FLUX-width layer that GPTQ improves.
tests/test_gptq_interpreter.py runs the same kernel under Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from converters.quantize.residual import gptq_int4, int4_clip_scales

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n, k", [(40, 192), (17, 128), (3072, 3072)])
def test_triton_column_loop_equals_the_torch_loop_on_the_gpu(n, k):
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(2 * k, k, generator=g, device="cuda")
    x[:, 5] *= 30  # an outlier channel
    r = torch.randn(n, k, generator=g, device="cuda") * 0.02
    r[3, 64:128] = 0  # an all-zero group: scale 0, codes 0
    h = x.T @ x
    scales = int4_clip_scales(r, h.diagonal(), scale_dtype=torch.bfloat16)
    q_torch, _ = gptq_int4(r, h, scales=scales, kernel="torch")
    q_triton, _ = gptq_int4(r, h, scales=scales, kernel="triton")
    step = scales.float().repeat_interleave(64, dim=1).clamp_min(1e-30)
    # the same grid values; a code may differ by one where float32 sums round differently
    assert ((q_torch - q_triton) / step).abs().max() <= 1
    assert (q_torch != q_triton).float().mean() < 0.001
    assert torch.equal(q_triton[3, 64:128], torch.zeros(64, device="cuda"))
    rtn = torch.clamp(torch.round(r / step), -8, 7) * step
    err = lambda q: float(((x @ (q - r).T).norm() / (x @ r.T).norm()))  # noqa: E731
    assert err(q_triton) < err(rtn)  # GPTQ lowers the output error of plain rounding
