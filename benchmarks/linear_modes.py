"""Every layer kind of the Hopper backend vs cuBLAS bf16, small M to large M (issue 10).

Per (M tokens, K in, N out), in one process on one GPU, each *whole layer* (prologue + GEMM +
low-rank + bias, the backend entry point of :mod:`svdq_kernels.triton_fast`) against
``F.linear`` in bf16 on the same shape:

* ``fast``   — int4 weights (group 64), FP8 per-token activations (the default mode);
* ``exact``  — int4 W4A4, bit-for-bit the reference math (activations int4 per token-group);
* ``w4a16``  — int4 weights, 16-bit activations (AdaLN modulation layers); ``w4a16c`` — the
  same layer on the CUTLASS group-64 GEMM with an fp16 activation operand (experimental);
* ``nvfp4``  — NVFP4 W4A4 (E2M1, e4m3 group-16 scales) and ``nvfp4_w16`` — NVFP4 W4A16.

``--graphs`` times inside CUDA graphs (``do_bench_cudagraph``): no Python launch overhead,
which dominates at small M and is what a CUDA-graphed model sees. ``rel`` is each layer's
relative error against the reference backend on the CPU (M ≤ 64).

    python benchmarks/linear_modes.py --out out/linear_modes.json [--graphs]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (K, N): FLUX.1 — attention/ff projections, and the AdaLN modulation (3072 → 6·3072 / 3·3072)
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]
MODES = ("fast", "exact", "w4a16", "w4a16c", "nvfp4", "nvfp4_w16")


def _bench(fn, graphs: bool) -> float:
    import triton.testing

    fn()  # autotuning and cached scale copies outside the timing (and the capture)
    if graphs:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,7,16,64,256,4608")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--graphs", action="store_true", help="time inside CUDA graphs")
    ap.add_argument("--out", default="linear_modes.json")
    args = ap.parse_args(argv)
    from svdq_format import ops
    from svdq_kernels import cutlass_w4a16
    from svdq_kernels import triton_fast as tf

    modes = [m for m in args.modes.split(",") if m]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    r = args.rank
    rows = []
    for k, n in SHAPES:
        w = (torch.randn(n, k, generator=g, device=dev) * 0.02).bfloat16()
        bias = (torch.randn(n, generator=g, device=dev) * 0.1).bfloat16()
        qweight = torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8)
        wscales = (torch.rand(n, k // 64, generator=g, device=dev) * 0.004 + 0.001).bfloat16()
        fscales = (torch.rand(n, k // 16, generator=g, device=dev) * 2.0).to(torch.float8_e4m3fn)
        wtscale = torch.tensor(0.01, device=dev)
        smooth = (torch.rand(k, generator=g, device=dev) + 0.5).bfloat16()
        down = (torch.randn(r, k, generator=g, device=dev) / k**0.5).bfloat16()
        up = (torch.randn(n, r, generator=g, device=dev) * 0.1).bfloat16()
        calls = {
            "fast": (tf.fast_linear, (qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8")),
            "exact": (tf.exact_linear, (qweight, wscales, None, smooth, down, up, bias, None, "int4", "int4")),
            "w4a16": (tf.w4a16_linear, (qweight, wscales, None, smooth, down, up, bias, None, "int4", "none")),
            "w4a16c": (cutlass_w4a16.w4a16_linear,
                       (qweight, wscales, None, smooth, down, up, bias, None, "int4", "none")),
            "nvfp4": (tf.nvfp4_linear, (qweight, fscales, wtscale, smooth, down, up, bias, None, "nvfp4", "nvfp4")),
            "nvfp4_w16": (tf.nvfp4_linear, (qweight, fscales, wtscale, smooth, down, up, bias, None, "nvfp4", "none")),
        }
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, generator=g, device=dev).bfloat16()
            ms = {"bf16": _bench(lambda: torch.nn.functional.linear(x, w, bias), args.graphs)}
            rel: dict[str, float] = {}
            for mode in modes:
                fn, rest = calls[mode]
                try:
                    ms[mode] = _bench(lambda fn=fn, rest=rest: fn(x, *rest), args.graphs)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other modes
                    print(f"  {mode} M={m} K={k} N={n}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                if m <= 64:
                    ref = ops.reference_linear(x.float().cpu(), *[t.cpu() if isinstance(t, torch.Tensor) else t
                                                                  for t in rest]).float()
                    out = fn(x, *rest).float().cpu()
                    rel[mode] = ((out - ref).norm() / ref.norm()).item()
            speed = {mode: ms["bf16"] / ms[mode] for mode in modes if mode in ms}
            rows.append({"M": m, "K": k, "N": n, "rank": r, "ms": ms, "vs_bf16": speed, "rel_err": rel,
                         "tflops": {key: 2 * m * n * k / (v * 1e-3) / 1e12 for key, v in ms.items()}})
            print(f"M={m:5d} K={k:5d} N={n:5d} | bf16 {ms['bf16'] * 1e3:8.1f} us | "
                  + " ".join(f"{mode} {ms[mode] * 1e3:7.1f} us ({speed[mode]:.2f}x)" for mode in modes if mode in ms)
                  + (" | rel " + " ".join(f"{mo} {v:.1e}" for mo, v in rel.items()) if rel else ""), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "graphs": args.graphs,
            "timing": ("do_bench_cudagraph" if args.graphs else "do_bench median, warmup 25 ms, rep 100 ms")
            + "; vs_bf16 = t_bf16 / t_layer (whole layer: prologue + GEMM + low-rank + bias)"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out} ({meta['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
