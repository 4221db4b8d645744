"""Per-configuration check of the fast-mode GEMM (bypasses autotuning): error vs the reference
and time for each Triton config and datapath, plus the prologue's lr accuracy.

Usage: ``python benchmarks/gemm_configs.py [--out configs.json]`` on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="configs.json")
    args = ap.parse_args(argv)
    import triton

    from svdq_format import ops
    from svdq_kernels import triton_fast as tf

    torch.backends.cuda.matmul.allow_tf32 = False
    ker = tf._kernels()
    rows = []
    for m, n, k, r in [(64, 3072, 3072, 32), (4608, 3072, 3072, 32), (4608, 3072, 12288, 32)]:
        g = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, k, device="cuda", generator=g)
        x[:, :: k // 16] *= 20
        x = x.bfloat16()
        qweight = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=g)
        wscales = (torch.rand(n, k // 64, device="cuda", generator=g) * 0.004 + 0.001).bfloat16()
        smooth = (torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16()
        down = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).bfloat16()
        up = (torch.randn(n, r, device="cuda", generator=g) * 0.5).bfloat16()
        bias = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16()
        ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8")
        ref0 = ops.reference_linear(x, qweight, wscales, None, smooth, None, None, None, None, "int4", "fp8")
        q, a, lr = tf.prologue(x, smooth, down)
        lr_ref = x.double() @ down.double().T
        lr_err = ((lr.double() - lr_ref).norm() / lr_ref.norm()).item()
        t_pro = triton.testing.do_bench(lambda: tf.prologue(x, smooth, down), warmup=10, rep=50,
                                        return_mode="median")
        wst = wscales.t().contiguous()
        print(f"M={m} N={n} K={k}: prologue {t_pro*1e3:.0f} us, lr rel err {lr_err:.1e}", flush=True)
        for dp in tf.DATAPATHS:
            for cfg in ker["gemm_configs"]:
                bm, bn = cfg.kwargs["BM"], cfg.kwargs["BN"]
                grid = (math.ceil(m / bm) * math.ceil(n / bn),)

                def run(with_lr=True):
                    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                    ker["gemm"].fn[grid](
                        q, a, qweight, wst, lr if with_lr else a, a, up if with_lr else wst,
                        bias if with_lr else wst, y, m, n, k, r if with_lr else 0, 0, 1.0,
                        PACKED=True, F16=dp == "f16", HAS_LR=with_lr, HAS_LRS=False,
                        HAS_BIAS=with_lr, BR=32, BM=bm, BN=bn, GROUP_M=8,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    return y

                try:
                    y = run()
                    y0 = run(False)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    err0 = ((y0.float() - ref0.float()).norm() / ref0.float().norm()).item()
                    t = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
                    tflops = 2 * m * n * k / t / 1e9
                except Exception as exc:  # noqa: BLE001
                    err = err0 = t = tflops = float("nan")
                    print("  failed:", str(exc).splitlines()[0][:200])
                row = dict(M=m, N=n, K=k, datapath=dp, BM=bm, BN=bn, warps=cfg.num_warps,
                           stages=cfg.num_stages, err=err, err_no_lr=err0, ms=t, tflops=tflops,
                           lr_err=lr_err, prologue_ms=t_pro)
                rows.append(row)
                print(f"  {dp:4s} {bm:3d}x{bn:3d} w{cfg.num_warps} s{cfg.num_stages}: err {err:.1e} "
                      f"(no lr {err0:.1e})  {t*1e3:7.0f} us  {tflops:5.0f} TFLOPS", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
