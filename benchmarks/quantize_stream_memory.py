"""Peak host memory of ``svdq quantize`` with the model loaded vs read from its shards (``--offload disk``).

Writes a random-weight FLUX-shaped transformer (bf16, sharded safetensors) to a temporary
directory, then runs ``svdq quantize`` on the CPU in a fresh process per mode and reports each
process's peak RSS (``ru_maxrss``), the bf16 model size, the largest block and a Python+torch
baseline (a process that only imports the quantizer), plus whether the checkpoints are equal.
Peaks are each process's own ``VmHWM`` (``ru_maxrss`` of a child also counts its parent's RSS
at the fork).

    python benchmarks/quantize_stream_memory.py                      # width 1024, 4 + 8 blocks
    python benchmarks/quantize_stream_memory.py --width 512 --double 2 --single 4   # quicker
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# VmHWM (this process's own high-water mark), not ru_maxrss: an exec'd child's ru_maxrss starts at
# its parent's RSS at the fork (Linux keeps the larger of the two in the signal struct)
_CHILD = """
import sys
def hwm_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
from svdq_format.cli import main
import diffusers, converters.quantize.directory  # the baseline: everything imported, nothing loaded
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print("PEAK_RSS_KIB", hwm_kib())
sys.exit(code)
"""


def child_peak(argv: list[str]) -> tuple[int, float, int]:
    """Run ``svdq ARGV`` in a fresh process (no args: just the imports); returns (its own peak
    RSS (VmHWM) in bytes, seconds, exit code)."""
    t = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    kib = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    return (kib[-1] * 1024 if kib else -1), time.time() - t, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024, help="inner dim (heads of 128)")
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--shard-size", default="50MB")
    ap.add_argument("--out", default="out/quantize_stream_memory")
    ap.add_argument("--fast", action="store_true",
                    help="--no-smoothing --no-clip-search --refine 0 (memory, not quality, is measured)")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quantize_flux import build_model

    heads = args.width // 128
    cfg = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
               attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=args.width,
               pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    tmp = Path(tempfile.mkdtemp(prefix="svdq-stream-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~1.5 GB of checkpoints
    model = build_model(cfg, "cpu", torch.bfloat16, 0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters())
                      for lst in (model.transformer_blocks, model.single_transformer_blocks) for b in lst)
    model.save_pretrained(tmp / "src", max_shard_size=args.shard_size)
    del model
    fast = ["--no-smoothing", "--no-clip-search", "--refine", "0", "--lowrank", "randomized"] if args.fast else []
    common = [*fast, "--rank", "16", "--num-samples", "2", "--calib-rows", "64", "--alphas", "0.5", "--device", "cpu",
              "--dtype", "bfloat16", "-q"]
    base, _, _ = child_peak([])
    results = {}
    for mode in ("disk", "none"):
        peak, secs, code = child_peak(["quantize", str(tmp / "src"), str(tmp / mode), "--offload", mode, *common])
        results[mode] = {"peak_rss_bytes": peak, "seconds": round(secs, 1), "exit": code}
    same = (tmp / "disk" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp / "none" / "diffusion_pytorch_model.safetensors").read_bytes()
    out = {"benchmark": "quantize_stream_memory", "config": cfg, "model_bf16_bytes": model_bytes,
           "largest_block_bytes": block_bytes, "import_baseline_rss_bytes": base, "modes": results,
           "checkpoints_identical": same, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    gib = 2**30
    print(f"model {model_bytes / gib:.3f} GiB bf16, largest block {block_bytes / gib:.3f} GiB, "
          f"import baseline {base / gib:.3f} GiB")
    for mode, r in results.items():
        print(f"--offload {mode:<5} peak RSS {r['peak_rss_bytes'] / gib:.3f} GiB "
              f"(above baseline {(r['peak_rss_bytes'] - base) / gib:.3f} GiB), {r['seconds']} s, exit {r['exit']}")
    print(f"checkpoints identical: {same}")
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "quantize_stream_memory.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
