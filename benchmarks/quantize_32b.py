"""Peak host memory of ``svdq quantize --offload disk`` on a FLUX-config transformer scaled to ~32 B
parameters, against its largest block.

1. Writes a random-weight bf16 ``FluxTransformer2DModel`` (default: width 5120 = 40 heads × 128,
   19 double + 38 single blocks) as safetensors shards + ``index.json`` + ``config.json`` that
   diffusers loads, tensor by tensor: the model only ever exists on the meta device, the writer
   holds one shard.
2. Runs ``svdq quantize SRC OUT --offload disk`` (optionally ``--gpus N``) in a fresh child
   process and reports its peak RSS (``VmHWM``, reset after the imports), each rank's ``VmHWM``
   (``--gpus N``: polled from /proc every 0.05 s), the import-only baseline (RSS once torch, CUDA
   and the quantizer are initialised, nothing loaded), the largest block's bytes, peak / largest
   block (absolute and above the baseline) and the wall time; writes JSON.

    python benchmarks/quantize_32b.py --workdir /data/q32b --write-only       # the 33 B source (62 GiB)
    python benchmarks/quantize_32b.py --src /data/q32b/src --out out/q32b1     # 1 GPU
    python benchmarks/quantize_32b.py --src /data/q32b/src --out out/q32b4 --gpus 4
    python benchmarks/quantize_32b.py --device cpu --width 256 --double 2 --single 4 --fast   # CPU smoke

``--src DIR`` reuses a source written before (``--write-only`` writes it and stops).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# Peaks are VmHWM (the process's own high-water mark), reset after the imports (clear_refs 5) so
# import transients do not count; ru_maxrss of an exec'd child would include its parent's RSS.
_CHILD = """
import sys
def status_kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
device = sys.argv[1]
import torch
if device.startswith("cuda"):
    torch.cuda.init(); torch.zeros(1, device=device)  # the CUDA context belongs to the baseline
from svdq_format.cli import main
import diffusers, converters.quantize.directory  # the baseline: everything imported, nothing loaded
print("BASE_RSS_KIB", status_kib("VmRSS"))
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    print("HWM_RESET 1")
except OSError:
    print("HWM_RESET 0")
code = main(sys.argv[2:]) if len(sys.argv) > 2 else 0
print("PEAK_RSS_KIB", status_kib("VmHWM"))
sys.exit(code)
"""


def flux_config(width: int, double: int, single: int) -> dict:
    """FLUX.1 config with ``width`` (heads of 128) and the given block counts."""
    if width % 128:
        raise SystemExit(f"--width {width} must be a multiple of 128")
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=width // 128, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def meta_model(cfg: dict):
    """The model on the meta device, in bf16 (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)


def block_bytes(model) -> tuple[int, int, str]:
    """(total bytes, largest block bytes, largest block name) of the state dict."""
    sizes: dict[str, int] = {}
    total = 0
    for key, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        total += n
        m = re.match(r"((?:single_)?transformer_blocks\.\d+)\.", key)
        if m:
            sizes[m.group(1)] = sizes.get(m.group(1), 0) + n
    name = max(sizes, key=sizes.get)
    return total, sizes[name], name


def add_model_arguments(ap: argparse.ArgumentParser, *, width: int, note: str = "") -> None:
    """The synthetic FLUX's shape options: ``--width`` (default ``width``), ``--double``, ``--single``."""
    ap.add_argument("--width", type=int, default=width, help=f"inner dim, a multiple of 128 (default {width}{note})")
    ap.add_argument("--double", type=int, default=19, help="double-stream blocks (default 19)")
    ap.add_argument("--single", type=int, default=38, help="single-stream blocks (default 38)")


def add_source_arguments(ap: argparse.ArgumentParser, *, workdir_help: str) -> None:
    """The options of the source checkpoint a run writes or reuses, and of its child process."""
    ap.add_argument("--shard-size", default="5GB", help="source shard size (default 5GB, like FLUX.1-dev's)")
    ap.add_argument("--src", default=None, help="reuse this source directory (written by an earlier run)")
    ap.add_argument("--workdir", default=None, help=workdir_help)
    ap.add_argument("--write-only", action="store_true", help="write the source and stop")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child (CPU runs)")


