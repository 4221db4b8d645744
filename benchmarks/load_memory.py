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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(loader: str, path: str, device: str) -> None:
    import torch

    import svdq_format  # noqa: F401
    from diffusers import FluxTransformer2DModel  # noqa: F401  (imports done before the baseline)
    from svdq_format.model import load_pretrained

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if loader == "diffusers":
        model = FluxTransformer2DModel.from_pretrained(path, device_map=device if device != "cpu" else None)
    else:
        model = load_pretrained(path, device=device)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"baseline_kib": base, "peak_kib": peak, "after_kib": _rss_kib("VmRSS"),
                      "model_bytes": nbytes, "seconds": seconds,
                      "device": str(next(iter(model.state_dict().values())).device),
                      "torch": torch.__version__}))


def build(dim: int, layers: int, single_layers: int, rank: int):
    import torch
    from diffusers import FluxTransformer2DModel

    from svdq_format.diffusers import attach_quantizer
    from svdq_format.model import model_metadata, replace_linears
    from svdq_format.spec import LayerSpec

    heads = dim // 128
    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                       attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=dim,
                                       pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
    specs = {
        name: LayerSpec(kind="w4a4", precision="int4", in_features=m.in_features, out_features=m.out_features,
                        rank=rank, dtype="bfloat16", has_bias=m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 64 == 0 and m.in_features >= 256
    }
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for t in model.parameters():
        t.data.normal_(0, 0.02, generator=g)
    for layer in replace_linears(model, specs, device="cpu").values():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, generator=g))
        layer.wscales.fill_(0.01)
        layer.smooth.fill_(1.0)
        layer.lora_down.normal_(0, 0.02, generator=g)
        layer.lora_up.normal_(0, 0.02, generator=g)
        if layer.bias is not None:
            layer.bias.zero_()
    attach_quantizer(model, model_metadata(model))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "PATH", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--shard-size", default="32MB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from svdq_format.model import save_pretrained, save_single_file

    model = build(args.dim, args.layers, args.single_layers, args.rank)
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
    print(f"{'layout':<13} {'loader':<12} {'files':>5} {'largest MB':>10} {'model MB':>9} {'peak +MB':>9} {'overhead MB':>11} {'s':>6}")
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
