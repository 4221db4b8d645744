"""The producer conversion against the consumer conversion and torch's FP8 rowwise GEMM (issue 23, lever 1).

At M = 4608 on FLUX.1-dev's six layer shapes, in one process on one GPU, every time inside CUDA
graphs (``do_bench_cudagraph`` median):

* ``fp8_gemm``  — ``torch._scaled_mm`` (per-token / per-row e4m3, bias, fast accumulation), given
  the quantized activations; ``fp8_layer`` — the same with its own activation quantization,
  compiled (benchmarks/fast8_vs_fp8.py's peer);
* ``consumer`` / ``producer`` — our low-rank GEMM (``Group64GemmConfig.lowrank``: the FP8 k-tiles
  and the low-rank k-tiles, epilogue with the bias) given ``q, a', lr, l1``, on the tiling the
  automatic selection picks (``group64_config``: 128 × 256, or its stream-K twin when the waves
  would run part-empty), with the consumer conversion (today's kernel: RS wgmmas) and with the
  producer conversion (``convert="producer"``: SS wgmmas on an e4m3 tile the producer
  warpgroup wrote); ``consumer_128x256`` / ``producer_128x256`` and ``…_sk``: both tilings forced;
  ``producer_128x256_pc3``: a three-slot converted ring (``PRODUCER_CONVERT_CANDIDATES``);
  ``probe_128x256`` / ``probe_128x256_sk``: the producer kernels with the conversion skipped
  (``PRODUCER_CONVERT_PROBES``, wrong results): their time if the conversion were free — how much
  of the gap to ``fp8_gemm`` is the converter warps' and how much the rest of the kernel's;
* ``svdq_layer`` / ``svdq_layer_producer`` — the compiled SVDQuant layer (quantizer in the graph,
  ``svdquant::linear_fp8`` with the low-rank k-tiles) with ``cutlass_fast8.CONVERT`` consumer /
  producer (``--no-layer`` skips them).

Each shape also checks that both conversions give the same bits (``equal``).

    python benchmarks/fast8_producer.py --out benchmarks/results/fast8_producer_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast8_vs_fp8 import fp8_rowwise  # noqa: E402

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, random_layer, run_meta  # noqa: E402

#: FLUX.1-dev's layer shapes at 1024 × 1024 (M tokens × K in → N out): single blocks' fused
#: q|k|v+MLP up and proj_out, double blocks' q/k/v/out, MLP up and MLP down, and the MLP's 9216.
SHAPES = [(4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
          (4608, 15360, 3072), (4608, 3072, 9216)]


def bench_fp8_gemm(L) -> float:
    """Milliseconds of ``torch._scaled_mm`` on the FP8 peer's weights (per-token / per-row e4m3, bias,
    fast accumulation), the activations given quantized."""
    sx = L.x.abs().amax(dim=-1, keepdim=True).float() / 448.0
    xq = (L.x.float() / sx).to(torch.float8_e4m3fn)
    return bench(lambda: torch._scaled_mm(xq, L.w8.t(), scale_a=sx, scale_b=L.sw, bias=L.bias,
                                          out_dtype=torch.bfloat16, use_fast_accum=True))


def lowrank_gemm_inputs(L) -> tuple[torch.Tensor, ...]:
    """``(q, a, lr, a', scales, rowinv, l1)``: what our low-rank GEMM takes for the random layer ``L``."""
    from svdq_format import ops
    from svdq_kernels import cutlass_fast8, lowrank_tiles

    m, rank = L.x.shape[0], L.down.shape[0]
    q, a = ops.quantize_fp8_rows(ops.smoothed(L.x.float(), L.smooth, 0.0))
    lr, ag = lowrank_tiles.lowrank_tiles(L.x, L.down, a.reshape(m).float().contiguous())
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(L.qweight, L.wscales, lowrank_tiles.lowrank_k_tiles(rank))
    return q, a, lr, ag, scales, rowinv, lowrank_tiles.padded_up(L.up, rowinv)


def measure_shape(m: int, k: int, n: int, rank: int, *, layer: bool) -> dict:
    """One shape's timings (milliseconds) and ratios (``fp8 time / ours``)."""
    from svdq_format import ops
    from svdq_kernels import cutlass_fast8
    from svdq_kernels.configs import (
        PRODUCER_CONVERT_CANDIDATES,
        PRODUCER_CONVERT_CONFIGS,
        PRODUCER_CONVERT_PROBES,
        group64_config,
    )

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    x, bias = L.x, L.bias
    t: dict[str, float] = {}
    fp8_layer = torch.compile(lambda x: fp8_rowwise(x, L.w8, L.sw, bias))
    t["fp8_layer"] = bench(lambda: fp8_layer(x))
    t["fp8_gemm"] = bench_fp8_gemm(L)
    q, a, lr, ag, scales, rowinv, l1 = lowrank_gemm_inputs(L)

    def gemm(config):
        return lambda: cutlass_fast8.group64_gemm_lowrank(L.qweight, scales, rowinv, q, ag, bias, lr, l1, config=config)

    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    auto = group64_config(m, n=n, sms=sms, lowrank=True)
    equal = {}
    for pc in PRODUCER_CONVERT_CONFIGS:
        cc = dataclasses.replace(pc, convert="consumer")
        suffix = "_sk" if pc.scheduler == "streamk" else ""
        t[f"consumer_128x256{suffix}"] = bench(gemm(cc))
        t[f"producer_128x256{suffix}"] = bench(gemm(pc))
        equal[pc.name] = bool(torch.equal(gemm(pc)(), gemm(cc)()))
        if cc == auto:
            t["consumer"], t["producer"] = t[f"consumer_128x256{suffix}"], t[f"producer_128x256{suffix}"]
    for pc in PRODUCER_CONVERT_CANDIDATES:
        t[f"producer_128x256_pc{pc.convert_slots}"] = bench(gemm(pc))
        equal[pc.name] = bool(torch.equal(gemm(pc)(), gemm(dataclasses.replace(pc, convert="consumer"))()))
    for probe in PRODUCER_CONVERT_PROBES:
        key = "probe_128x256" + ("_sk" if probe.scheduler == "streamk" else "")
        t[key] = bench(gemm(probe))
        if dataclasses.replace(probe, convert="consumer", convert_probe=False) == auto:
            t["probe"] = t[key]
    if layer:
        def svdq(x: torch.Tensor) -> torch.Tensor:
            return ops.svdq_linear(x, L.qweight, L.wscales, None, L.smooth, L.down, L.up, bias,
                                   precision="int4", act="fp8w")

        svdq_layer = torch.compile(svdq)
        for key, convert in (("svdq_layer", "consumer"), ("svdq_layer_producer", "producer")):
            cutlass_fast8.CONVERT = convert
            t[key] = bench(lambda: svdq_layer(x))
        cutlass_fast8.CONVERT = "consumer"
    row = {"m": m, "k": k, "n": n, "rank": rank, "auto_tiling": auto.name, "ms": t, "equal": equal,
           "producer_vs_consumer": t["consumer"] / t["producer"],
           "producer_vs_fp8_gemm": t["fp8_gemm"] / t["producer"], "consumer_vs_fp8_gemm": t["fp8_gemm"] / t["consumer"],
           "tflops": {key: 2 * m * n * k / (v * 1e-3) / 1e12 for key, v in t.items()}}
    if layer:
        row["layer_producer_vs_fp8_layer"] = t["fp8_layer"] / t["svdq_layer_producer"]
        row["layer_consumer_vs_fp8_layer"] = t["fp8_layer"] / t["svdq_layer"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_producer.json")
    ap.add_argument("--no-layer", action="store_true", help="time the GEMMs only (no compiled layers)")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    rows = []
    for m, k, n in SHAPES:
        row = measure_shape(m, k, n, args.rank, layer=not args.no_layer)
        rows.append(row)
        print(f"{m}x{k}x{n} ({row['auto_tiling']}): "
              + "  ".join(f"{key} {v * 1e3:.1f}us" for key, v in row["ms"].items())
              + f"  | equal {all(row['equal'].values())}", flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        torch.cuda.empty_cache()
    print()
    layer = not args.no_layer
    print(f"{'M x K x N':<18} {'fp8 gemm':>9} {'consumer':>9} {'producer':>9} {'prod/cons':>10} {'cons/fp8':>9} "
          f"{'prod/fp8':>9} {'probe':>8} {'p 128x256':>10} {'p sk':>8} {'p pc3':>8}"
          + (f" {'fp8 lyr':>8} {'lyr c/fp8':>10} {'lyr p/fp8':>10}" if layer else "")
          + "  equal   (us; ratios = speed-ups)")
    for r in rows:
        t = r["ms"]
        line = (f"{r['m']}x{r['k']}x{r['n']:<8} {t['fp8_gemm'] * 1e3:9.1f} {t['consumer'] * 1e3:9.1f} "
                f"{t['producer'] * 1e3:9.1f} {r['producer_vs_consumer']:10.3f} {r['consumer_vs_fp8_gemm']:9.3f} "
                f"{r['producer_vs_fp8_gemm']:9.3f} {t['probe'] * 1e3:8.1f} {t['producer_128x256'] * 1e3:10.1f} "
                f"{t['producer_128x256_sk'] * 1e3:8.1f} {t['producer_128x256_pc3'] * 1e3:8.1f}")
        if layer:
            line += (f" {t['fp8_layer'] * 1e3:8.1f} {r['layer_consumer_vs_fp8_layer']:10.3f} "
                     f"{r['layer_producer_vs_fp8_layer']:10.3f}")
        print(line + f"  {all(r['equal'].values())}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