def describe_model(args: argparse.Namespace) -> tuple[dict, int, int, int, str]:
    """The FLUX config of ``args`` and its sizes, printed: (config, parameters, bf16 bytes, largest block's
    bytes, largest block's name)."""
    cfg = flux_config(args.width, args.double, args.single)
    model = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    total, largest, largest_name = block_bytes(model)
    del model
    print(f"FLUX config width {args.width}, {args.double} + {args.single} blocks: {params:,} parameters, "
          f"{total / GIB:.2f} GiB bf16, largest block {largest_name} {largest / GIB:.3f} GiB", flush=True)
    return cfg, params, total, largest, largest_name


def write_source_unless_given(args: argparse.Namespace, cfg: dict, src: Path) -> dict | None:
    """Write the random source checkpoint of ``cfg`` into ``src`` unless ``--src`` names one; what
    :func:`write_source` returns (``None``: reused)."""
    from svdq_format.model import parse_size

    if args.src:
        return None
    print(f"writing {src} ...", flush=True)
    return write_source(cfg, src, shard_bytes=parse_size(args.shard_size))


def random_tensor(key: str, like, seed: int):
    """The deterministic random value of one tensor (as benchmarks/quantize_flux.py initialises)."""
    import torch

    t = torch.empty(like.shape, dtype=like.dtype)
    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(key.encode()))
    if t.dim() >= 2:
        t.normal_(0.0, 0.02, generator=g)
    elif key.endswith("weight"):
        t.fill_(1.0)
    else:
        t.normal_(0.0, 0.01, generator=g)
    return t


