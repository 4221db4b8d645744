"""The compiled ``fast8`` layer with the default prologue against the fused one (issue 23, lever 2).

Per FLUX.1 shape at M = 4608 (M tokens × K in → N out), in one process on one GPU, every time
inside CUDA graphs (``do_bench_cudagraph`` median: what a compiled ``reduce-overhead`` model pays):

* ``default``  — what a compiled model runs today (``SVDQ_FAST8_PROLOGUE=inductor``): Inductor's
  quantizer (``ops.graph_fp8_activations``: ``1/s`` from ``svdquant::smooth_reciprocal``) fused
  into the producer of x, then ``svdquant::linear_fp8`` = ``lowrank_tiles`` (x read again) + GEMM;
* ``fused``    — ``SVDQ_FAST8_PROLOGUE=fused``: the producer writes x, then ``svdquant::linear`` =
  ``quantize_lowrank`` (x read for absmax and ``x · L2ᵀ``, then for the codes) + GEMM;
* ``fp8``      — the FP8 rowwise W8A8 peer layer (benchmarks/fast8_vs_fp8.py) with the same producer.

Each with two producers of x: ``x`` (x is the compiled function's input: nothing to fuse the
quantizer into — flatters ``fused``) and ``gelu`` (``x = gelu_tanh(h)`` inside the graph, as before
FLUX's MLP down projection: Inductor fuses the default path's quantizer into it). The parts, alone:
``quant`` (the graph quantizer from x), ``lowrank_tiles``, ``quantize_lowrank`` (and with 128 / 256
columns per step of its codes kernel: ``quantize_lowrank_bk128``, ``_bk256``), ``prologue_plus_tiles``
(the default eager path's prologue + ``lowrank_tiles``), ``gemm`` (the low-rank-k-tile GEMM given its
inputs), ``stats_kernel`` and ``codes_kernel`` (``quantize_lowrank``'s two kernels alone), and the
floors of a prologue that reads x once: ``floor_read_x`` (a compiled row absmax of x: one read) and
``floor_cast_x`` (x cast to e4m3: one read, the codes' bytes written; a one-read kernel with whole rows
per program, timed here in the fifth session, was 2.6× slower than ``quantize_lowrank`` and was removed:
docs/kernels.md, "The fused prologue"); at M ≥ 2048 also ``e4m3_pass`` and ``ss_gemm`` (what the
fused layer runs after its prologue: the pass and the tuned pre-converted kernel) and
``gemm_share_of_fused_layer`` (``ss_gemm`` / the whole compiled layer: one minus it is the share of the
quantization, the low-rank down projection and the pass; issue 23 asks ≤ 10 %). Before timing, the fused path's
inputs are checked bit for bit against the default eager path's (``q``, ``a'``, ``lr``).

    python benchmarks/fast8_prologue.py --out benchmarks/results/fast8_prologue_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast8_vs_fp8 import fp8_rowwise  # noqa: E402

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, random_layer, run_meta  # noqa: E402

#: FLUX.1-dev at 1024 × 1024, 4608 tokens: q|k|v fused (→ 9216), attention out (→ 3072), MLP up
#: (→ 12288) and down (12288 →), single blocks' q|k|v+MLP up (→ 21504) and proj_out (15360 →).
SHAPES = [(4608, 3072, 9216), (4608, 3072, 3072), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 21504),
          (4608, 15360, 3072)]
PRODUCERS = ("x", "gelu")


def measure_shape(m: int, k: int, n: int, rank: int, producers: tuple[str, ...], peers: tuple[str, ...]) -> dict:
    from svdq_format import ops
    from svdq_kernels import cutlass_fast8, lowrank_tiles, triton_prologue
    from svdq_kernels.configs import ss_tuned_config
    from svdq_kernels.weights_e4m3 import e4m3_weights

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    bias = L.bias
    h = L.x * 2.0  # the producer's input

    def svdq(x: torch.Tensor) -> torch.Tensor:
        return ops.svdq_linear(x, L.qweight, L.wscales, None, L.smooth, L.down, L.up, bias,
                               precision="int4", act="fp8w")

    def produce(kind: str, fn):
        if kind == "x":
            return fn, L.x
        return (lambda t: fn(torch.nn.functional.gelu(t, approximate="tanh"))), h

    # the fused path's inputs are the default eager path's, bit for bit
    q0, a0, _ = triton_prologue.prologue(L.x, L.smooth, None)
    lr0, ag0 = lowrank_tiles.lowrank_tiles(L.x, L.down, a0)
    q1, a1, lr1, ag1 = lowrank_tiles.quantize_lowrank(L.x, L.smooth, L.down)
    bits = (torch.equal(q0.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(a0, a1)
            and torch.equal(lr0.view(torch.int16), lr1.view(torch.int16)) and torch.equal(ag0, ag1))

    t: dict[str, float] = {}
    outs = {}
    for kind in producers:
        for setting in ("inductor", "fused"):
            ops.FAST8_PROLOGUE = setting
            torch._dynamo.reset()
            fn, arg = produce(kind, svdq)
            compiled = torch.compile(fn, dynamic=False)
            key = f"{'default' if setting == 'inductor' else 'fused'}_{kind}"
            t[key] = bench(lambda: compiled(arg))
            outs[key] = compiled(arg)
        ops.FAST8_PROLOGUE = "inductor"
        if kind in peers:
            torch._dynamo.reset()
            fn, arg = produce(kind, lambda x: fp8_rowwise(x, L.w8, L.sw, bias))
            peer = torch.compile(fn, dynamic=False)
            t[f"fp8_{kind}"] = bench(lambda: peer(arg))
    # the parts
    torch._dynamo.reset()
    quant = torch.compile(lambda x: ops.graph_fp8_activations(x.float(), L.smooth), dynamic=False)
    t["quant"] = bench(lambda: quant(L.x))
    t["lowrank_tiles"] = bench(lambda: lowrank_tiles.lowrank_tiles(L.x, L.down, a0))
    t["quantize_lowrank"] = bench(lambda: lowrank_tiles.quantize_lowrank(L.x, L.smooth, L.down))
    for bk in (128, 256):  # wider steps of the codes kernel (elementwise: the same codes)
        wide = lowrank_tiles.quantize_lowrank(L.x, L.smooth, L.down, codes_block=bk)
        bits = bits and torch.equal(wide[0].view(torch.uint8), q1.view(torch.uint8))
        t[f"quantize_lowrank_bk{bk}"] = bench(lambda: lowrank_tiles.quantize_lowrank(L.x, L.smooth, L.down,
                                                                                   codes_block=bk))
    # the fused prologue's two kernels alone, and what one read of x costs: a row absmax (read only)
    # and an e4m3 cast (read x, write the codes' bytes) — the floors of a one-read prologue
    stats = lowrank_tiles.quantize_lowrank_stats(L.x, L.smooth, L.down)
    t["stats_kernel"] = bench(lambda: lowrank_tiles.quantize_lowrank_stats(L.x, L.smooth, L.down))
    t["codes_kernel"] = bench(lambda: lowrank_tiles.quantize_lowrank_codes(L.x, stats))
    torch._dynamo.reset()
    read_x = torch.compile(lambda x: x.float().abs().amax(dim=1), dynamic=False)
    t["floor_read_x"] = bench(lambda: read_x(L.x))
    t["floor_cast_x"] = bench(lambda: L.x.to(torch.float8_e4m3fn))
    t["prologue_plus_tiles"] = bench(lambda: lowrank_tiles.lowrank_tiles(
        L.x, L.down, triton_prologue.prologue(L.x, L.smooth, None)[1]))  # the eager default's two steps
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(L.qweight, L.wscales, lowrank_tiles.lowrank_k_tiles(rank))
    l1 = lowrank_tiles.padded_up(L.up, rowinv)
    t["gemm"] = bench(lambda: cutlass_fast8.group64_gemm_lowrank(L.qweight, scales, rowinv, q0, ag0, bias, lr0, l1))
    # what the fused layer runs after its prologue at M >= 2048: the e4m3 pass, the tuned pre-converted kernel
    share = {}
    if m >= cutlass_fast8.SS_MIN_M and cutlass_fast8.WEIGHTS == "e4m3":
        s16, rowinv8 = cutlass_fast8.fast8_weights(L.qweight, L.wscales)
        w8 = e4m3_weights(L.qweight, s16)
        l1w = lowrank_tiles.padded_up64(L.up, rowinv8)
        tuned = ss_tuned_config(m, n=n, k=k, sms=cutlass_fast8._sm_count(None))
        t["e4m3_pass"] = bench(lambda: e4m3_weights(L.qweight, s16))
        t["ss_gemm"] = bench(lambda: cutlass_fast8.ss_gemm_lowrank(w8, rowinv8, q1, ag1, bias, lr1, l1w, config=tuned))
        # the GEMM's share of the whole compiled layer; 1 - share: quantization, low-rank down, the pass
        share = {kind: t["ss_gemm"] / t[f"fused_{kind}"] for kind in producers}
    diffs = {kind: ((outs[f"fused_{kind}"].float() - outs[f"default_{kind}"].float()).norm()
                    / outs[f"default_{kind}"].float().norm()).item() for kind in producers}
    return {"m": m, "k": k, "n": n, "rank": rank, "ms": t, "inputs_bit_equal": bits,
            "fused_vs_default_rel_diff": diffs, "gemm_share_of_fused_layer": share,
            "fused_speedup": {kind: t[f"default_{kind}"] / t[f"fused_{kind}"] for kind in producers},
            "vs_fp8": {f"{p}_{kind}": t[f"fp8_{kind}"] / t[f"{p}_{kind}"] for p in ("default", "fused")
                       for kind in producers if kind in peers}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default="fast8_prologue.json")
    ap.add_argument("--producers", default=",".join(PRODUCERS), help="comma-separated: x, gelu")
    ap.add_argument("--peers", default=",".join(PRODUCERS), help="producers with which to time the FP8 peer too")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True
    producers = tuple(p for p in args.producers.split(",") if p)
    peers = tuple(p for p in args.peers.split(",") if p in producers)

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    rows = []
    for m, k, n in SHAPES[: args.shapes]:
        row = measure_shape(m, k, n, args.rank, producers, peers)
        rows.append(row)
        print(f"{m}x{k}x{n}: " + "  ".join(f"{key} {v * 1e3:.1f}us" for key, v in row["ms"].items())
              + f"  | inputs bit-equal {row['inputs_bit_equal']}, fused vs default {row['fused_vs_default_rel_diff']}",
              flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        torch.cuda.empty_cache()
    print()
    head = "".join(f" {'dflt ' + p:>9} {'fused ' + p:>9} {'fp8 ' + p:>8} {'speedup':>7}" for p in producers)
    nan = float("nan")
    print(f"{'M x K x N':<18}{head} {'quant':>6} {'lr_tiles':>8} {'q+lr':>6} {'bk256':>6} {'eager0':>6} {'gemm':>6} "
          f"{'stats':>6} {'codes':>6} {'read':>6} {'cast':>6} {'pass':>6} {'ss':>6} "
          f"{'share':>5}  "
          "(us; speedup = default / fused; read / cast: one-read floors)")
    for r in rows:
        t = r["ms"]
        cols = "".join(f" {t[f'default_{p}'] * 1e3:9.1f} {t[f'fused_{p}'] * 1e3:9.1f}"
                       f" {t.get(f'fp8_{p}', nan) * 1e3:8.1f} {r['fused_speedup'][p]:7.3f}" for p in producers)
        print(f"{r['m']}x{r['k']}x{r['n']:<8}{cols} {t['quant'] * 1e3:6.1f} {t['lowrank_tiles'] * 1e3:8.1f} "
              f"{t['quantize_lowrank'] * 1e3:6.1f} {t['quantize_lowrank_bk256'] * 1e3:6.1f} "
              f"{t['prologue_plus_tiles'] * 1e3:6.1f} {t['gemm'] * 1e3:6.1f} {t['stats_kernel'] * 1e3:6.1f} "
              f"{t['codes_kernel'] * 1e3:6.1f} {t['floor_read_x'] * 1e3:6.1f} {t['floor_cast_x'] * 1e3:6.1f} "
              f"{t.get('e4m3_pass', nan) * 1e3:6.1f} "
              f"{t.get('ss_gemm', nan) * 1e3:6.1f} {r['gemm_share_of_fused_layer'].get(producers[0], nan):5.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
