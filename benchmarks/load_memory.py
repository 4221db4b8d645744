"""Peak host memory while loading an SVDQuant model: sharded vs single file, diffusers vs ours.

Builds a Flux-shaped transformer (random but valid SVDQ tensors, bf16 dense parts), saves it
as a sharded directory, an unsharded directory and a single file, then loads each in a fresh
subprocess and records the peak resident set size (VmHWM, reset after imports) against the
size of the loaded tensors and the largest shard. "overhead" = peak − baseline − model bytes
(what loading needed beyond the model itself); the claim to check: overhead ≲ largest shard.

    PYTHONPATH=. python benchmarks/load_memory.py [--dim 1024 --layers 2 --single-layers 4]

Prints a table and writes benchmarks/results/load_memory.json (device, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_bounds import _status_kib, add_model_arguments, build, write_result  # noqa: E402  (one random-code model builder)


def child(loader: str, path: str, device: str) -> None:
    import torch  # noqa: I001  (svdq_format before diffusers: its import-hook registration path)

    import svdq_format  # noqa: F401
    from diffusers import FluxTransformer2DModel  # noqa: F401  (imports done before the baseline)
    from svdq_format.pretrained import load_pretrained

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if loader == "diffusers":
        model = FluxTransformer2DModel.from_pretrained(path, device_map=device if device != "cpu" else None)
    else:
        model = load_pretrained(path, device=device)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"baseline_kib": base, "peak_kib": peak, "after_kib": _status_kib("VmRSS"),
                      "model_bytes": nbytes, "seconds": seconds,
                      "device": str(next(iter(model.state_dict().values())).device),
                      "torch": torch.__version__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "PATH", "DEVICE"), help=argparse.SUPPRESS)
    add_model_arguments(parser, dim=1024, layers=2, single_layers=4, shard_size="32MB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from svdq_format.model import save_pretrained, save_single_file

    model = build(dim=args.dim, layers=args.layers, single_layers=args.single_layers, rank=args.rank)
    rows = []
    with tempfile.TemporaryDirectory(prefix="svdq-mem-") as tmp:
        layouts = {
            "sharded dir": save_pretrained(model, Path(tmp) / "sharded", max_shard_size=args.shard_size),
            "one-file dir": save_pretrained(model, Path(tmp) / "single"),
            "single file": save_single_file(model, Path(tmp) / "model.safetensors"),
        }
        del model
        for layout, path in layouts.items():
            files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
            largest = max(f.stat().st_size for f in files)
            for loader in ("diffusers", "svdq_format") if path.is_dir() else ("svdq_format",):
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                out = subprocess.run([sys.executable, __file__, "--child", loader, str(path), args.device],
                                     capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                peak_mb = (r["peak_kib"] - r["baseline_kib"]) * 1024 / 1e6
                model_mb = r["model_bytes"] / 1e6
                on_host = r["device"].startswith("cpu")
                rows.append({
                    "layout": layout, "loader": loader, "files": len(files), "device": r["device"],
                    "largest_file_mb": round(largest / 1e6, 1), "model_mb": round(model_mb, 1),
                    "peak_rss_increase_mb": round(peak_mb, 1),
                    "overhead_mb": round(peak_mb - (model_mb if on_host else 0.0), 1),
                    "seconds": round(r["seconds"], 2),
                })
    print(f"{'layout':<13} {'loader':<12} {'files':>5} {'largest MB':>10} {'model MB':>9} {'peak +MB':>9} "
          f"{'overhead MB':>11} {'s':>6}")
    for r in rows:
        print(f"{r['layout']:<13} {r['loader']:<12} {r['files']:>5} {r['largest_file_mb']:>10} {r['model_mb']:>9} "
              f"{r['peak_rss_increase_mb']:>9} {r['overhead_mb']:>11} {r['seconds']:>6}")
    import diffusers
    import huggingface_hub
    import safetensors
    import torch

    result = {
        "benchmark": "load_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__},
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "rows": rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
