"""The pre-converted ``fast8`` GEMM (issue 23, lever 5; ``SVDQ_FAST8_WEIGHTS=e4m3``) against today's
consumer kernel and cuBLAS's FP8 GEMM.

At M = 4608 on FLUX.1-dev's layer shapes, in one process on one GPU, every time inside CUDA graphs
(``do_bench_cudagraph`` median), rank 32, with bias:

* ``fp8_gemm`` — ``torch._scaled_mm`` (per-token / per-row e4m3, bias, fast accumulation, bf16 out)
  on the FP8 peer's own weights, given the quantized activations;
* ``consumer`` — our low-rank GEMM today (int4 converted in the MMA warps; ``q, a', lr, l1`` given);
* ``e4m3_pass`` — :func:`svdq_kernels.weights_e4m3.e4m3_weights` alone (``N·K/2`` bytes of codes and
  ``N·K/32`` of scales read, ``N·K`` written);
* ``ss`` — the pre-converted kernel alone (:class:`svdq_kernels.configs.SsLowrankGemmConfig`, the
  automatic tiling: a dense SS FP8 mainloop with the low-rank k-tiles and our epilogue) on the pass's
  output;
* ``pass_plus_ss`` — the pass, then the kernel: what ``SVDQ_FAST8_WEIGHTS=e4m3`` runs per layer call
  (``vs_consumer`` > 1: the lever pays; ``vs_fp8_gemm``: against cuBLAS's dense FP8 GEMM).

``same_bits``: the pre-converted kernel's output equals the consumer kernel's bit for bit.

    python benchmarks/fast8_preconverted.py --out benchmarks/results/fast8_preconverted_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast8_producer import bench_fp8_gemm, lowrank_gemm_inputs  # noqa: E402

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, random_layer, run_meta  # noqa: E402

#: (M, K, N): FLUX.1-dev's q/k/v/out, fused q|k|v, MLP up, MLP down, 15360 → and → 15360 (issue 23's
#: list), and the single blocks' fused q|k|v + MLP up (3072 → 21504; benchmarks/fast8_producer.py).
SHAPES = [(4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072),
          (4608, 3072, 15360), (4608, 15360, 3072), (4608, 3072, 21504)]


def measure_shape(m: int, k: int, n: int, rank: int) -> dict:
    """One shape's timings (milliseconds) and ratios (speed-ups)."""
    from svdq_kernels import cutlass_fast8, lowrank_tiles
    from svdq_kernels.weights_e4m3 import e4m3_weights

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    bias = L.bias
    t: dict[str, float] = {"fp8_gemm": bench_fp8_gemm(L)}
    q, _, lr, ag, scales, rowinv, l1 = lowrank_gemm_inputs(L)
    t["consumer"] = bench(lambda: cutlass_fast8.group64_gemm_lowrank(L.qweight, scales, rowinv, q, ag, bias, lr, l1))
    s16 = cutlass_fast8.fast8_weights(L.qweight, L.wscales)[0]
    t["e4m3_pass"] = bench(lambda: e4m3_weights(L.qweight, s16))
    w8 = e4m3_weights(L.qweight, s16)
    l1w = lowrank_tiles.padded_up64(L.up, rowinv)
    t["ss"] = bench(lambda: cutlass_fast8.ss_gemm_lowrank(w8, rowinv, q, ag, bias, lr, l1w))
    t["pass_plus_ss"] = bench(lambda: cutlass_fast8.ss_gemm_lowrank(e4m3_weights(L.qweight, s16), rowinv, q, ag,
                                                                    bias, lr, l1w))
    same = bool(torch.equal(cutlass_fast8.ss_gemm_lowrank(w8, rowinv, q, ag, bias, lr, l1w),
                            cutlass_fast8.group64_gemm_lowrank(L.qweight, scales, rowinv, q, ag, bias, lr, l1)))
    sms = cutlass_fast8._sm_count(None)
    config = cutlass_fast8.ss_lowrank_config(m, n=n, sms=sms)
    return {"m": m, "k": k, "n": n, "rank": rank, "ms": t, "same_bits": same,
            "config": config.name if config else None,
            "consumer_config": cutlass_fast8.group64_config(m, n=n, sms=sms, lowrank=True).name,
            "consumer_vs_fp8_gemm": t["fp8_gemm"] / t["consumer"],
            "ss_vs_fp8_gemm": t["fp8_gemm"] / t["ss"],
            "vs_consumer": t["consumer"] / t["pass_plus_ss"],
            "vs_fp8_gemm": t["fp8_gemm"] / t["pass_plus_ss"],
            "pass_gbs": (n * k // 2 + n * k // 32 + n * k) / (t["e4m3_pass"] * 1e-3) / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_preconverted.json")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    rows = []
    print(f"{'M x K x N':<18} {'fp8 gemm':>9} {'consumer':>9} {'pass':>7} {'ss':>7} {'pass+ss':>8} "
          f"{'cons/fp8':>9} {'ss/fp8':>7} {'(pass+ss)/cons':>15} {'(pass+ss)/fp8':>14} same   "
          "(us; ratios = speed-ups)", flush=True)
    for m, k, n in SHAPES:
        r = measure_shape(m, k, n, args.rank)
        rows.append(r)
        t = r["ms"]
        print(f"{m}x{k}x{n:<8} {t['fp8_gemm'] * 1e3:9.1f} {t['consumer'] * 1e3:9.1f} {t['e4m3_pass'] * 1e3:7.1f} "
              f"{t['ss'] * 1e3:7.1f} {t['pass_plus_ss'] * 1e3:8.1f} {r['consumer_vs_fp8_gemm']:9.3f} "
              f"{r['ss_vs_fp8_gemm']:7.3f} {r['vs_consumer']:15.3f} {r['vs_fp8_gemm']:14.3f} {r['same_bits']}",
              flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
