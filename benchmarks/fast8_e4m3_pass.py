"""How far a per-call e4m3 weight pass + a dense FP8 GEMM could take the ``fast8`` GEMM (issue 23, lever 5).

At M = 4608 on FLUX.1-dev's six layer shapes, in one process on one GPU, every time inside CUDA
graphs (``do_bench_cudagraph`` median):

* ``fp8_gemm`` — ``torch._scaled_mm`` (per-token / per-row e4m3, bias, fast accumulation) on the
  FP8 peer's own weights, given the quantized activations;
* ``consumer`` — our low-rank GEMM today (int4 converted in the MMA warps; ``q, a', lr, l1`` given);
* ``e4m3_pass`` — :func:`svdq_kernels.weights_e4m3.e4m3_weights` alone (``N·K/2`` bytes of codes
  and ``N·K/32`` of scales read, ``N·K`` written; ``pass_gbs`` is that over its time);
* ``pass_plus_fp8_gemm`` — the pass, then ``_scaled_mm`` on its output with our token and row
  scales: the ``fast8`` GEMM without its low-rank branch if the GEMM ran at cuBLAS's speed on
  pre-converted weights — the bound a shared-memory-sourced kernel with the low-rank k-tiles can
  approach (``bound_vs_consumer`` > 1: the lever pays).

``same_weights`` checks the pass's output against the reference weights
(:func:`svdq_format.packing.fp8_weight_values`) bit for bit.

    python benchmarks/fast8_e4m3_pass.py --out benchmarks/results/fast8_e4m3_pass_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast8_producer import SHAPES, bench_fp8_gemm, lowrank_gemm_inputs  # noqa: E402

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, random_layer, run_meta  # noqa: E402


def measure_shape(m: int, k: int, n: int, rank: int) -> dict:
    """One shape's timings (milliseconds), the pass's bandwidth and the ratios."""
    from svdq_format import packing
    from svdq_kernels import cutlass_fast8
    from svdq_kernels.weights_e4m3 import e4m3_weights

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    bias = L.bias
    t: dict[str, float] = {"fp8_gemm": bench_fp8_gemm(L)}
    q, a, lr, ag, scales, rowinv, l1 = lowrank_gemm_inputs(L)
    t["consumer"] = bench(lambda: cutlass_fast8.group64_gemm_lowrank(L.qweight, scales, rowinv, q, ag, bias, lr, l1))
    s16 = cutlass_fast8.fast8_weights(L.qweight, L.wscales)[0]
    t["e4m3_pass"] = bench(lambda: e4m3_weights(L.qweight, s16))
    a2 = a.reshape(m, 1).float().contiguous()
    r2 = rowinv.reshape(1, n).contiguous()

    def pass_and_gemm() -> torch.Tensor:
        w8 = e4m3_weights(L.qweight, s16)
        return torch._scaled_mm(q, w8.t(), scale_a=a2, scale_b=r2, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    t["pass_plus_fp8_gemm"] = bench(pass_and_gemm)
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(L.qweight.cpu()))
    ref = packing.fp8_weight_values(codes, s16.t().cpu()).to(torch.float8_e4m3fn)
    same = bool(torch.equal(e4m3_weights(L.qweight, s16).cpu().view(torch.uint8), ref.view(torch.uint8)))
    pass_bytes = n * k // 2 + n * k // 32 + n * k
    return {"m": m, "k": k, "n": n, "rank": rank, "ms": t, "same_weights": same,
            "pass_gbs": pass_bytes / (t["e4m3_pass"] * 1e-3) / 1e9,
            "consumer_vs_fp8_gemm": t["fp8_gemm"] / t["consumer"],
            "bound_vs_consumer": t["consumer"] / t["pass_plus_fp8_gemm"],
            "bound_vs_fp8_gemm": t["fp8_gemm"] / t["pass_plus_fp8_gemm"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_e4m3_pass.json")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    rows = []
    print(f"{'M x K x N':<18} {'fp8 gemm':>9} {'consumer':>9} {'pass':>7} {'GB/s':>6} {'pass+fp8':>9} "
          f"{'cons/fp8':>9} {'bound/cons':>11} {'bound/fp8':>10} same   (us; ratios = speed-ups)", flush=True)
    for m, k, n in SHAPES:
        r = measure_shape(m, k, n, args.rank)
        rows.append(r)
        t = r["ms"]
        print(f"{m}x{k}x{n:<8} {t['fp8_gemm'] * 1e3:9.1f} {t['consumer'] * 1e3:9.1f} {t['e4m3_pass'] * 1e3:7.1f} "
              f"{r['pass_gbs']:6.0f} {t['pass_plus_fp8_gemm'] * 1e3:9.1f} {r['consumer_vs_fp8_gemm']:9.3f} "
              f"{r['bound_vs_consumer']:11.3f} {r['bound_vs_fp8_gemm']:10.3f} {r['same_weights']}", flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
