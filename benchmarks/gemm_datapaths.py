"""The Triton GEMM's datapaths side by side at FLUX.1 shapes (H100): time, TFLOPS, agreement.

Datapaths (:data:`svdq_kernels.triton_gemm.DATAPATHS`, :func:`svdq_kernels.triton_gemm.gemm`):
``f16t`` / ``fp8t`` (the int4 weights converted in registers as the MMA's register operand,
tokens its N dimension; every 64-wide K group promoted to fp32 with its weight scale, the group's
MMA in fp16 or FP8) and ``f16s`` (the group scales folded exactly into fp16 weights, one MMA chain
over K: W4A16). Peers in the same run: cuBLAS bf16 (``x @ Wᵀ``) and torch FP8 rowwise
``_scaled_mm`` (GEMM only). ``rel`` is each datapath's relative difference to ``f16t`` (exact
products; checked against the reference in tests/test_kernels_gpu.py). Results of older runs
also list datapaths measured and not adopted (``f16``/``fp8``: the first ``[M, N]``-tile kernel;
``fp8s``: weights rounded to e4m3), removed since (docs/benchmarks.md keeps their numbers).

    python benchmarks/gemm_datapaths.py --out out/gemm_datapaths.json [--no-small-m-splits]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 9216), (15360, 3072)]  # (K, N)


GRAPHS = False


def _bench(fn) -> float:
    import triton.testing

    if GRAPHS:  # GPU time without Python launch overhead (what a CUDA-graphed model sees)
        fn()  # warm caches (scale copies, autotuning) outside the capture
        return float(triton.testing.do_bench_cudagraph(fn, rep=100))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="16,256,4608")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--graphs", action="store_true",
                    help="time inside CUDA graphs (no launch overhead; matters at small M)")
    ap.add_argument("--datapaths", default=None,
                    help="comma list (default: all; f16t is always run: the others are compared with it)")
    ap.add_argument("--split-k", type=int, default=None,
                    help="K parts of the GEMMs (default: the kernel's rule, small-M split-K included)")
    ap.add_argument("--no-small-m-splits", action="store_true",
                    help="time the one-pass kernels at M <= 64 too (no small-M K splits in the GEMM or the prologue)")
    ap.add_argument("--out", default="gemm_datapaths.json")
    args = ap.parse_args(argv)
    global GRAPHS
    GRAPHS = args.graphs
    from svdq_kernels import registry, triton_gemm, triton_prologue

    if args.no_small_m_splits:
        triton_prologue.SMALL_M_SPLITS = False
    paths = list(triton_gemm.DATAPATHS) if not args.datapaths else ["f16t"] + [
        d for d in args.datapaths.split(",") if d != "f16t"]

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for k, n in SHAPES:
        qweight = torch.randint(0, 256, (n, k // 2), generator=g, device=dev, dtype=torch.uint8)
        wscales = (torch.rand(n, k // 64, generator=g, device=dev) * 0.01 + 1e-3).bfloat16()
        w = torch.randn(n, k, generator=g, device=dev).bfloat16()
        w8 = w.float().div(w.float().abs().amax(dim=1, keepdim=True) / 448).to(torch.float8_e4m3fn)
        sw = torch.ones(1, n, device=dev)
        up = (torch.randn(n, args.rank, generator=g, device=dev) * 0.02).bfloat16()
        bias = torch.randn(n, generator=g, device=dev).bfloat16()
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, generator=g, device=dev).bfloat16()
            down = (torch.randn(args.rank, k, generator=g, device=dev) * 0.02).bfloat16()
            smooth = torch.ones(k, device=dev).bfloat16()
            q, a, lr = triton_prologue.prologue(x, smooth, down)
            q16 = q.to(torch.float16)  # what prologue(codes16=True) writes for f16s (not timed in the GEMM)
            xq = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
            sx = torch.ones(m, 1, device=dev)
            res = {"bf16": _bench(lambda: x @ w.t()),
                   "fp8_row_gemm": _bench(lambda: torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=sw,
                                                                   out_dtype=torch.bfloat16)),
                   "prologue": _bench(lambda: triton_prologue.prologue(x, smooth, down))}
            outs = {}
            for dp in paths:
                def run(dp=dp):
                    codes = q16 if dp == "f16s" else q
                    return triton_gemm.gemm(codes, a, qweight, wscales, lr, up, bias, None,
                                            out_dtype=torch.bfloat16, datapath=dp, split_k=args.split_k)
                outs[dp] = run().float()
                res[dp] = _bench(run)
            base = outs["f16t"]
            rel = {dp: ((o - base).norm() / base.norm()).item() for dp, o in outs.items()}
            flops = 2 * m * n * k
            tf = {key: flops / (ms * 1e-3) / 1e12 for key, ms in res.items()}
            best = min(paths, key=lambda d: res[d])
            row = {"M": m, "K": k, "N": n, "ms": res, "tflops": tf, "rel_vs_f16t": rel, "best": best,
                   "best_layer_vs_bf16": res["bf16"] / (res[best] + res["prologue"])}
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d} | bf16 {tf['bf16']:6.0f} fp8row {tf['fp8_row_gemm']:6.0f} | "
                  + " ".join(f"{dp} {tf[dp]:5.0f}" for dp in paths)
                  + f" | prologue {res['prologue'] * 1e3:6.1f} us | best {best}: "
                    f"layer {row['best_layer_vs_bf16']:.2f}x bf16"
                  + " | rel " + " ".join(f"{dp} {rel[dp]:.1e}" for dp in paths if dp != "f16t"),
                  flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "split_k": args.split_k, "small_m_splits": triton_prologue.small_m_splits(),
            "experimental": registry.experimental_kernels(),
            "timing": ("triton.testing.do_bench_cudagraph" if args.graphs else
                       "triton.testing.do_bench mean ms (its default), warmup 25 ms, rep 100 ms") + "; TFLOPS = 2MNK/t"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
