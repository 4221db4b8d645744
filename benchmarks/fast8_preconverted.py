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

``--candidates [NAME,...]``: the other tilings of the pre-converted kernel instead
(:data:`svdq_kernels.configs.SS_LOWRANK_CANDIDATES`: 2 × 1 / 1 × 2 clusters with TMA multicast, 256 × 128,
pingpong; all of them, or the names given), each one found in the kernel cache (never compiled here:
``svdq kernels build --config NAME`` prebuilds them) timed per shape beside ``_scaled_mm`` and today's
large-M kernels (128 × 256 and its stream-K twin, ``pick`` the one the layer runs), with its
output checked against today's pick and today's persistent 128 × 256 kernel bit for bit (``same_bits_*``:
the k-tile order is the same, so persistent tilings must match; stream-K splits sum partial
accumulators) and against the float64 evaluation of its inputs (``rel_err_f64``). ``--smoke``: each
cached candidate once at 4608 × 3072 → 3072, one ``smoke ok NAME`` line per kernel that finished (run it
under ``timeout``: a pipeline hang never returns).

    python benchmarks/fast8_preconverted.py --smoke
    python benchmarks/fast8_preconverted.py --pass-sweep --out fast8_pass_blockings.json   # the e4m3 pass's blockings
    python benchmarks/fast8_preconverted.py --candidates --out fast8_ss_candidates.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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


def cached(config) -> bool:
    """Whether ``config``'s kernel is in the kernel cache for this machine's toolchain (a candidate is
    timed only then: compiling one takes minutes)."""
    from svdq_kernels import build

    key = build.cache_key(config, _toolchain())
    return (build.cache_dir() / f"{config.name}-{key}.so").is_file()


@functools.lru_cache(maxsize=1)
def _toolchain():
    from svdq_kernels import build

    return build.detect_toolchain()


def candidate_configs(names: str) -> list:
    """``"all"``: every :data:`~svdq_kernels.configs.SS_LOWRANK_CANDIDATES`; else the comma-separated names."""
    from svdq_kernels.configs import SS_LOWRANK_CANDIDATES

    if names == "all":
        return list(SS_LOWRANK_CANDIDATES)
    by_name = {c.name: c for c in SS_LOWRANK_CANDIDATES}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"error: not in SS_LOWRANK_CANDIDATES: {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in names.split(",")]


def _ss_inputs(m: int, k: int, n: int, rank: int) -> tuple:
    """``(layer, (w8, rowinv, q, a', bias, lr, l1))``: the pre-converted kernel's operands (seed 0,
    the layer :func:`measure_shape` times)."""
    from svdq_kernels import cutlass_fast8, lowrank_tiles
    from svdq_kernels.weights_e4m3 import e4m3_weights

    torch.manual_seed(0)
    L = random_layer(m, k, n, rank)
    q, _, lr, ag, _, rowinv, _ = lowrank_gemm_inputs(L)
    w8 = e4m3_weights(L.qweight, cutlass_fast8.fast8_weights(L.qweight, L.wscales)[0])
    return L, (w8, rowinv, q, ag, L.bias, lr, lowrank_tiles.padded_up64(L.up, rowinv))


