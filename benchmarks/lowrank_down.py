"""The low-rank down projection of the compiled ``fast8`` path (``triton_prologue.lowrank_down``):
its tilings vs cuBLAS (``torch.mm(x, L2ᵀ, out_dtype=float32)`` + the hi/lo split) and vs the
memory floor (reading ``x`` once), at FLUX.1 shapes, on one GPU.

Each variant's output is compared with the default tiling's (bits equal when the K split is
the same; otherwise the fp32 summation order differs: max relative difference printed).

    python benchmarks/lowrank_down.py [--graphs] [--out lowrank_down.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4608, 3072), (4608, 12288), (4608, 15360), (4096, 3072), (512, 3072), (16, 3072)]  # (M, K)
HBM_BYTES_PER_S = 3.35e12  # H100 SXM peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--graphs", action="store_true", help="time inside CUDA graphs")
    ap.add_argument("--out", default="lowrank_down.json")
    args = ap.parse_args(argv)
    import triton

    from svdq_kernels import triton_prologue

    def bench(fn) -> float:
        fn()
        torch.cuda.synchronize()
        if args.graphs:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    torch.manual_seed(0)
    r = args.rank
    rows = []
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        down = (torch.randn(r, k, device="cuda") / k**0.5).to(torch.bfloat16)
        base = triton_prologue.lowrank_down(x, down)
        res: dict[str, dict] = {}
        for bm, warps, stages, gps in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (None, 4, 16)):
            if bm == 128 and warps == 4:
                continue
            name = f"bm{bm}_w{warps}_s{stages}_g{gps or 'd'}"
            def fn(bm=bm, warps=warps, stages=stages, gps=gps):
                return triton_prologue.lowrank_down(x, down, block_m=bm, num_warps=warps, num_stages=stages,
                                                groups_per_split=gps)
            try:
                out = fn()
            except Exception as exc:  # a tiling Triton cannot compile (shared memory): recorded
                res[name] = {"error": str(exc).splitlines()[0][:200]}
                continue
            diff = ((out.float() - base.float()).abs().max() / base.float().abs().max()).item()
            res[name] = {"ms": bench(fn), "max_rel_diff_vs_default": diff}
        l2t = down.t().contiguous()

        def cublas():
            lr = torch.mm(x, l2t, out_dtype=torch.float32)
            hi = lr.to(torch.bfloat16)
            return torch.cat([hi, (lr - hi.float()).to(torch.bfloat16)], dim=1)
        try:
            res["cublas_mm_fp32_out+split"] = {"ms": bench(cublas)}
        except Exception as exc:
            res["cublas_mm_fp32_out+split"] = {"error": str(exc).splitlines()[0][:200]}
        timed = {n: v["ms"] for n, v in res.items() if "ms" in v}
        best = min(timed, key=timed.get)
        floor_ms = m * k * 2 / HBM_BYTES_PER_S * 1e3
        default = "bm32_w4_s3_gd"
        rows.append({"M": m, "K": k, "rank": r, "variants": res, "best": best, "floor_ms": floor_ms})
        print(f"M={m:5d} K={k:5d}: default {timed[default] * 1e3:7.1f} us | best {best} {timed[best] * 1e3:7.1f} us | "
              f"cuBLAS+split {timed.get('cublas_mm_fp32_out+split', float('nan')) * 1e3:7.1f} us | "
              f"floor {floor_ms * 1e3:6.1f} us", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": ("do_bench_cudagraph" if args.graphs else "do_bench") + " median",
            "floor": f"M*K*2 bytes at {HBM_BYTES_PER_S / 1e12} TB/s"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