def write_source(cfg: dict, directory: Path, *, shard_bytes: int, seed: int = 0) -> dict:
    """Write the random model as diffusers shards, one shard in memory at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model = meta_model(cfg)
    model.save_config(directory)
    state = model.state_dict()
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    weight_map = {}
    t0 = time.time()
    for i, keys in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # normal_ releases the GIL
            tensors = dict(zip(keys, pool.map(lambda k: random_tensor(k, state[k], seed), keys)))
        save_file(tensors, os.fspath(directory / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: name for k in keys})
        print(f"  wrote {name} ({i}/{len(shards)}, {time.time() - t0:.0f} s)", flush=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(shards), "seconds": round(time.time() - t0, 1)}


def _tree(pid: int) -> list[int]:
    """``pid``'s descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(device: str, argv: list[str], threads: int | None) -> dict:
    """``svdq ARGV`` in a fresh process; its own peak RSS, its children's (ranks) and per-rank VmHWM."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, device, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hwm: dict[int, int] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in _tree(proc.pid):
                v = _hwm_kib(pid)
                if v is not None:
                    hwm[pid] = max(hwm.get(pid, 0), v)
            stop.wait(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    secs = time.time() - t
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)

    def kib(tag: str) -> int:
        got = [int(line.split()[1]) for line in out.splitlines() if line.startswith(tag + " ")]
        return got[-1] * 1024 if got else -1

    ranks = sorted((v * 1024 for v in hwm.values() if v > 50_000), reverse=True)  # python processes, not helpers
    return {"peak_rss_bytes": kib("PEAK_RSS_KIB"), "base_rss_bytes": kib("BASE_RSS_KIB"),
            "hwm_reset_after_imports": "HWM_RESET 1" in out,
            "rank_vmhwm_bytes_polled": ranks, "seconds": round(secs, 1), "exit": proc.returncode,
            "stdout_tail": out[-1500:], "stderr_tail": err[-1500:] if proc.returncode else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap, width=5120)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=1, help="svdq quantize --gpus N (processes)")
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (synthetic)")
    ap.add_argument("--calib-rows", type=int, default=256)
    ap.add_argument("--fast", action="store_true",
                    help="--no-smoothing --no-clip-search --refine 0 --lowrank randomized (memory, not quality)")
    ap.add_argument("--out-shard-size", default="10GB", help="svdq quantize --max-shard-size (default 10GB)")
    ap.add_argument("--keep", action="store_true", help="keep the written source and output")
    add_source_arguments(ap, workdir_help="where src/ and quantized/ go (default: a temp dir)")
    ap.add_argument("--out", default="out/quantize_32b", help="JSON output directory")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch


    cfg, params, total, largest, largest_name = describe_model(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="svdq-32b-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.workdir and not args.write_only:  # a directory we made goes at exit; a named one stays
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    src = Path(args.src) if args.src else work / "src"
    written = write_source_unless_given(args, cfg, src)
    if args.write_only:
        print(f"source in {src}")
        return 0
    out_dir = work / "quantized"
    shutil.rmtree(out_dir, ignore_errors=True)
    fast = ["--no-smoothing", "--no-clip-search", "--refine", "0", "--lowrank", "randomized"] if args.fast else []
    argv = ["quantize", str(src), str(out_dir), "--offload", "disk", "--device", args.device, "--dtype", "bfloat16",
            "--num-samples", str(args.samples), "--calib-rows", str(args.calib_rows),
            "--max-shard-size", args.out_shard_size, "-q", *fast]
    if args.gpus > 1:
        argv += ["--gpus", str(args.gpus)]
    base = run_child(args.device, [], args.threads)
    print(f"import baseline (torch{' + CUDA' if args.device.startswith('cuda') else ''} + quantizer, RSS after "
          f"the imports): {base['base_rss_bytes'] / GIB:.3f} GiB", flush=True)
    run = run_child(args.device, argv, args.threads)
    # each rank's own VmHWM since its imports and CUDA context (the CLI resets it; fidelity.json
    # memory_per_rank); the child's and the polled values are kept for comparison
    fid = out_dir / "fidelity.json"
    per_rank = json.loads(fid.read_text())["environment"].get("memory_per_rank", []) if fid.is_file() else []
    peak = max((m["peak_host_rss_bytes"] for m in per_rank), default=run["peak_rss_bytes"])
    b = base["base_rss_bytes"]
    out_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) if out_dir.is_dir() else 0
    result = {
        "benchmark": "quantize_32b", "config": cfg, "parameters": params, "model_bf16_bytes": total,
        "largest_block": largest_name, "largest_block_bytes": largest, "device": args.device, "gpus": args.gpus,
        "samples": args.samples, "calib_rows": args.calib_rows, "fast": args.fast,
        "source_written": written, "import_baseline_rss_bytes": b, "run": run, "memory_per_rank": per_rank,
        "peak_rss_bytes": peak, "peak_over_largest_block": round(peak / largest, 3),
        "peak_above_baseline_over_largest_block": round((peak - b) / largest, 3),
        "output_bytes": out_bytes, "wall_seconds": run["seconds"],
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"svdq quantize --offload disk{' --gpus ' + str(args.gpus) if args.gpus > 1 else ''}: exit {run['exit']}, "
          f"{run['seconds']} s, output {out_bytes / GIB:.2f} GiB")
    print(f"  peak RSS {peak / GIB:.3f} GiB = {peak / largest:.2f} x largest block; above baseline "
          f"{(peak - b) / GIB:.3f} GiB = {(peak - b) / largest:.2f} x largest block")
    for m in per_rank:
        print(f"  rank {m['rank']}: host {m['peak_host_rss_bytes'] / GIB:.3f} GiB, "
              f"GPU {m['peak_gpu_bytes'] / GIB:.2f} GiB")
    if args.gpus > 1:
        print(f"  launcher {run['peak_rss_bytes'] / GIB:.3f} GiB; ranks' VmHWM (polled, since start, largest first): "
              f"{[round(v / GIB, 3) for v in run['rank_vmhwm_bytes_polled']]} GiB")
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "quantize_32b.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep and not args.src:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if run["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
