"""The ``fast8`` layer (CUTLASS group-64 int4 × FP8 GEMM) vs its peers at FLUX.1 shapes.

Per shape (M tokens × K in × N out), all measured in one process on one GPU:

* ``bf16``       — cuBLAS bf16 ``F.linear`` (dense weight);
* ``fp8_row``    — torch FP8 rowwise ``_scaled_mm`` with its own per-token activation
  quantization (torch ops); ``fp8_row_gemm`` — the ``_scaled_mm`` call alone;
* ``fast8``      — our whole ``fast8`` layer (prologue + low-rank source + CUTLASS GEMM);
  ``fast8_gemm[<config>]`` — the CUTLASS GEMM alone, every group-64 configuration;
  ``fast8_prologue``, ``fast8_lowrank`` — the other two launches alone;
* the compiled path: ``quant_inductor`` (``ops.graph_fp8_activations`` compiled by Inductor, stand-alone
  — in a model it is fused into the producer of x), ``fast8_given_q`` (the layer given q and a:
  ``lowrank_down`` + low-rank source + GEMM), ``fast8_lowrank_down``;
* ``fast``       — the Triton ``fast`` layer (the previous default), for comparison.

Correctness of the timed layer: max and norm-relative error against the reference
(``act="fp8w"``) evaluated on the CPU in IEEE fp32; the GEMM alone against a float64
emulation on the GPU. Prints a table (µs and TFLOPS, 2·M·N·K flops) and writes JSON.
Usage: ``python benchmarks/fast8_linear.py [--rank 32] [--shapes all|quick|small] [--out f.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_peers import bench as _bench  # noqa: E402  (benchmarks/)
from linear_peers import peer_times, random_layer  # noqa: E402

SHAPES = [  # (M, K, N): FLUX.1 linears at 1024x1024 (4096 image + 512 text tokens)
    (4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
    (4608, 15360, 3072), (4096, 3072, 3072), (256, 3072, 3072), (16, 3072, 12288), (16, 12288, 3072), (16, 3072, 3072),
    (1, 3072, 18432), (1, 3072, 3072),
]
#: One q/k/v projection against the three fused (``fuse_qkv_projections()``), at FLUX's token counts.
QKV_SHAPES = [(m, 3072, n) for m in (4608, 4096, 512) for n in (3072, 9216)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_linear.json")
    ap.add_argument("--shapes", default="all",
                    help="'all', 'quick' (first two), 'small' (M <= 256) or 'qkv' (one projection vs q|k|v fused)")
    ap.add_argument("--no-reference", action="store_true", help="skip the CPU reference check")
    ap.add_argument("--configs", default="default", choices=("default", "all", "lut"),
                    help="GEMM tilings: the prebuilt ones, also configs.GROUP64_CANDIDATES, or the "
                         "ones group64_config picks with and without the table-lookup conversion")
    ap.add_argument("--graphs", action="store_true", help="time inside CUDA graphs (no host launch cost)")
    ap.add_argument("--ms", default="", help="comma-separated M to keep from the chosen shapes (e.g. 1,16)")
    args = ap.parse_args(argv)
    import linear_peers

    linear_peers.GRAPHS = args.graphs

    from svdq_format import ops, packing
    from svdq_kernels import cutlass_fast8, triton_fast, triton_prologue
    from svdq_kernels.build import load_kernel
    from svdq_kernels.configs import AUTO_GROUP64_CONFIGS, GROUP64_CANDIDATES, GROUP64_CONFIGS, group64_config

    torch.manual_seed(0)
    dev = "cuda"
    build_s = {}
    configs = {"default": GROUP64_CONFIGS, "all": GROUP64_CONFIGS + GROUP64_CANDIDATES,
               "lut": AUTO_GROUP64_CONFIGS + tuple(dataclasses.replace(c, lut=False) for c in AUTO_GROUP64_CONFIGS),
               }[args.configs]
    for cfg in configs:  # first use builds (or finds) each kernel
        t0 = time.perf_counter()
        load_kernel(cfg)
        build_s[cfg.name] = round(time.perf_counter() - t0, 2)
    print(f"kernels ready: {build_s}", flush=True)

    quant_graph = torch.compile(lambda x, s: ops.graph_fp8_activations(x.float(), s), dynamic=False)
    shapes = {"all": SHAPES, "quick": SHAPES[:2], "small": [s for s in SHAPES if s[0] <= 256],
              "qkv": QKV_SHAPES}[args.shapes]
    if args.ms:
        keep = {int(v) for v in args.ms.split(",")}
        shapes = [sh for sh in shapes if sh[0] in keep]
    rows = []
    r = args.rank
    for m, k, n in shapes:
        lay = random_layer(m, k, n, r, device=dev)
        x, bias, qweight, wscales, smooth, down, up = (lay.x, lay.bias, lay.qweight, lay.wscales, lay.smooth,
                                                       lay.down, lay.up)
        res: dict[str, float] = peer_times(lay)
        layer8 = (x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8w")
        layer = (x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8")
        res["fast8"] = _bench(lambda: cutlass_fast8.fast8_linear(*layer8))
        res["fast"] = _bench(lambda: triton_fast.fast_linear(*layer))
        s16, rowinv = cutlass_fast8.fast8_weights(qweight, wscales)
        q, a, lr = triton_prologue.prologue(x, smooth, down, lr16=True)
        res["fast8_prologue"] = _bench(lambda: triton_prologue.prologue(x, smooth, down, lr16=True))
        res["fast8_lowrank"] = _bench(lambda: cutlass_fast8.lowrank_source(lr, up, bias, m=m, n=n, device=x.device))
        # the compiled path: the quantizer as Inductor compiles it (stand-alone here; in a model it
        # is fused into the producer of x), then the layer given q and a
        res["quant_inductor"] = _bench(lambda: quant_graph(x, smooth))
        res["fast8_lowrank_down"] = _bench(lambda: triton_prologue.lowrank_down(x, down))
        res["fast8_given_q"] = _bench(lambda: cutlass_fast8.fast8_linear_fp8(x, q, a, *layer8[1:]))
        c = cutlass_fast8.lowrank_source(lr, up, bias, m=m, n=n, device=x.device)
        zero_c = torch.zeros_like(c)
        gemm_err = {}
        # the GEMM alone vs a float64 emulation of its math (same q, a, c)
        codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
        w8v = packing.fp8_weight_values(codes, s16.t()).double() * rowinv.double().unsqueeze(1)
        ref_gemm = (q.double() @ w8v.t()) * a.double().unsqueeze(1) + c.double()
        for cfg in configs:
            if cfg.supports(m=m, n=n, k=k, group=64):
                continue
            key = f"fast8_gemm[{cfg.name}]"
            res[key] = _bench(
                lambda cfg=cfg: cutlass_fast8.group64_gemm(qweight, s16, rowinv, q, a, zero_c, config=cfg))
            out = cutlass_fast8.group64_gemm(qweight, s16, rowinv, q, a, c, config=cfg).double()
            gemm_err[cfg.name] = ((out - ref_gemm).abs().max() / ref_gemm.abs().max()).item()
        best = min((v, key) for key, v in res.items() if key.startswith("fast8_gemm["))
        row = {"M": m, "K": k, "N": n, "rank": r, "config": group64_config(m).name,
               "gemm_max_rel_err_vs_f64": gemm_err, "ms": res,
               "tflops": {key: 2 * m * n * k / v / 1e9 for key, v in res.items()},
               "best_gemm": best[1]}
        if not args.no_reference:
            ref = ops.reference_linear(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in layer8]).float()
            out = cutlass_fast8.fast8_linear(*layer8).float().cpu()
            row["rel_err_vs_reference"] = ((out - ref).norm() / ref.norm()).item()
            row["max_rel_err_vs_reference"] = ((out - ref).abs().max() / ref.abs().max()).item()
        # host (CPU) time per call, launches not waited for: what eager mode pays per layer
        host = {name: linear_peers.host_us(fn) for name, fn in (
            ("fast8", lambda: cutlass_fast8.fast8_linear(*layer8)),
            ("fast8_prologue", lambda: triton_prologue.prologue(x, smooth, down, lr16=True)),
            ("fast8_lowrank", lambda: cutlass_fast8.lowrank_source(lr, up, bias, m=m, n=n, device=x.device)),
            ("fast8_gemm", lambda: cutlass_fast8.group64_gemm(qweight, s16, rowinv, q, a, c)),
            ("bf16", lambda: torch.nn.functional.linear(x, lay.w, bias)))}
        row["host_us_per_call"] = host
        row["speedup_vs_bf16"] = res["bf16"] / res["fast8"]
        row["speedup_vs_fp8_row"] = res["fp8_row"] / res["fast8"]
        row["gemm_speedup_vs_bf16"] = res["bf16"] / best[0]
        row["overhead_frac"] = 1 - best[0] / res["fast8"]
        row["compiled_path_ms"] = res["quant_inductor"] + res["fast8_given_q"]
        row["compiled_path_speedup_vs_bf16"] = res["bf16"] / row["compiled_path_ms"]
        rows.append(row)
        t = row["tflops"]
        gem = " ".join(f"{key[11:-1].split('_c1')[0]}{'+lut' if key.endswith('_lut]') else ''}:{t[key]:.0f}"
                       for key in res if key.startswith("fast8_gemm["))
        print(f"M={m:5d} K={k:5d} N={n:5d} | bf16 {t['bf16']:5.0f} | fp8row {t['fp8_row']:5.0f} (gemm "
              f"{t['fp8_row_gemm']:5.0f}) | fast {t['fast']:4.0f} | fast8 {t['fast8']:5.0f} = "
              f"{row['speedup_vs_bf16']:.2f}x bf16 "
              f"{row['speedup_vs_fp8_row']:.2f}x fp8row | gemm {gem} | prol {res['fast8_prologue']*1e3:.0f}us lowrank "
              f"{res['fast8_lowrank']*1e3:.0f}us ovh {row['overhead_frac']*100:.0f}% | compiled path: quant "
              f"{res['quant_inductor']*1e3:.0f}us + given-q {res['fast8_given_q']*1e3:.0f}us (down "
              f"{res['fast8_lowrank_down']*1e3:.0f}us) = {row['compiled_path_speedup_vs_bf16']:.2f}x bf16 | host us "
              f"{' '.join(f'{k}:{v:.0f}' for k, v in host.items())} | err gemm "
              f"{max(gemm_err.values()):.1e} layer {row.get('max_rel_err_vs_reference', float('nan')):.1e}", flush=True)
    meta = linear_peers.run_meta(kernel_load_seconds=build_s)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out} ({meta['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
