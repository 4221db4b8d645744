"""Why is the compiled ``fast8`` activation quantizer slower than the FP8 peer's? (issue 23)

Times, inside CUDA graphs, Inductor's code for variants of the per-token e4m3 quantizer at FLUX
shapes, each compiled stand-alone from a bf16 ``x``:

* ``peer``        — the FP8 W8A8 peer's: ``absmax(x) / 448`` (clamped), ``e4m3(x / a)``;
* ``ours``        — what compiled ``fast8`` graphs run now (``svdq_format.ops.graph_fp8_activations``):
  ``x · (1/s)`` with ``1/s`` from the ``svdquant::smooth_reciprocal`` op (a copy of the cached
  vector per call), ``e4m3(x̂ · (1/a))``, finite check and saturation;
* ``ours_rcp_const`` — the same with ``1/s`` a constant of the graph (no op: what a reciprocal kept
  outside the graph would cost);
* ``ours_div``    — the quantizer before issue 23's lever 3: ``x / s`` in both passes, then ``/ a``;
* ``ours_recip``  — ``ours_div`` with ``x · (1/s)`` (a constant) but still ``/ a``;
* ``ours_nocheck`` — ``ours_div`` without the finite check and saturation (``where``/``clamp``);
* ``smooth_only`` — ``x / s`` and the peer's quantizer.

Writes the median µs and Inductor's generated source of each (``--code DIR``).

    python benchmarks/quantizer_variants.py --out quant.json --code out/code
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import linear_peers  # noqa: E402  (benchmarks/)
from linear_peers import bench, run_meta  # noqa: E402


def variants(s: torch.Tensor) -> dict:
    from svdq_format import ops, packing

    inv = (1.0 / s.float()).contiguous()

    def peer(x):
        a = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
        return (x.float() / a).to(torch.float8_e4m3fn), a

    def divide_by_a(xs):  # quantize_fp8_rows before lever 3
        a = xs.abs().amax(dim=-1, keepdim=True) / packing.FP8_E4M3_MAX
        ok = (a > 0) & torch.isfinite(a)
        return packing.round_to_e4m3(torch.where(ok, xs / torch.where(ok, a, 1.0), 0.0)), a.squeeze(-1)

    def ours(x):
        return ops.graph_fp8_activations(x.float(), s)

    def ours_rcp_const(x):
        return ops.quantize_fp8_rows(x.float() * inv)

    def ours_div(x):
        return divide_by_a(x.float() / s.float())

    def ours_recip(x):
        return divide_by_a(x.float() * inv)

    def ours_nocheck(x):
        xs = x.float() / s.float()
        a = xs.abs().amax(dim=-1, keepdim=True) / 448.0
        return (xs / a).to(torch.float8_e4m3fn), a

    def smooth_only(x):
        return peer((x.float() / s.float()))

    return {"peer": peer, "ours": ours, "ours_rcp_const": ours_rcp_const, "ours_div": ours_div,
            "ours_recip": ours_recip, "ours_nocheck": ours_nocheck, "smooth_only": smooth_only}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="quantizer_variants.json")
    ap.add_argument("--code", default="", help="directory for Inductor's generated code of each variant")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    linear_peers.GRAPHS = True
    from torch._inductor.utils import run_and_get_code

    import svdq_kernels  # noqa: F401  (the svdquant ops, as in a model)

    rows = []
    for m, k in ((4608, 3072), (4608, 12288)):
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        s = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        row = {"m": m, "k": k, "us": {}}
        keep = set(args.variants.split(",")) if args.variants else None
        for name, fn in variants(s).items():
            if keep is not None and name not in keep:
                continue
            torch._dynamo.reset()
            compiled = torch.compile(fn)
            _, code = run_and_get_code(compiled, x)
            if args.code:
                Path(args.code).mkdir(parents=True, exist_ok=True)
                Path(args.code, f"{name}_{k}.py").write_text("\n\n".join(code))
            row["us"][name] = bench(lambda: compiled(x)) * 1e3
            row.setdefault("kernels", {})[name] = sum(c.count("@triton.jit") for c in code)
        rows.append(row)
        print(f"{m}x{k}: " + "  ".join(f"{n} {v:.1f}us ({row['kernels'][n]} kernels)" for n, v in row["us"].items()),
              flush=True)
        us = row["us"]
        if {"peer", "ours", "ours_div", "ours_rcp_const"} <= set(us):
            print(f"  ours / peer {us['ours'] / us['peer']:.2f}x, ours_div / peer {us['ours_div'] / us['peer']:.2f}x, "
                  f"ours_rcp_const / peer {us['ours_rcp_const'] / us['peer']:.2f}x, ours vs ours_div "
                  f"{us['ours_div'] / us['ours']:.2f}x faster", flush=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
