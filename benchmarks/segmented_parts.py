"""Where a k-segmented fast8 layer's GPU output departs from the reference (a diagnosis).

``tests/test_kernels_segmented_gpu.py`` failed on an H100 (2026-12-06): the FLUX single-block
``proj_out`` shape in ``auto`` mode (``fast8`` per segment) was within the bound at M = 1 and 16
(< 5e-3) but 1.06–1.15e-2 from the reference at M = 300, 512 and 4608, although the same split
done with the reference math per segment (bf16-rounded parts, on the CPU) is 2.4e-3 from it at
both M = 16 and 300 — so the split's rounding is not the cause. This script runs each segment
through ``cutlass_fast8.fast8_linear_fp8`` (low-rank branch inside the GEMM, then as a separate
source, then without it) against ``reference_linear_fp8`` on the CPU for the same codes, per M,
and prints the relative error of each: the part that is off names the path to fix. On the CPU the
same Python path with the GEMM emulated exactly (float64) is within 2.9e-3 (segment 0) and 1.8e-3
(segment 1) of the reference at M = 16 and 300, so the suspect is a kernel configuration chosen at
M ≥ 300; the second segment is the only call without a bias (an empty bias tensor), hence the
last variant, a zero bias.

Usage (GPU): ``python benchmarks/segmented_parts.py [--m 16 300 4608]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[16, 300, 4608])
    args = ap.parse_args()
    from test_kernels_segmented_gpu import _rel, flux_proj_out, flux_proj_out_input

    import svdq_kernels.cutlass_fast8 as cf
    from svdq_format import ops, segmented

    layer = flux_proj_out("int4")
    for m in args.m:
        x = flux_proj_out_input(m)
        k = x.shape[-1]
        q, a = ops.quantize_fp8_rows(ops.smoothed(x.float(), layer.smooth,
                                                  ops.shift_vector(k, 0.0, layer.k_segments, device=x.device)))
        weights = segmented.segment_weights(layer.qweight, layer.wscales, layer.wtscale, layer.smooth, "int4",
                                            layer.k_segments)
        downs = segmented.segment_downs(layer.lora_down, layer.k_segments)
        bounds = segmented.segment_bounds(layer.k_segments)
        for i, ((lo, hi), seg, (qw, ws, ts, sm)) in enumerate(zip(bounds, layer.k_segments, weights)):
            zero = torch.zeros_like(layer.bias)
            for name, with_lr, in_gemm, bias in (
                    ("low-rank in the GEMM", True, True, layer.bias if i == 0 else None),
                    ("low-rank as a source", True, False, layer.bias if i == 0 else None),
                    ("no low-rank", False, True, layer.bias if i == 0 else None),
                    ("in the GEMM, zero bias", True, True, layer.bias if i == 0 else zero)):  # empty-bias path?
                gpu = (x[:, lo:hi], q[:, lo:hi].contiguous(), a, qw, ws, ts, sm, downs[i] if with_lr else None,
                       layer.lora_up if with_lr else None, bias, None, "int4", "fp8w", seg.act_shift, seg.act_unsigned)
                cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in gpu]
                cpu[0] = cpu[0].float()
                cf.LOWRANK_IN_GEMM = in_gemm
                try:
                    err = _rel(cf.fast8_linear_fp8(*gpu), ops.reference_linear_fp8(*cpu))
                finally:
                    cf.LOWRANK_IN_GEMM = True
                print(f"M={m:5d} segment {i} (K={hi - lo:5d}, shift {seg.act_shift}) {name:22s} rel {err:.2e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
