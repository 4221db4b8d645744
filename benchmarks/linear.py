"""SVDQuant linear (fast mode, cutlass-sm90 backend) vs its peers at FLUX.1 shapes.

Per shape (M tokens × K in × N out), all measured in one process on one GPU:

* ``bf16``      — cuBLAS bf16 ``F.linear`` (dense weight);
* ``fp8_row``   — torch FP8 rowwise ``_scaled_mm`` *including* its own per-token activation
  quantization (torch ops); ``fp8_row_gemm`` — the ``_scaled_mm`` call alone;
* ``svdq``      — our whole layer: fused prologue (smooth + FP8 quant + x·L2ᵀ) + int4
  group-64 GEMM with low-rank up projection and bias in the epilogue (rank ``--rank``);
  ``svdq_gemm`` — the GEMM alone; ``svdq_prologue`` — the prologue alone;
* ``svdq_gemm_fp8dp`` — the GEMM on the FP8 datapath ``fp8t`` (FP8 MMA per 64-group, promoted
  with the group scale) instead of the exact fp16 one ``f16t`` (``svdq_gemm``; the layer picks
  by token count, :func:`svdq_kernels.triton_fast.fast_datapath`). (The ``*_w8`` rows of older
  results timed the first, ``[M, N]``-tile kernel on int8 codes: removed with that kernel.)
* ``cutlass_stock`` — the stock CUTLASS int4×FP8 mixed-input kernel (group 128, LUT scales;
  not our math, a speed reference), when it is in the kernel cache (``svdq kernels build``).

Prints a table (ms and TFLOPS, 2·M·N·K flops) and writes JSON with device and versions.
Usage: ``python benchmarks/linear.py [--rank 32] [--out linear.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linear_peers import bench as _bench  # noqa: E402  (benchmarks/)
from linear_peers import peer_times, random_layer  # noqa: E402

SHAPES = [  # (M, K, N): FLUX.1 linears at 1024x1024 (4096 image + 512 text tokens)
    (4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
    (4608, 15360, 3072), (4096, 3072, 3072), (256, 3072, 3072), (16, 3072, 12288),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="linear.json")
    ap.add_argument("--shapes", default="all", help="'all' or 'quick' (first two)")
    args = ap.parse_args(argv)

    import triton

    from svdq_format import ops
    from svdq_kernels import triton_fast, triton_gemm, triton_prologue

    torch.manual_seed(0)
    dev = "cuda"
    stock = None
    try:
        from svdq_kernels.build import build_kernel, detect_toolchain, load_kernel
        from svdq_kernels.configs import DEFAULT_CONFIGS

        cfg = DEFAULT_CONFIGS[0]
        tc = detect_toolchain()
        build_kernel(cfg, toolchain=tc, compiler=lambda cmd, log: (_ for _ in ()).throw(
            RuntimeError("not in the kernel cache (run svdq kernels build)")))
        stock = load_kernel(cfg, toolchain=tc)
    except Exception as exc:  # noqa: BLE001 - the peer is optional
        print(f"[stock CUTLASS peer unavailable: {str(exc).splitlines()[0]}]", file=sys.stderr)

    shapes = SHAPES if args.shapes == "all" else SHAPES[:2]
    rows = []
    r = args.rank
    for m, k, n in shapes:
        lay = random_layer(m, k, n, r, device=dev)
        x, bias, qweight, wscales, smooth, down, up = (lay.x, lay.bias, lay.qweight, lay.wscales, lay.smooth,
                                                       lay.down, lay.up)
        res: dict[str, float] = peer_times(lay)
        layer_args = (x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8")
        res["svdq"] = _bench(lambda: triton_fast.fast_linear(*layer_args))
        q, a, lr = triton_prologue.prologue(x, smooth, down)
        res["svdq_prologue"] = _bench(lambda: triton_prologue.prologue(x, smooth, down))
        res["svdq_gemm"] = _bench(lambda: triton_gemm.gemm(
            q, a, qweight, wscales, lr, up, bias, None, out_dtype=torch.bfloat16))
        res["svdq_gemm_nolr"] = _bench(lambda: triton_gemm.gemm(
            q, a, qweight, wscales, None, None, None, None, out_dtype=torch.bfloat16))
        res["svdq_gemm_fp8dp"] = _bench(lambda: triton_gemm.gemm(
            q, a, qweight, wscales, lr, up, bias, None, out_dtype=torch.bfloat16, datapath="fp8t"))
        # correctness of the timed layer vs the reference, same inputs
        # the reference on the CPU (IEEE fp32): see tests/test_kernels_gpu.py for why not on the GPU
        ref = ops.reference_linear(*[t.cpu() if isinstance(t, torch.Tensor) else t
                                     for t in layer_args]).cuda()
        out = triton_fast.fast_linear(*layer_args)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        out8 = triton_gemm.gemm(q, a, qweight, wscales, lr, up, bias, None,
                                out_dtype=torch.bfloat16, datapath="fp8t")
        rel8 = ((out8.float() - ref.float()).norm() / ref.float().norm()).item()
        if stock is not None and k % 128 == 0:
            lut = torch.full((n, k // 128, 8), 0x38, device=dev, dtype=torch.uint8)  # e4m3 1.0
            res["cutlass_stock"] = _bench(lambda: stock(qweight, lut.view(torch.int64), q, 128))
        flops = 2 * m * n * k
        row = {"M": m, "K": k, "N": n, "rank": r, "datapath": triton_fast.fast_datapath(m),
               "rel_err_vs_reference": rel, "rel_err_fp8_datapath": rel8,
               "ms": res, "tflops": {key: flops / v / 1e9 for key, v in res.items()}}
        row["speedup_vs_bf16"] = res["bf16"] / res["svdq"]
        row["speedup_vs_fp8_row"] = res["fp8_row"] / res["svdq"]
        row["overhead_frac"] = 1 - res["svdq_gemm_nolr"] / res["svdq"]
        rows.append(row)
        t = row["tflops"]
        print(f"M={m:5d} K={k:5d} N={n:5d} | bf16 {t['bf16']:6.0f} | fp8row {t['fp8_row']:6.0f} "
              f"(gemm {t['fp8_row_gemm']:6.0f}) | svdq {t['svdq']:6.0f} (gemm {t['svdq_gemm_nolr']:6.0f} "
              f"fp8dp {t['svdq_gemm_fp8dp']:5.0f}, "
              f"prol {res['svdq_prologue']*1e3:5.0f}us) | stock {t.get('cutlass_stock', float('nan')):6.0f} | "
              f"x bf16 {row['speedup_vs_bf16']:.2f} x fp8 {row['speedup_vs_fp8_row']:.2f} "
              f"ovh {row['overhead_frac']*100:4.1f}% | err {rel:.1e} fp8dp {rel8:.1e}", flush=True)
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms; TFLOPS = 2MNK/t",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out} ({meta['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
