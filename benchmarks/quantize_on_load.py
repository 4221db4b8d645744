"""Quantizing while loading (``from_pretrained(dense, quantization_config=SVDQuantConfig(...))``) on a
FLUX.1-dev-shaped checkpoint on disk: wall time, peak host RSS, peak GPU memory.

1. Writes (once) a random-weight bf16 ``FluxTransformer2DModel`` as diffusers safetensors shards +
   index + config (``--width 3072 --double 19 --single 38``: the FLUX.1-dev shape, 11.9 B
   parameters, 22.2 GiB; ``benchmarks/quantize_32b.py`` writes it, one shard in memory at a time).
2. Loads it in a fresh child process with ``quantization_config=SVDQuantConfig(precision, rank)``,
   ``torch_dtype=bfloat16`` and, on a GPU, ``device_map=DEVICE``; reports the wall time of
   ``from_pretrained`` (the read and the quantization of each input group timed apart), peak host
   RSS (``VmHWM``, reset after the imports and the CUDA context), peak GPU memory
   (``max_memory_allocated`` / ``max_memory_reserved``), the dense and quantized model bytes and
   the largest block, and the peaks in units of "quantized model + largest block"; writes JSON.
3. ``--extrapolate D,S``: the time of a model of D double + S single blocks of the same width,
   scaled by the quantized parameters (for a source with fewer blocks: the 33 B config on a CPU).

    python benchmarks/quantize_on_load.py --workdir /data/flux1 --write-only    # the FLUX.1-dev shape
    python benchmarks/quantize_on_load.py --src /data/flux1/src --device cuda  # one H100: <= 60 s
    python benchmarks/quantize_on_load.py --src /data/flux1/src --device cuda --cold  # the files read from disk
    python benchmarks/quantize_on_load.py --src /data/flux1/src --device cpu --fast   # host RSS on a CPU
    python benchmarks/quantize_on_load.py --width 5120 --double 1 --single 1 --device cpu --extrapolate 19,38
    python benchmarks/quantize_on_load.py --width 256 --double 1 --single 2 --device cpu    # smoke, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
GIB = 2**30

from quantize_32b import (  # noqa: E402
    add_model_arguments,
    add_source_arguments,
    describe_model,
    flux_config,
    meta_model,
    write_source_unless_given,
)

_CHILD = r"""
import json, resource, sys, time
def status_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
src, device, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import torch
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.init(); torch.zeros(1, device=device)  # the CUDA context belongs to the baseline
import diffusers, svdq_format, converters.quantize.data_free
from diffusers import FluxTransformer2DModel
from diffusers.utils.logging import disable_progress_bar
from svdq_format.diffusers import SVDQuantConfig
from svdq_format.quantize_on_load import OnLoadQuantization
disable_progress_bar()
seconds = {"read": 0.0, "quantize": 0.0}
groups = [0]
real_read, real_quantize = OnLoadQuantization._read, OnLoadQuantization._quantize
def sync():
    if cuda:
        torch.cuda.synchronize()
def read(self, keys, dev):
    t = time.perf_counter(); out = real_read(self, keys, dev); sync(); seconds["read"] += time.perf_counter() - t
    return out
def quantize(self, model, group):
    t = time.perf_counter(); real_quantize(self, model, group); sync()
    seconds["quantize"] += time.perf_counter() - t; groups[0] += 1
OnLoadQuantization._read, OnLoadQuantization._quantize = read, quantize
base = status_kib("VmRSS") * 1024
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
u0 = resource.getrusage(resource.RUSAGE_SELF)
model = FluxTransformer2DModel.from_pretrained(src, quantization_config=SVDQuantConfig(**options),
                                               torch_dtype=torch.bfloat16, device_map=device if cuda else None)
sync()
wall = time.perf_counter() - t0
u1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime
seconds["quantize"] -= seconds["read"]  # _quantize includes its read
state = model.state_dict()
layers = model.config.quantization_config.metadata.layers
out = {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
       "seconds": {k: round(v, 2) for k, v in seconds.items()},
       "groups": groups[0], "layers": len(layers),
       "quantized_params": sum(s.in_features * s.out_features for s in layers.values()),
       "model_bytes": sum(t.numel() * t.element_size() for t in state.values()),
       "base_rss_bytes": base, "hwm_reset": reset, "peak_rss_bytes": status_kib("VmHWM") * 1024,
       "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
       "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
       "gpu": torch.cuda.get_device_name(device) if cuda else None}
