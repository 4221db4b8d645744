"""How much of a long-K ``fast8`` GEMM's error is the FP8 tensor cores' accumulation (issue 21's
segmented ``proj_out`` finding, issue 23).

On the k-segmented test layer's MLP half (K = 12288, post-GELU activations: every product of one
sign dominates) quantized shifted by 0.171875 (``post_gelu``: the FP8 modes before the shift moved
into the bias) and unshifted (``post_gelu_unshifted``: the FP8 modes now, ``ops.fp8_bias``), and on
the same layer with signed activations, it compares with a float64 product of the same e4m3
operands (rows quantized per token, e4m3 weights of ``fast8``):

* ``scaled_mm_fast`` / ``scaled_mm``: ``torch._scaled_mm`` with and without ``use_fast_accum`` —
  cuBLAS on the same operands, so a hardware property shows in both cuBLAS and ours;
* ``ours``: our group-64 ``fast8`` GEMM (``cutlass_fast8.group64_gemm``, the tiling it picks for
  the rows) on the same packed weights and codes, token scale 1, no source: its bf16 output
  against ``exact · rowinv`` (the layer test's split found 1.05–1.16e-2 on this half);
* on the CPU, ``fp22_truncate`` / ``fp22_round``: the product summed per 32-wide k-block, the
  running sum kept to 13 mantissa bits (the accumulator width SageAttention2 reports for Hopper's
  FP8 MMA) by truncation / by rounding — the model the GPU numbers are checked against.

    python benchmarks/fp8_accumulation.py [--rows 256] [--out fp8_accumulation.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svdq_format import ops, packing  # noqa: E402


def fp22(t: torch.Tensor, *, rounding: bool) -> torch.Tensor:
    """``t`` (float64) to float32, then 13 mantissa bits (truncated, or rounded to nearest)."""
    i = t.float().view(torch.int32)
    if rounding:
        i = i + (1 << 9)
    return (i & ~((1 << 10) - 1)).view(torch.float32).double()


def operands(m: int, *, signed: bool, device: str, shifted: bool = True) -> tuple[torch.Tensor, ...]:
    """``(q [M, K] e4m3, w8 [N, K] e4m3 values as float32, rowinv [N], qweight [N, K/2], wscales)``
    of the test layer's MLP half (the last two: its packed slice, for our kernel); ``shifted``: its
    rows quantized with the segment's shift added (else without)."""
    from tests.test_kernels_segmented_gpu import flux_proj_out, flux_proj_out_input

    layer = flux_proj_out("int4", device="cpu")
    x = flux_proj_out_input(m, device="cpu").float()
    if signed:
        x[:, 3072:] = torch.randn(m, 12288, generator=torch.Generator().manual_seed(5))
    k0 = 3072
    shift = ops.shift_vector(15360, 0.0, layer.k_segments, device=x.device) if shifted else 0.0
    q, _ = ops.quantize_fp8_rows(ops.smoothed(x, layer.smooth, shift))
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(layer.qweight))[:, k0:]
    ws = layer.wscales.float()[:, k0 // 64:]
    pw = packing.fp8_weight_row_scales(codes, ws)
    w8 = packing.fp8_weight_values(codes, packing.fp8_weight_scales(ws, pw))
    return (q[:, k0:].contiguous().to(device), w8.float().to(device), (1.0 / pw).float().to(device),
            layer.qweight[:, k0 // 2:].contiguous().to(device), layer.wscales[:, k0 // 64:].contiguous().to(device))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", default="fp8_accumulation.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    result: dict = {"rows": args.rows, "k": 12288, "n": 3072,
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "cases": {}}
    for label, signed, shifted in (("post_gelu", False, True), ("post_gelu_unshifted", False, False),
                                   ("signed", True, True)):
        q, w8, rowinv, qweight, wscales = operands(args.rows, signed=signed, device="cuda" if cuda else "cpu",
                                                   shifted=shifted)
        qd, wd = q.double().cpu(), w8.double().cpu()
        exact = qd @ wd.t()
        case: dict = {}
        for rounding in (False, True):
            acc = torch.zeros_like(exact)
            for kb in range(0, qd.shape[1], 32):
                acc = fp22(acc + qd[:, kb:kb + 32] @ wd[:, kb:kb + 32].t(), rounding=rounding)
            case["fp22_round" if rounding else "fp22_truncate"] = rel(acc, exact)
        if cuda:
            w = w8.to(torch.float8_e4m3fn)
            one = torch.ones((), device=q.device)
            for fast in (True, False):
                y = torch._scaled_mm(q, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                     use_fast_accum=fast)
                case["scaled_mm_fast" if fast else "scaled_mm"] = rel(y.cpu(), exact)
            from svdq_kernels import cutlass_fast8

            scales16, rowinv_k = cutlass_fast8.fast8_weights(qweight, wscales)
            m = q.shape[0]
            y = cutlass_fast8.group64_gemm(qweight, scales16, rowinv_k, q, torch.ones(m, device=q.device),
                                           torch.zeros(m, qweight.shape[0], device=q.device, dtype=torch.bfloat16))
            case["ours"] = rel(y.float().cpu(), exact * rowinv_k.double().cpu())
            case["bf16_rounding_floor"] = rel((exact * rowinv_k.double().cpu()).to(torch.bfloat16), exact
                                              * rowinv_k.double().cpu())
        result["cases"][label] = case
        print(label, " ".join(f"{k} {v:.2e}" for k, v in case.items()), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
