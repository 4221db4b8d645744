"""Memory bounds: peak RSS of validating and loading a multi-GB sharded SVDQuant model.

Generates a Flux-shaped transformer whose SVDQ layers hold random 4-bit codes (no quantizer
run), saves it with ``svdq_format.model.save_pretrained`` in shards, then runs each operation
in a fresh subprocess and reads its peak resident set size (``VmHWM``, reset after the imports
with ``/proc/self/clear_refs``, after a warm-up run of the same operation on a tiny model so
that lazy imports and one-time caches count in the baseline). Reported per operation: peak RSS, the increment above the
import baseline, and that increment divided by the largest shard (streaming operations) or by
the whole model (operations that keep the model in host memory).

Operations:

* ``validate`` — ``svdq validate DIR`` (the CLI, in-process): streams layer by layer.
* ``load_file shard`` — ``svdq_format.checkpoint.load_file`` of the largest shard: holds that shard.
* ``load_pretrained meta`` — ``svdq_format.pretrained.load_pretrained(DIR, device="meta")``: every
  tensor is read and handed onward (here to the meta device, standing in for a GPU), so the
  host holds one tensor at a time.
* ``load_pretrained cpu`` / ``diffusers cpu`` — load into host memory (the model itself stays).

The bound checked: increment ≤ 1.2 × largest shard for the streaming operations.

    PYTHONPATH=. python benchmarks/memory_bounds.py            # ~2.6 GB model, ~1 GB shards
    PYTHONPATH=. python benchmarks/memory_bounds.py --layers 1 --single-layers 1 --shard-size 100MB

Prints a table and writes benchmarks/results/memory_bounds.json (machine, versions, date).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Operations whose increment must stay within BOUND × the largest shard.
STREAMING = ("validate", "load_file shard", "load_pretrained meta")
BOUND = 1.2

__all__ = ["build", "measure", "run_all", "STREAMING", "BOUND"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _run(op: str, path: str, shard: str) -> int:
    """Run one operation; return the bytes of tensors it keeps in host memory."""
    from diffusers import FluxTransformer2DModel

    from svdq_format.checkpoint import load_file
    from svdq_format.cli import main as cli_main
    from svdq_format.pretrained import load_pretrained

    if op == "validate":
        assert cli_main(["validate", path]) == 0
        return 0
    if op == "load_file shard":
        layers = load_file(shard)
        return sum(t.numel() * t.element_size() for m in layers.values() for t in m.state_dict().values())
    if op == "load_pretrained meta":
        model = load_pretrained(path, device="meta")
        assert next(iter(model.state_dict().values())).device.type == "meta"
        return 0
    if op == "load_pretrained cpu":
        model = load_pretrained(path, device="cpu")
    elif op == "diffusers cpu":
        model = FluxTransformer2DModel.from_pretrained(path)
    else:
        raise SystemExit(f"unknown operation {op!r}")
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def child(op: str, path: str, shard: str, warmup: str) -> None:
    """Run one operation after the imports and a warm-up run on a tiny model (so lazy imports
    and one-time caches are in the baseline); print a JSON line with the RSS figures."""
    import gc  # noqa: I001  (svdq_format before diffusers: its import-hook registration path)

    import torch

    import svdq_format  # noqa: F401
    from diffusers import FluxTransformer2DModel  # noqa: F401

    _run(op, warmup, str(max(Path(warmup).glob("*.safetensors"), key=lambda f: f.stat().st_size)))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    kept = _run(op, path, shard)
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_kib": base, "peak_kib": _status_kib("VmHWM"), "kept_bytes": kept,
                      "seconds": seconds, "torch": torch.__version__}))


def build(*, dim: int, layers: int, single_layers: int, rank: int = 32, seed: int = 0) -> Any:
    """A Flux-shaped SVDQuant model: random int4 codes, valid scales, bf16 dense parts."""
    import torch
    from diffusers import FluxTransformer2DModel

    from svdq_format.diffusers import attach_quantizer
    from svdq_format.model import model_metadata, replace_linears
    from svdq_format.spec import LayerSpec

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                       attention_head_dim=128, num_attention_heads=dim // 128, joint_attention_dim=dim,
                                       pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
    specs = {
        name: LayerSpec(kind="w4a4", precision="int4", in_features=m.in_features, out_features=m.out_features,
                        rank=rank, dtype="bfloat16", has_bias=m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 64 == 0 and m.in_features >= 256
    }
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    for t in model.parameters():
        t.data.normal_(0, 0.02, generator=g)
    for layer in replace_linears(model, specs, device="cpu").values():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, generator=g))
        layer.wscales.uniform_(0.005, 0.02, generator=g)
        layer.smooth.uniform_(0.5, 2.0, generator=g)
        layer.lora_down.normal_(0, 0.02, generator=g)
        layer.lora_up.normal_(0, 0.02, generator=g)
        if layer.bias is not None:
            layer.bias.normal_(0, 0.02, generator=g)
    attach_quantizer(model, model_metadata(model))
    return model


def warmup_model(directory: Path) -> Path:
    """A tiny model of the same class for the warm-up run (a few MB)."""
    from svdq_format.model import save_pretrained

    if not (directory / "config.json").is_file():
        save_pretrained(build(dim=256, layers=1, single_layers=1, rank=8, seed=1), directory, max_shard_size="2MB")
    return directory


#: glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, so
#: later tensor buffers come from the heap and freed ones stay resident; this setting pins the
#: threshold at glibc's initial 128 KiB (every tensor buffer is its own mapping, returned on free).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": FIXED_MMAP}


def measure(op: str, path: Path, warmup: Path, *, allocator: str = "glibc default") -> dict[str, Any]:
    """Run ``op`` on the model directory ``path`` in a fresh interpreter; return its figures."""
    shards = sorted(path.glob("*.safetensors"))
    largest = max(shards, key=lambda f: f.stat().st_size)
    total = sum(f.stat().st_size for f in shards)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ALLOCATORS[allocator])
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", op, str(path), str(largest), str(warmup)],
        capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(
            f"{op} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    inc = (r["peak_kib"] - r["baseline_kib"]) * 1024
    streaming = op in STREAMING
    ref = largest.stat().st_size if streaming else total
    return {
        "operation": op, "allocator": allocator, "streams": streaming, "shards": len(shards),
        "largest_shard_mb": round(largest.stat().st_size / 1e6, 1), "model_mb": round(total / 1e6, 1),
        "baseline_mb": round(r["baseline_kib"] * 1024 / 1e6, 1), "peak_rss_mb": round(r["peak_kib"] * 1024 / 1e6, 1),
        "increment_mb": round(inc / 1e6, 1), "kept_mb": round(r["kept_bytes"] / 1e6, 1),
        "ratio_to": "largest shard" if streaming else "model", "ratio": round(inc / ref, 3),
        "peak_over_largest_shard": round(inc / largest.stat().st_size, 3),
        "seconds": round(r["seconds"], 2),
    }


def run_all(path: Path, ops: tuple[str, ...], warmup: Path) -> list[dict[str, Any]]:
    """Every operation with glibc's default allocator settings; the streaming ones also with a
    fixed mmap threshold."""
    rows = [measure(op, path, warmup) for op in ops]
    rows += [measure(op, path, warmup, allocator="mmap threshold 128 KiB") for op in ops if op in STREAMING]
    return rows


def add_model_arguments(parser: argparse.ArgumentParser, *, dim: int, layers: int, single_layers: int,
                        shard_size: str) -> None:
    """The random-code model's options (:func:`build`) and its shard size, with these defaults."""
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--single-layers", type=int, default=single_layers)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--shard-size", default=shard_size)