print("RESULT " + json.dumps(out), flush=True)
"""


def evict(directory: Path) -> None:
    """Drop the directory's files from the page cache (clean pages; no root needed)."""
    os.sync()
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def planned_params(cfg: dict) -> int:
    """Σ N·K of the layers quantizing while loading would quantize in a model of this config."""
    from converters.quantize.selection import select_layers

    model = meta_model(cfg)
    sel = select_layers(model)
    return sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in sel.kinds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap, width=3072, note=": FLUX.1")
    ap.add_argument("--device", default="cuda", help="cuda (device_map) or cpu")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--fast", action="store_true",
                    help="smoothing=False, clip_search=False, refine_iters=0 (memory, not quality)")
    ap.add_argument("--extrapolate", default=None, metavar="D,S",
                    help="also report the time of D double + S single blocks of this width (scaled by Σ N·K)")
    add_source_arguments(ap, workdir_help="where src/ goes (default: a temp dir, removed)")
    ap.add_argument("--cold", action="store_true",
                    help="evict the source files from the page cache first (posix_fadvise DONTNEED: a read from disk)")
    ap.add_argument("--out", default="out/quantize_on_load", help="JSON output directory")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch


    cfg, params, dense, largest, largest_name = describe_model(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svdq-onload-"))
    src = Path(args.src) if args.src else work / "src"
    written = None
    try:
        written = write_source_unless_given(args, cfg, src)
        if args.write_only:
            print(f"source in {src}")
            return 0
        options = {"precision": args.precision, "rank": args.rank}
        if args.fast:
            options.update(smoothing=False, clip_search=False, refine_iters=0)
        if args.cold:
            evict(src)
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        t = time.time()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), args.device, json.dumps(options)], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        run = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    finally:
        if not args.workdir and not args.src:
            shutil.rmtree(work, ignore_errors=True)
    base, peak, q = run["base_rss_bytes"], run["peak_rss_bytes"], run["model_bytes"]
    on_gpu = args.device.startswith("cuda")
    result = {
        "benchmark": "quantize_on_load", "config": cfg, "parameters": params, "dense_bytes": dense,
        "largest_block": largest_name, "largest_block_bytes": largest, "device": args.device, "options": options,
        "page_cache": "evicted first" if args.cold else "as left (warm after writing)",
        "source_written": written, "child_seconds": round(time.time() - t, 1), "run": run,
        # what memory must hold at least (the quantized model where it lives) vs what the run's peak was
        "host_peak_above_baseline_bytes": peak - base,
        "host_peak_above_baseline_over_dense": round((peak - base) / dense, 3),
        "host_peak_above_baseline_minus_model_over_largest_block":
            None if on_gpu else round((peak - base - q) / largest, 3),
        "gpu_peak_allocated_minus_model_over_largest_block":
            round((run["peak_gpu_allocated_bytes"] - q) / largest, 3) if on_gpu else None,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"from_pretrained + quantize on {args.device}: {run['wall_seconds']} s (reading {run['seconds']['read']} s, "
          f"quantizing {run['seconds']['quantize']} s; {run['layers']} layers in {run['groups']} input groups; "
          f"process CPU time {run['cpu_seconds']} s)")
    print(f"  model {q / GIB:.3f} GiB quantized (dense {dense / GIB:.2f} GiB, largest block {largest / GIB:.3f} GiB)")
    print(f"  host peak RSS {peak / GIB:.3f} GiB, above the import baseline {(peak - base) / GIB:.3f} GiB = "
          f"{(peak - base) / dense:.3f} x dense" + ("" if on_gpu else
          f"; minus the quantized model: {(peak - base - q) / largest:.2f} x largest block"))
    if on_gpu:
        print(f"  GPU peak allocated {run['peak_gpu_allocated_bytes'] / GIB:.2f} GiB (reserved "
              f"{run['peak_gpu_reserved_bytes'] / GIB:.2f} GiB) = model + "
              f"{(run['peak_gpu_allocated_bytes'] - q) / largest:.2f} x largest block; {run['gpu']}")
    if args.extrapolate:
        d, s = (int(x) for x in args.extrapolate.split(","))
        full_cfg = flux_config(args.width, d, s)
        here, full = planned_params(cfg), planned_params(full_cfg)
        est, est_cpu = run["wall_seconds"] * full / here, run["cpu_seconds"] * full / here
        result["extrapolated"] = {"double": d, "single": s, "quantized_params": full,
                                  "measured_quantized_params": here, "wall_seconds": round(est, 1),
                                  "cpu_seconds": round(est_cpu, 1)}
        print(f"  extrapolated to {d} + {s} blocks (x {full / here:.1f} quantized parameters): {est:.0f} s "
              f"= {est / 3600:.2f} h wall, {est_cpu / 3600:.2f} h of process CPU time")
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "quantize_on_load.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
