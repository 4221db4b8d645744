"""Scaling benchmark: quantize the FLUX.1-dev-shaped transformer (random weights) on N GPUs.

Run the same command with 1, 2 and 4 processes in one session (same machine) and compare:

    python  benchmarks/quantize_flux_dist.py --device cuda --out out/dist1           # 1 GPU baseline
    torchrun --nproc_per_node 2 benchmarks/quantize_flux_dist.py --device cuda \\
        --out out/dist2 --baseline out/dist1/quantize_flux_dist.json                # efficiency vs 1
    torchrun --nproc_per_node 4 benchmarks/quantize_flux_dist.py --device cuda \\
        --out out/dist4 --baseline out/dist1/quantize_flux_dist.json
    torchrun --nproc_per_node 2 benchmarks/quantize_flux_dist.py --tiny --device cpu  # gloo smoke test

Every rank builds the model with the deterministic init of ``benchmarks/quantize_flux.py``
(build time not counted), creates the same synthetic calibration, then the ranks start together
(barrier) and run :func:`run_quantization` (sharded calibration, input groups split over the
ranks, results all-gathered; per-block resume files written by rank 0 into a fresh
``--state-dir`` when given). Reported: wall time (slowest rank), phase seconds (summed over
ranks: compute, not wall), per-rank peak GPU memory and peak host RSS, the groups each rank
quantized, and a SHA-256 of every quantized tensor (identical across N when the result is
byte-identical). ``--baseline`` adds the scaling efficiency ``T1 / (N · TN)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from converters.quantize import QuantizeOptions, run_quantization, synthetic_calibration  # noqa: E402
from converters.quantize.distributed import init_distributed, rank_device  # noqa: E402
from converters.quantize.memory import host_peak_bytes  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402
from quantize_flux import add_workload_arguments, build_model, workload  # noqa: E402
from svdq_format.io import layer_state  # noqa: E402
from svdq_format.model import svdq_modules  # noqa: E402


def checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the quantized layers' tensors (names sorted; raw bytes)."""
    h = hashlib.sha256()
    for name, layer in sorted(svdq_modules(model).items()):
        h.update(json.dumps(layer.spec.to_json(), sort_keys=True).encode())
        for key, t in sorted(layer_state(name, layer).items()):
            h.update(key.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (rank r uses cuda:LOCAL_RANK) or cpu (gloo)")
    add_workload_arguments(ap, small_help="width-256 config")
    ap.add_argument("--calib-rows", type=int, default=256)
    ap.add_argument("--offload", choices=("auto", "blocks", "none"), default="auto")
    ap.add_argument("--state-dir", default=None, help="per-block resume files (emptied first); default none")
    ap.add_argument("--out", default="out/quantize_flux_dist", help="directory for the JSON report")
    ap.add_argument("--baseline", default=None, help="JSON of the 1-process run: adds scaling efficiency")
    ap.add_argument("--timeout", type=float, default=1200.0, help="collective timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per rank (default: cores / ranks on this host)")
    args = ap.parse_args()

    ctx = init_distributed(args.device, timeout_s=args.timeout)
    world = 1 if ctx is None else ctx.world_size
    rank = 0 if ctx is None else ctx.rank
    device = rank_device(args.device, ctx)
    config, img, txt, config_name = workload(args)
    if args.tiny or args.small:
        torch.set_num_threads(1)  # CPU tests: one thread per rank (a fair 1-vs-N comparison)
    else:  # torchrun sets OMP_NUM_THREADS=1; give each rank its share of the host's cores
        torch.set_num_threads(
            args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    t = time.time()
    model = build_model(config, device, torch.bfloat16, args.seed)
    build_s = time.time() - t
    params = sum(p.numel() for p in model.parameters())
    calib = synthetic_calibration(model, args.samples, seed=args.seed, image_tokens=img, text_tokens=txt, warn=False)
    opts = QuantizeOptions(rank=args.rank, calib_rows=args.calib_rows, seed=args.seed)
    state = Path(args.state_dir) if args.state_dir else None
    if state is not None and rank == 0 and state.exists():
        shutil.rmtree(state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if ctx is not None:
        ctx.all_gather(None, what="start barrier")
    start = time.time()
    result = run_quantization(model, calib, options=opts, device=device,
                              offload={"none": False, "blocks": True}.get(args.offload, "auto"),
                              state_dir=state, progress=rank == 0, dist=ctx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.time() - start
    mine = {"rank": rank, "wall_s": round(wall, 3),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
            "peak_host_rss_bytes": host_peak_bytes(), "phases_s": result.report.timings}
    per_rank = [mine] if ctx is None else ctx.all_gather(mine, what="report")
    if rank != 0:
        ctx.close()  # type: ignore[union-attr]
        return 0
    digest = checksum(result.model)
    rep = result.report
    total = max(r["wall_s"] for r in per_rank)
    out = {
        "benchmark": "quantize_flux_dist",
        "world_size": world,
        "backend": None if ctx is None else ctx.backend,
        "config": config_name,
        "params": params,
        "samples": args.samples,
        "image_tokens": img,
        "text_tokens": txt,
        "options": opts.to_json(),
        "state_dir": args.state_dir,
        "build_s": round(build_s, 2),
        "wall_s": total,
        "phases_rank0_s": rep.timings,
        "groups_per_rank": rep.environment.get("groups_per_rank"),
        "per_rank": per_rank,
        "layers_quantized": len(rep.layers),
        "checksum_sha256": digest,
        "fidelity_summary": rep.summary(),
        "environment": environment_info(device),
    }
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        if base.get("checksum_sha256") != digest:
            print(f"WARNING: checksum differs from the baseline ({base.get('checksum_sha256')})")
        out["baseline_wall_s"] = base["wall_s"]
        out["speedup"] = round(base["wall_s"] / total, 3)
        out["scaling_efficiency"] = round(base["wall_s"] / (world * total), 3)
        out["checksum_matches_baseline"] = base.get("checksum_sha256") == digest
    print()
    print(f"{'rank':>4} {'wall s':>9} {'exchange s':>11} {'peak GPU GiB':>13} {'peak host GiB':>14} {'groups':>7}")
    groups = out["groups_per_rank"] or []
    for r in per_rank:
        g = groups[r["rank"]] if r["rank"] < len(groups) else "-"
        print(f"{r['rank']:>4} {r['wall_s']:>9.1f} {r['phases_s'].get('exchange', 0.0):>11.1f} "
              f"{r['peak_gpu_bytes'] / 2**30:>13.2f} "
              f"{r['peak_host_rss_bytes'] / 2**30:>14.2f} {g:>7}")
    print(f"world {world}: wall {total:.1f}s for {params / 1e9:.2f} B params, {len(rep.layers)} layers; "
          f"sha256 {digest[:16]}")
    if "scaling_efficiency" in out:
        print(f"speedup {out['speedup']:.2f}x vs {out['baseline_wall_s']:.1f}s; "
              f"efficiency {out['scaling_efficiency']:.2f}; "
              f"checksum matches baseline: {out['checksum_matches_baseline']}")
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "quantize_flux_dist.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {Path(args.out) / 'quantize_flux_dist.json'}")
    if ctx is not None:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
