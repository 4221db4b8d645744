"""What benchmarks/linear.py and benchmarks/fast8_linear.py share: one random SVDQuant layer of a
FLUX.1 shape, its dense bf16 / FP8 peers, and how they are timed.

* :func:`random_layer` — the layer tensors (packed int4 residual with bf16 group scales,
  smoothing, rank-``r`` low-rank branch, bias) plus a dense bf16 weight and its FP8 rowwise copy;
* :func:`peer_times` — cuBLAS bf16 ``F.linear`` and torch FP8 rowwise ``_scaled_mm`` with its
  own per-token activation quantization (``fp8_row``) and without it (``fp8_row_gemm``);
* :func:`bench` — ``triton.testing.do_bench`` median, warmup 25 ms, rep 100 ms;
* :func:`host_us` — host (CPU) microseconds per call, launches not waited for;
* :func:`run_meta` — the JSON ``meta`` block (GPU, versions, date, how it was timed).
"""

from __future__ import annotations

import types

import torch

#: Time inside CUDA graphs (``triton.testing.do_bench_cudagraph``): GPU time without the host's
#: launch cost — what a compiled model with ``mode="reduce-overhead"`` pays at small M.
GRAPHS = False


def bench(fn) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``, warmup 25 ms, rep 100 ms; in
    CUDA graphs when :data:`GRAPHS`)."""
    import triton

    fn()  # first-use work (kernel loads, JIT, caches, compiles) outside the timing: do_bench sizes
    torch.cuda.synchronize()  # its repetitions from the first calls, which must not include it
    if GRAPHS:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_us(fn, calls: int = 20) -> float:
    """Host (CPU) microseconds per call of ``fn`` with its launches not waited for: what an eager
    model pays per layer when the GPU keeps up."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return us


def run_meta(**extra) -> dict:
    """What a result JSON says about its run: GPU, versions, date, the timing method (see
    :func:`bench`), plus ``extra``."""
    import datetime
    import platform

    import triton

    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": ("triton.testing.do_bench_cudagraph median, rep 100 ms" if GRAPHS else
                   "triton.testing.do_bench median, warmup 25 ms, rep 100 ms") + "; TFLOPS = 2MNK/t",
        **extra,
    }


def quant_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 codes and fp32 scales (``absmax / 448``), as torch ops."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def random_layer(m: int, k: int, n: int, r: int, *, device: str = "cuda") -> types.SimpleNamespace:
    """Random inputs of one ``M × K → N`` layer (see the module doc); fields ``x w bias qweight
    wscales smooth down up w8 sw``."""
    # drawn in the order the two scripts always drew them: the same seed gives the same layer
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, device=device) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = (torch.rand(k, device=device) + 0.5).to(torch.bfloat16)
    down = (torch.randn(r, k, device=device) / k**0.5).to(torch.bfloat16)
    up = (torch.randn(n, r, device=device) * 0.1).to(torch.bfloat16)
    amax = w.abs().amax(dim=1, keepdim=True) / 448
    return types.SimpleNamespace(x=x, w=w, bias=bias, qweight=qweight, wscales=wscales, smooth=smooth, down=down,
                                 up=up, w8=(w / amax).to(torch.float8_e4m3fn), sw=amax.float().T.contiguous())


def peer_times(layer: types.SimpleNamespace) -> dict[str, float]:
    """``{"bf16", "fp8_row", "fp8_row_gemm"}`` → median ms on ``layer`` (:func:`random_layer`)."""
    x, w, bias, w8, sw = layer.x, layer.w, layer.bias, layer.w8, layer.sw

    def fp8_row():
        xq, sx = quant_rowwise(x)
        return torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)

    xq, sx = quant_rowwise(x)
    return {
        "bf16": bench(lambda: torch.nn.functional.linear(x, w, bias)),
        "fp8_row": bench(fp8_row),
        "fp8_row_gemm": bench(lambda: torch._scaled_mm(
            xq, w8.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)),
    }