def write_result(result: dict[str, Any], out: str) -> None:
    """Write a benchmark's JSON result to ``out`` (its folder made) and say so."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("OP", "PATH", "SHARD", "WARMUP"), help=argparse.SUPPRESS)
    add_model_arguments(parser, dim=3072, layers=4, single_layers=8, shard_size="1GB")
    parser.add_argument("--dir", help="keep the generated model here (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_bounds.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from svdq_format.model import save_pretrained

    ops = ("validate", "load_file shard", "load_pretrained meta", "load_pretrained cpu", "diffusers cpu")
    with tempfile.TemporaryDirectory(prefix="svdq-membound-") as tmp:
        d = Path(args.dir) if args.dir else Path(tmp) / "model"
        t0 = time.perf_counter()
        model = build(dim=args.dim, layers=args.layers, single_layers=args.single_layers, rank=args.rank)
        save_pretrained(model, d, max_shard_size=args.shard_size)
        del model
        print(f"generated {d} in {time.perf_counter() - t0:.0f} s")
        rows = run_all(d, ops, warmup_model(Path(tmp) / "warmup"))
    print(f"{'operation':<22} {'allocator':<22} {'shards':>6} {'largest MB':>10} {'model MB':>9} {'peak RSS MB':>11} "
          f"{'+MB':>8} {'ratio':>6} {'to':<14} {'s':>6}")
    for r in rows:
        print(f"{r['operation']:<22} {r['allocator']:<22} {r['shards']:>6} {r['largest_shard_mb']:>10} "
              f"{r['model_mb']:>9} {r['peak_rss_mb']:>11} "
              f"{r['increment_mb']:>8} {r['ratio']:>6} {r['ratio_to']:<14} {r['seconds']:>6}")
    bad = [r["operation"] for r in rows if r["streams"] and r["ratio"] > BOUND]
    print(f"bound (increment <= {BOUND} x largest shard for {', '.join(STREAMING)}): "
          f"{'FAILED: ' + ', '.join(bad) if bad else 'holds'}")
    import diffusers
    import huggingface_hub
    import safetensors
    import torch

    result = {
        "benchmark": "memory_bounds",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__},
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "dir")},
        "bound": BOUND, "bound_holds": not bad,
        "rows": rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