def smoke(configs: list) -> int:
    """Each cached kernel of ``configs`` once (one ``smoke ok|error|skip NAME`` line each, flushed: under
    ``timeout`` the last line names a kernel that hangs)."""
    from svdq_kernels import build, cutlass_fast8

    _, args = _ss_inputs(4608, 3072, 3072, 32)
    for config in configs:
        if not cached(config):
            print(f"smoke skip {config.name} (not in the kernel cache {build.cache_dir()})", flush=True)
            continue
        print(f"smoke start {config.name}", flush=True)
        try:
            build.load_kernel(config)  # alone: no also_build (today's kernels are not needed here)
            out = cutlass_fast8.ss_gemm_lowrank(*args, config=config)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (a benchmark: report and go on)
            print(f"smoke error {config.name} {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        print(f"smoke ok {config.name} finite={bool(out.isfinite().all())}", flush=True)
    return 0


def measure_candidates(m: int, k: int, n: int, rank: int, candidates: list) -> dict:
    """One shape: ``_scaled_mm``, today's pre-converted kernels and each cached candidate (ms, speed-ups
    against ``_scaled_mm`` and today's pick, bits against today's pick and persistent 128 × 256 kernel,
    relative error against float64); ``best``: the fastest kernel within the bound."""
    from svdq_kernels import build, cutlass_fast8
    from svdq_kernels.configs import SS_LOWRANK_CONFIGS, ss_lowrank_config

    L, args = _ss_inputs(m, k, n, rank)
    w8, rowinv, q, ag, bias, lr, l1 = args
    pick = ss_lowrank_config(m, n=n, sms=cutlass_fast8._sm_count(None))
    assert pick is not None, f"M={m}: no pre-converted kernel"
    acc = q.double() @ w8.double().t() + lr.double() @ l1.double().t()
    ref = acc * rowinv.double() * ag.double().unsqueeze(1) + bias.double()
    del acc
    want = {"pick": cutlass_fast8.ss_gemm_lowrank(*args, config=pick),
            "persistent": cutlass_fast8.ss_gemm_lowrank(*args, config=SS_LOWRANK_CONFIGS[0])}
    fp8 = bench_fp8_gemm(L)
    kernels = [pick, *(c for c in SS_LOWRANK_CONFIGS[:2] if c != pick), *candidates]  # [:2]: the large-M tilings
    entries = []
    for config in kernels:
        entry: dict = {"config": config.name, "today": config in SS_LOWRANK_CONFIGS}
        if not entry["today"] and not cached(config):
            entries.append({**entry, "skipped": "not in the kernel cache"})
            continue
        try:
            build.load_kernel(config)
            out = cutlass_fast8.ss_gemm_lowrank(*args, config=config)
            ms = bench(lambda c=config: cutlass_fast8.ss_gemm_lowrank(*args, config=c))
        except Exception as exc:  # noqa: BLE001  (a benchmark: report and go on)
            entries.append({**entry, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
            continue
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        entries.append({**entry, "ms": ms, "vs_fp8_gemm": fp8 / ms,
                        "same_bits_as_pick": bool(torch.equal(out, want["pick"])),
                        "same_bits_as_persistent": bool(torch.equal(out, want["persistent"])),
                        "max_abs_diff_vs_pick": (out.float() - want["pick"].float()).abs().max().item(),
                        "rel_err_f64": rel})
    pick_ms = entries[0]["ms"]
    for e in entries:
        if "ms" in e:
            e["vs_pick"] = pick_ms / e["ms"]
    good = [e for e in entries if "ms" in e and e["rel_err_f64"] < 5e-3]
    best = min(good, key=lambda e: e["ms"])
    return {"m": m, "k": k, "n": n, "rank": rank, "fp8_gemm_ms": fp8, "pick": pick.name, "kernels": entries,
            "best": best["config"], "best_vs_fp8_gemm": fp8 / best["ms"], "best_vs_pick": pick_ms / best["ms"]}


def measure_pass_blockings(k: int, n: int) -> dict:
    """The e4m3 pass on an ``[n, k]`` weight with the first blocking (64 × 256, one group a step: the
    baseline of the ratios) and each of :data:`~svdq_kernels.weights_e4m3.PASS_CANDIDATES`: µs, GB/s
    moved (codes and scales read, e4m3 written), whether it wrote the baseline's bytes, and which one
    :func:`~svdq_kernels.weights_e4m3.default_blocking` picks for this K."""
    from svdq_kernels.weights_e4m3 import PASS_CANDIDATES, PassBlocking, default_blocking, e4m3_weights

    g = torch.Generator(device="cuda").manual_seed(k + n)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, device="cuda", dtype=torch.uint8)
    s16 = (torch.rand(k // 64, n, generator=g, device="cuda") * 0.01 + 1e-3).half()
    first = PassBlocking()
    want = e4m3_weights(qweight, s16, blocking=first).view(torch.uint8)
    moved = n * k // 2 + n * k // 32 + n * k
    entries = []
    for b in dict.fromkeys((first, *PASS_CANDIDATES)):
        if k % b.block_k:
            continue  # (FLUX's K are multiples of 1024: every blocking takes them)
        ms = bench(lambda: e4m3_weights(qweight, s16, blocking=b))
        same = bool(torch.equal(e4m3_weights(qweight, s16, blocking=b).view(torch.uint8), want))
        entries.append({"blocking": dataclasses.asdict(b), "us": ms * 1e3, "gbs": moved / (ms * 1e-3) / 1e9,
                        "same_bytes": same, "default": b == default_blocking(k)})
    return {"k": k, "n": n, "entries": entries}


def _print_candidates(r: dict) -> None:
    print(f"{r['m']}x{r['k']}x{r['n']}: _scaled_mm {r['fp8_gemm_ms'] * 1e3:.1f} us; best {r['best']} "
          f"({r['best_vs_fp8_gemm']:.3f}x _scaled_mm, {r['best_vs_pick']:.3f}x today's pick)", flush=True)
    for e in r["kernels"]:
        if "ms" not in e:
            print(f"  {e['config']:<46} {e.get('skipped') or e.get('error')}", flush=True)
            continue
        mark = "*" if e["config"] == r["pick"] else " "
        print(f" {mark}{e['config']:<46} {e['ms'] * 1e3:8.1f} {e['vs_fp8_gemm']:7.3f} {e['vs_pick']:7.3f}  "
              f"{e['same_bits_as_pick']!s:<5} {e['same_bits_as_persistent']!s:<5} {e['rel_err_f64']:.2e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=None, help="results JSON (default: fast8_preconverted.json, with "
                    "--candidates fast8_ss_candidates.json)")
    ap.add_argument("--candidates", nargs="?", const="all", default=None, metavar="NAME,...",
                    help="time the cached SS_LOWRANK_CANDIDATES (all, or these) beside today's kernels")
    ap.add_argument("--smoke", action="store_true", help="run each cached candidate once and exit")
    ap.add_argument("--pass-sweep", action="store_true",
                    help="time the e4m3 pass's blockings (weights_e4m3.PASS_CANDIDATES) on the shapes' weights, exit")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True

    import svdq_kernels  # noqa: F401  (registers cutlass-sm90)

    if args.smoke:
        return smoke(candidate_configs(args.candidates or "all"))
    if args.pass_sweep:
        out = Path(args.out or "fast8_pass_blockings.json")
        rows = []
        for k, n in dict.fromkeys((k, n) for _, k, n in SHAPES):
            rows.append(measure_pass_blockings(k, n))
            first = rows[-1]["entries"][0]["us"]  # the first blocking, 64 x 256 one group a step
            for e in rows[-1]["entries"]:
                b = e["blocking"]
                print(f"{k}x{n}: {b['block_n']:>4}x{b['block_k']:<5} groups/step {b['groups_per_step']:>2} warps "
                      f"{b['num_warps']}  {e['us']:7.1f} us {e['gbs']:7.0f} GB/s  {first / e['us']:.3f}x  "
                      f"same bytes {e['same_bytes']}{'  (default)' if e['default'] else ''}", flush=True)
            out.write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    if args.candidates is not None:
        candidates = candidate_configs(args.candidates)
        out = Path(args.out or "fast8_ss_candidates.json")
        print(f"{len(candidates)} candidates; per kernel: us, speed-up vs _scaled_mm, vs today's pick (*), same "
              "bits as the pick, as the persistent 128x256 kernel, relative error vs float64", flush=True)
        rows = []
        for m, k, n in SHAPES:
            rows.append(measure_candidates(m, k, n, args.rank, candidates))
            _print_candidates(rows[-1])
            out.write_text(json.dumps({"meta": run_meta(rank=args.rank), "rows": rows}, indent=1) + "\n")
            torch.cuda.empty_cache()
        print(f"wrote {out}")
        return 0
    args.out = args.out or "fast8_preconverted.json"

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
