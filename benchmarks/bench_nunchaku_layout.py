"""Time Nunchaku ↔ canonical re-tiling of one FLUX.1 transformer block's layers (CPU).

Prints a table and writes JSON (device, versions, date) next to this script:

    PYTHONPATH=. python benchmarks/bench_nunchaku_layout.py [--out benchmarks/nunchaku_layout.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from converters.nunchaku import layout as L

# FLUX.1 double block (inner 3072): fused qkv, out_proj, fc1, fc2 (N, K); rank 32.
SHAPES = {"qkv_proj": (9216, 3072), "out_proj": (3072, 3072), "mlp_fc1": (12288, 3072), "mlp_fc2": (3072, 12288)}


def _time(fn, *args, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).with_name("nunchaku_layout.json")))
    args = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scales = torch.rand(n, k // 64).bfloat16()
        micro = torch.rand(n, k // 16).to(torch.float8_e4m3fn)
        down, up = torch.randn(32, k).bfloat16(), torch.randn(n, 32).bfloat16()
        packed = L.packing.pack_nibbles(codes)  # our layout
        q, s, m, d, u = (L.rowmajor_to_qweight(packed), L.pack_scales(scales), L.pack_micro_scales(micro),
                         L.pack_lora_down(down), L.pack_lora_up(up))
        rows.append({
            "layer": name, "N": n, "K": k,
            "qweight_unpack_s": _time(L.qweight_to_rowmajor, q), "qweight_pack_s": _time(L.rowmajor_to_qweight, packed),
            "int4_scales_unpack_s": _time(L.unpack_scales, s), "nvfp4_scales_unpack_s": _time(L.unpack_micro_scales, m),
            "lora_unpack_s": _time(L.unpack_lora_down, d) + _time(L.unpack_lora_up, u),
        })
    cols = ["layer", "N", "K", "qweight_unpack_s", "qweight_pack_s", "int4_scales_unpack_s", "nvfp4_scales_unpack_s",
            "lora_unpack_s"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    total = sum(r["qweight_unpack_s"] + r["int4_scales_unpack_s"] + r["lora_unpack_s"] for r in rows)
    # FLUX.1 holds these four shapes 2× per double block (image + context) and 1× per single block.
    print(f"one set of the 4 layers (int4 un-tiling): {total:.3f} s; FLUX.1 (19×2 + 38 sets) ≈ {total * 76:.0f} s")
    out = {
        "benchmark": "nunchaku_layout", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": f"cpu ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()}, "rows": rows,
        "flux1_int4_untile_estimate_s": total * 76,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
