"""The W4A16 GEMV (``svdq_kernels.triton_gemv``) against the transposed ``f16s`` GEMM at a few tokens.

FLUX.1-dev's AdaLN modulations at batch 1 are int4 weight-only layers with one token: 3072 → 18432
(the double blocks' two ``norm1`` linears), 3072 → 9216 (the single blocks') and 3072 → 6144
(``norm_out``). Their time is their weight bytes over the memory bandwidth. Per shape and M, inside
CUDA graphs (``do_bench_cudagraph`` median), rank 32 with bias, the weights of ``copies`` layers
cycled so that they come from HBM and not the 50 MB L2 (as in a step):

* ``gemm`` — :func:`svdq_kernels.triton_gemm.gemm` on ``f16s`` (what W4A16 layers ran before);
* ``gemv`` — :func:`svdq_kernels.triton_gemv.gemv` with its default blocking, then each of
  :data:`~svdq_kernels.triton_gemv.GEMV_CANDIDATES`.

µs per layer call, GB/s of weight codes and scales read, the speed-up over ``gemm``, and the largest
relative difference from ``gemm``'s output.

    python benchmarks/w4a16_gemv.py --out benchmarks/results/w4a16_gemv_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, run_meta  # noqa: E402

#: (N, K): FLUX.1-dev's AdaLN modulation linears.
SHAPES = [(18432, 3072), (9216, 3072), (6144, 3072)]


def measure(n: int, k: int, m: int, rank: int, copies: int) -> dict:
    from svdq_kernels import triton_gemm, triton_gemv, triton_prologue

    g = torch.Generator(device="cuda").manual_seed(n + m)
    layers = []
    for _ in range(copies):
        qweight = torch.randint(0, 256, (n, k // 2), generator=g, device="cuda", dtype=torch.uint8)
        wscales = (torch.rand(n, k // 64, generator=g, device="cuda") * 0.004 + 0.001).bfloat16()
        up = (torch.randn(n, rank, generator=g, device="cuda") * 0.5).bfloat16()
        bias = (torch.randn(n, generator=g, device="cuda") * 0.1).bfloat16()
        layers.append((qweight, wscales, up, bias))
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    smooth = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16()
    down = (torch.randn(rank, k, generator=g, device="cuda") / k**0.5).bfloat16()
    q, a, lr = triton_prologue.prologue(x, smooth, down, w16=True)

    def run_gemm():
        for qw, ws, up, b in layers:
            triton_gemm.gemm(q, a, qw, ws, lr, up, b, None, out_dtype=torch.bfloat16, datapath="f16s")

    def run_gemv(blocking):
        def fn():
            for qw, ws, up, b in layers:
                triton_gemv.gemv(q, a, qw, ws, lr, up, b, None, out_dtype=torch.bfloat16, blocking=blocking)
        return fn

    qw, ws, up, b = layers[0]
    want = triton_gemm.gemm(q, a, qw, ws, lr, up, b, None, out_dtype=torch.float32, datapath="f16s")
    moved = n * k // 2 + n * k // 64 * 2
    base = bench(run_gemm) / copies
    rows = [{"kernel": "gemm f16s", "us": base * 1e3, "gbs": moved / (base * 1e-3) / 1e9, "speedup": 1.0}]
    default = triton_gemv.default_gemv_blocking(m)
    for blk in dict.fromkeys((default, *triton_gemv.GEMV_CANDIDATES)):
        ms = bench(run_gemv(blk)) / copies
        got = triton_gemv.gemv(q, a, qw, ws, lr, up, b, None, out_dtype=torch.float32, blocking=blk)
        diff = ((got - want).norm() / want.norm()).item()
        rows.append({"kernel": "gemv", "blocking": dataclasses.asdict(blk), "default": blk == default,
                     "us": ms * 1e3, "gbs": moved / (ms * 1e-3) / 1e9, "speedup": base / ms, "rel_diff_vs_gemm": diff})
    return {"n": n, "k": k, "m": m, "rank": rank, "copies": copies, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--ms", default="1,2", help="comma-separated token counts")
    ap.add_argument("--copies", type=int, default=8, help="layers cycled per timing (weights out of L2)")
    ap.add_argument("--out", default="w4a16_gemv.json")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True
    import svdq_kernels  # noqa: F401

    results = []
    for n, k in SHAPES:
        for m in (int(v) for v in args.ms.split(",")):
            r = measure(n, k, m, args.rank, args.copies)
            results.append(r)
            for e in r["rows"]:
                b = e.get("blocking")
                name = "gemm f16s" if b is None else f"gemv {b['block_n']:>2}x{b['block_k']:<4} w{b['num_warps']}"
                diff = f"  diff {e['rel_diff_vs_gemm']:.1e}" if b else ""
                print(f"{k}->{n} M={m}: {name:<18} {e['us']:7.1f} us {e['gbs']:6.0f} GB/s {e['speedup']:6.2f}x"
                      f"{diff}{'  (default)' if e.get('default') else ''}", flush=True)
            meta = run_meta(rank=args.rank, copies=args.copies)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
            torch.cuda.empty_cache()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
