"""The whole ``fast8`` layer against torch's FP8 rowwise layer, compiled, at FLUX.1 shapes (issue 23).

Per shape (M tokens × K in → N out), in one process on one GPU, every time inside CUDA graphs
(``do_bench_cudagraph`` median: GPU time, no host launch cost — what a compiled
``reduce-overhead`` model pays):

* ``bf16``          — cuBLAS ``F.linear`` with bias (dense bf16 weight);
* ``fp8_layer``     — dynamic FP8 rowwise W8A8 as a compiled model runs it: per-token e4m3
  quantization of x (Inductor) + ``torch._scaled_mm`` (per-row e4m3 weights, bias, fast
  accumulation); ``fp8_gemm`` — the ``_scaled_mm`` alone;
* ``svdq_layer``    — the SVDQuant layer (int4, rank 32, ``fast8``) as a compiled model runs it:
  smoothing + per-token e4m3 quantization (Inductor) + ``svdquant::linear_fp8``, with the
  low-rank branch inside the GEMM (``svdq_layer``, :data:`svdq_kernels.cutlass_fast8.LOWRANK_IN_GEMM`)
  and as before (``svdq_layer_two_step``: a cuBLAS GEMM writes ``c = bias + lr · L1ᵀ``, the
  GEMM's epilogue reads it);
* the parts: ``svdq_gemm_ktiles`` (the GEMM with its low-rank k-tiles, given q, a', lr, l1),
  ``svdq_gemm_plain`` (the GEMM reading ``c``), ``lowrank_tiles`` (x · L2ᵀ / a' for the k-tiles),
  ``lowrank_down`` + ``lowrank_source`` (the two-step branch), ``quant`` (the Inductor
  quantizer alone: in a model it is fused into the producer of x).

Overhead of the low-rank branch and the quantization = ``svdq_layer − svdq_gemm_plain + c-read``
is not separable from the GEMM any more once the branch is inside it; the table gives
``(svdq_layer − svdq_gemm_ktiles) / svdq_layer`` (quantizer + low-rank down) and the k-tiles'
cost ``svdq_gemm_ktiles − svdq_gemm_plain`` (negative when dropping ``c``'s read wins).

    python benchmarks/fast8_vs_fp8.py --out benchmarks/results/fast8_vs_fp8_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, random_layer, run_meta  # noqa: E402

#: FLUX.1-dev at 1024 × 1024: single blocks (4608 tokens: fused q|k|v+MLP up 3072 → 21504, proj_out
#: 15360 → 3072), double blocks' image stream (4096 tokens) and the MLP shapes.
SHAPES = [
    (4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504), (4608, 15360, 3072),
    (4096, 3072, 3072), (4096, 3072, 9216), (512, 3072, 3072),
]


def fp8_rowwise(x: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The FP8 peer layer (benchmarks/flux_step.py's ``Fp8RowwiseLinear``)."""
    sx = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    xq = (x.float() / sx).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def measure_shape(m: int, k: int, n: int, rank: int) -> dict:
    """One shape's timings (milliseconds, see the module doc) and ratios."""
    from svdq_format import ops
    from svdq_kernels import cutlass_fast8, lowrank_tiles, triton_prologue

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    x, bias = L.x, L.bias
    fp8_layer = torch.compile(lambda x: fp8_rowwise(x, L.w8, L.sw, bias))

    def svdq(x: torch.Tensor) -> torch.Tensor:
        return ops.svdq_linear(x, L.qweight, L.wscales, None, L.smooth, L.down, L.up, bias,
                               precision="int4", act="fp8w")

    svdq_layer = torch.compile(svdq)
    quant = torch.compile(lambda x: ops.graph_fp8_activations(x.float(), L.smooth))
    q, a = quant(x)
    a = a.reshape(m).float().contiguous()
    t = {}
    t["bf16"] = bench(lambda: torch.nn.functional.linear(x, L.w, bias))
    t["fp8_layer"] = bench(lambda: fp8_layer(x))
    sx = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
    xq = (x.float() / sx).to(torch.float8_e4m3fn)
    t["fp8_gemm"] = bench(lambda: torch._scaled_mm(xq, L.w8.t(), scale_a=sx, scale_b=L.sw, bias=bias,
                                                   out_dtype=torch.bfloat16, use_fast_accum=True))
    t["quant"] = bench(lambda: quant(x))
    outs = {}
    for key, in_gemm in (("svdq_layer", True), ("svdq_layer_two_step", False)):
        cutlass_fast8.LOWRANK_IN_GEMM = in_gemm
        t[key] = bench(lambda: svdq_layer(x))
        outs[key] = svdq_layer(x)
    cutlass_fast8.LOWRANK_IN_GEMM = True
    # the parts
    lr, ag = lowrank_tiles.lowrank_tiles(x, L.down, a)
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(L.qweight, L.wscales, lowrank_tiles.lowrank_k_tiles(rank))
    l1 = lowrank_tiles.padded_up(L.up, rowinv)
    t["lowrank_tiles"] = bench(lambda: lowrank_tiles.lowrank_tiles(x, L.down, a))
    t["svdq_gemm_ktiles"] = bench(lambda: cutlass_fast8.group64_gemm_lowrank(
        L.qweight, scales, rowinv, q, ag, bias, lr, l1))
    s16, rowinv16 = cutlass_fast8.fast8_weights(L.qweight, L.wscales)
    lr16 = triton_prologue.lowrank_down(x, L.down)
    c = cutlass_fast8.lowrank_source(lr16, L.up, bias, m=m, n=n, device=x.device)
    t["lowrank_down"] = bench(lambda: triton_prologue.lowrank_down(x, L.down))
    t["lowrank_source"] = bench(lambda: cutlass_fast8.lowrank_source(lr16, L.up, bias, m=m, n=n, device=x.device))
    t["svdq_gemm_plain"] = bench(lambda: cutlass_fast8.group64_gemm(L.qweight, s16, rowinv16, q, a, c))
    diff = ((outs["svdq_layer"].float() - outs["svdq_layer_two_step"].float()).norm()
            / outs["svdq_layer_two_step"].float().norm()).item()
    return {"m": m, "k": k, "n": n, "rank": rank, "ms": t, "ktiles_vs_two_step_rel_diff": diff,
            "svdq_vs_fp8_layer": t["fp8_layer"] / t["svdq_layer"],
            "two_step_vs_fp8_layer": t["fp8_layer"] / t["svdq_layer_two_step"],
            "overhead_share": (t["svdq_layer"] - t["svdq_gemm_ktiles"]) / t["svdq_layer"],
            "tflops": {key: 2 * m * n * k / (v * 1e-3) / 1e12 for key, v in t.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_vs_fp8.json")
    ap.add_argument("--ms", default="", help="comma-separated M to keep (e.g. 4608)")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    shapes = [s for s in SHAPES if not args.ms or s[0] in {int(v) for v in args.ms.split(",")}]
    rows = []
    for m, k, n in shapes:
        row = measure_shape(m, k, n, args.rank)
        rows.append(row)
        t = row["ms"]
        print(f"{m}x{k}x{n}: " + "  ".join(f"{key} {v * 1e3:.1f}us" for key, v in t.items())
              + f"  | svdq vs fp8 layer {row['svdq_vs_fp8_layer']:.3f}x (two-step {row['two_step_vs_fp8_layer']:.3f}x)"
              + f", overhead {row['overhead_share']:.1%}, k-tiles vs two-step {row['ktiles_vs_two_step_rel_diff']:.1e}",
              flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        torch.cuda.empty_cache()
    print()
    print(f"{'M x K x N':<18} {'bf16':>7} {'fp8 lyr':>8} {'svdq':>8} {'2-step':>8} {'svdq/fp8':>9} "
          f"{'2step/fp8':>10} {'ovh':>6} {'gemm kt':>8} {'gemm pl':>8}  (us; ratios = fp8 time / ours)")
    for r in rows:
        t = r["ms"]
        print(f"{r['m']}x{r['k']}x{r['n']:<8} {t['bf16'] * 1e3:7.1f} {t['fp8_layer'] * 1e3:8.1f} "
              f"{t['svdq_layer'] * 1e3:8.1f} {t['svdq_layer_two_step'] * 1e3:8.1f} {r['svdq_vs_fp8_layer']:9.3f} "
              f"{r['two_step_vs_fp8_layer']:10.3f} {r['overhead_share']:6.1%} {t['svdq_gemm_ktiles'] * 1e3:8.1f} "
              f"{t['svdq_gemm_plain'] * 1e3:8.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
