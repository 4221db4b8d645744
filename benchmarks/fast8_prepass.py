"""The ``fast8`` GEMM two ways at FLUX.1 shapes: our CUTLASS group-64 kernel (int4 → e4m3 in the
mainloop) vs a pre-pass that expands the packed int4 weights to e4m3 plus torch's FP8 rowwise
``_scaled_mm``.

Per shape (M tokens × K in × N out), all in one process on one GPU, GPU times:

* ``bf16``     — (a) cuBLAS ``x @ Wᵀ`` (dense bf16 weight);
* ``g64``      — (b) our :func:`svdq_kernels.cutlass_fast8.group64_gemm`, the GEMM alone with the
  low-rank/bias source ``c`` given (the tile :func:`~svdq_kernels.configs.group64_config` picks);
* ``expand``   — (c) :func:`svdq_kernels.fp8_expand.expand_fp8_weights` alone (``[N, K]`` e4m3 into
  a reused buffer; the same for every M);
* ``scaled_mm`` — (d) ``torch._scaled_mm(q, w8ᵀ, scale_a=a[:, None], scale_b=rowinv[None, :])``
  alone, bf16 out;
* ``alt``      — (e) the whole alternative GEMM: expand + ``_scaled_mm`` + ``y.addmm_(lr16, upsᵀ)``
  (the low-rank add, ``lr16`` bf16 ``[M, 2r]``, ``ups`` bf16 ``[N, 2r]`` as the layer's ``[L1 | L1]``);
* ``lowrank``  — ``c = lr16 · upsᵀ``, the cuBLAS GEMM that makes (b)'s ``c`` in the layer
  (:func:`~svdq_kernels.cutlass_fast8.lowrank_source`), so ``t(alt) / (t(g64) + t(lowrank))`` compares
  the two at the layer's level (both then need only the prologue).

Ratios: ``alt/g64`` = t(e) / t(b) (above 1: the pre-pass route is slower) and ``alt/(g64+lr)``.
Correctness, once per shape: ‖(e) − (b)‖ / ‖(b)‖ (same q, a, rowinv, low-rank terms; must be below
1e-2), and once per weight whether the expanded e4m3 bytes equal
:func:`svdq_format.packing.fp8_weight_values` (evaluated on the GPU). Weights: random int4 codes
packed with :func:`svdq_format.packing.pack_nibbles`, bf16 group scales, then
:func:`~svdq_kernels.cutlass_fast8.fast8_weights`. Only the CUTLASS kernels that
``group64_config`` picks for the chosen M are built (in parallel, on first use).
Also the host time per call (launches not waited for; 20 calls): at small M the eager
alternative is bound by it, ``--graphs`` shows the GPU time alone. Prints a table (µs, TFLOPS =
2·M·N·K / t) and writes JSON.

    python3 benchmarks/fast8_prepass.py --out fast8_prepass.json [--ms 4608,4096,512,256] [--graphs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import linear_peers  # noqa: E402  (benchmarks/: bench, quant_rowwise)

KN = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N), FLUX.1 linears
MS = (4608, 4096, 512, 256)  # 1024² image + text tokens, image alone, and small batches
#: expand_fp8_weights tiles timed with --tune: (block_n, groups, num_warps)
TILES = [(32, 4, 4), (16, 4, 4), (32, 2, 4), (64, 4, 8), (32, 8, 8), (16, 8, 4)]


def _weights(k: int, n: int, r: int, dev: str, gen: torch.Generator):
    """One layer's weights built with the project's helpers: ``(qweight, wscales, scales16, rowinv,
    dense bf16 W, ups [N, 2r])``."""
    from svdq_format import packing
    from svdq_kernels.cutlass_fast8 import fast8_weights

    codes = torch.randint(-8, 8, (n, k), device=dev, generator=gen, dtype=torch.int8)
    qweight = packing.pack_nibbles(packing.int4_to_nibbles(codes))
    wscales = (torch.rand(n, k // 64, device=dev, generator=gen) * 0.004 + 0.001).to(torch.bfloat16)
    scales16, rowinv = fast8_weights(qweight, wscales)
    w = packing.dequantize_int4(packing.int4_to_nibbles(codes), wscales).to(torch.bfloat16)
    up = (torch.randn(n, r, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
    return qweight, wscales, scales16, rowinv, w, torch.cat([up, up], dim=1).contiguous(), codes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts M")
    ap.add_argument("--kn", default="", help="comma-separated KxN to keep (e.g. 3072x3072); default all five")
    ap.add_argument("--rank", type=int, default=32, help="low-rank r (lr16 and ups have 2r columns: [hi | lo])")
    ap.add_argument("--graphs", action="store_true", help="time inside CUDA graphs (no host launch cost)")
    ap.add_argument("--tune", action="store_true", help="also time expand_fp8_weights' other tiles")
    ap.add_argument("--out", default="fast8_prepass.json")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = args.graphs
    bench, quant_rowwise = linear_peers.bench, linear_peers.quant_rowwise

    from svdq_format import packing
    from svdq_kernels import cutlass_fast8
    from svdq_kernels.build import load_kernel
    from svdq_kernels.configs import group64_config
    from svdq_kernels.fp8_expand import expand_fp8_weights

    ms = [int(v) for v in args.ms.split(",")]
    shapes = KN if not args.kn else [tuple(int(v) for v in s.split("x")) for s in args.kn.split(",")]
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    r2 = 2 * args.rank

    # first use builds (or finds in the cache) only the kernels these M use, in parallel
    configs = list({group64_config(m).name: group64_config(m) for m in ms}.values())
    t0 = time.perf_counter()
    load_kernel(configs[0], also_build=configs[1:])
    for cfg in configs[1:]:
        load_kernel(cfg)
    build_s = round(time.perf_counter() - t0, 1)
    print(f"kernels ready in {build_s} s: {[c.name for c in configs]}", flush=True)

    rows = []
    print(f"{'M':>5} {'K':>5} {'N':>5} | TFLOPS: {'bf16':>5} {'g64':>5} {'scmm':>5} {'alt':>5} | us: {'g64':>6} "
          f"{'expand':>6} {'scmm':>6} {'lowrk':>6} {'alt':>6} | {'alt/g64':>7} {'alt/(g64+lr)':>12} | host us: g64 "
          f"exp  alt | rel err")
    for k, n in shapes:
        qweight, _, scales16, rowinv, w, ups, codes = _weights(k, n, args.rank, dev, gen)
        w8 = torch.empty(n, k, device=dev, dtype=torch.float8_e4m3fn)
        scale_b = rowinv[None, :].contiguous()
        expand_ms = bench(lambda: expand_fp8_weights(qweight, scales16, out=w8))
        ref8 = packing.round_to_e4m3(packing.fp8_weight_values(codes, scales16.t()))
        bit_exact = bool(torch.equal(expand_fp8_weights(qweight, scales16, out=w8).view(torch.uint8),
                                     ref8.view(torch.uint8)))
        tiles = {}
        if args.tune:
            for bn, g, nw in TILES:
                tiles[f"{bn}x{64 * g}/w{nw}"] = bench(
                    lambda bn=bn, g=g, nw=nw: expand_fp8_weights(qweight, scales16, out=w8, block_n=bn, groups=g,
                                                                 num_warps=nw))
        expand_bytes = n * k // 2 + n * k + scales16.numel() * 2
        for m in ms:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            q, sx = quant_rowwise(x)  # e4m3 [M, K], fp32 [M, 1]
            a = sx[:, 0].contiguous()
            lr16 = (torch.randn(m, r2, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
            c = lr16 @ ups.t()

            def g64():
                return cutlass_fast8.group64_gemm(qweight, scales16, rowinv, q, a, c)

            def scaled_mm():
                return torch._scaled_mm(q, w8.t(), scale_a=sx, scale_b=scale_b, out_dtype=torch.bfloat16)

            def alt():
                w8e = expand_fp8_weights(qweight, scales16, out=w8)
                y = torch._scaled_mm(q, w8e.t(), scale_a=sx, scale_b=scale_b, out_dtype=torch.bfloat16)
                return y.addmm_(lr16, ups.t())

            res = {
                "bf16": bench(lambda: x @ w.t()),
                "g64": bench(g64),
                "expand": expand_ms,
                "scaled_mm": bench(scaled_mm),
                "lowrank": bench(lambda: lr16 @ ups.t()),
                "alt": bench(alt),
            }
            # host (CPU) time per call, launches not waited for: what eager mode pays per layer
            host = {name: linear_peers.host_us(fn) for name, fn in (
                ("g64", g64), ("expand", lambda: expand_fp8_weights(qweight, scales16, out=w8)),
                ("scaled_mm", scaled_mm), ("lowrank", lambda: lr16 @ ups.t()), ("alt", alt))}
            yb = g64().float()
            rel = ((alt().float() - yb).norm() / yb.norm()).item()
            flops = 2 * m * n * k
            row = {
                "M": m, "K": k, "N": n, "rank": args.rank, "g64_config": group64_config(m).name, "ms": res,
                "tflops": {key: flops / v / 1e9 for key, v in res.items() if key not in ("expand", "lowrank")},
                "alt_over_g64": res["alt"] / res["g64"],
                "alt_over_g64_plus_lowrank": res["alt"] / (res["g64"] + res["lowrank"]),
                "expand_gb_s": expand_bytes / res["expand"] / 1e6,
                "host_us_per_call": host, "rel_err_alt_vs_g64": rel, "rel_err_ok": rel < 1e-2,
                "expand_bit_exact": bit_exact,
            }
            if tiles:
                row["expand_tiles_ms"] = tiles
            rows.append(row)
            t, us = row["tflops"], {key: v * 1e3 for key, v in res.items()}
            print(f"{m:5d} {k:5d} {n:5d} | TFLOPS: {t['bf16']:5.0f} {t['g64']:5.0f} {t['scaled_mm']:5.0f} "
                  f"{t['alt']:5.0f} | us: {us['g64']:6.1f} {us['expand']:6.1f} {us['scaled_mm']:6.1f} "
                  f"{us['lowrank']:6.1f} {us['alt']:6.1f} | {row['alt_over_g64']:7.2f} "
                  f"{row['alt_over_g64_plus_lowrank']:12.2f} | {host['g64']:4.0f} {host['expand']:4.0f} "
                  f"{host['alt']:4.0f} | {rel:.1e}{'' if rel < 1e-2 else ' FAIL'}"
                  f"{'' if bit_exact else ' w8 NOT bit-exact'}", flush=True)
        if tiles:
            best = min(tiles, key=tiles.get)
            print(f"      expand tiles K={k} N={n}: " + " ".join(f"{key}:{v * 1e3:.1f}" for key, v in tiles.items())
                  + f" us (best {best}, {expand_bytes / tiles[best] / 1e6:.0f} GB/s)", flush=True)
    meta = linear_peers.run_meta(kernel_load_seconds=build_s)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    bad = [f"M={row['M']} K={row['K']} N={row['N']}" for row in rows
           if not (row["rel_err_ok"] and row["expand_bit_exact"])]
    print(f"wrote {args.out} ({meta['device']}){'; FAILED checks: ' + ', '.join(bad) if bad else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
