"""The FP8 modes on GELU-shifted layers: quantizing ``x + shift`` (before) against ``x`` with the
shift in the bias (now, ``svdq_format.ops.fp8_bias``), on the CPU.

Two sets:

* **synthetic** — random GELU-fed layers as the quantizer writes them (``act_shift`` 0.171875,
  unsigned codes, the exact mode's ``b − Q(R) · (shift / s)`` in the stored bias), K = 3072 and
  12288, on post-GELU rows of two spreads (``gelu(z)`` and ``gelu(3z)``): the output's error against
  the float64 product on unquantized activations (the mode's weights, the stored bias, the low-rank
  branch) for both formulations, in a float32 layer (no output rounding) and in bf16; the effect of
  rounding ``b'`` to bf16 (the dtype the kernels take) against keeping it in fp32; and how one-signed
  the e4m3 codes are (mean / std of the codes, the share of negative ones) with and without the shift;
* **minilm** — the GELU-fed layers of the real all-MiniLM-L6-v2 that the quantizer gave the shift
  (``intermediate`` → ``output.dense``), calibrated and measured on held-out rows as in
  benchmarks/fidelity.py: each FP8 mode's error against the dense layer, before and after, and the
  exact mode's.

"Before" is the old function evaluated with today's code: the codes of ``x + shift`` (``ops.fp8_activations``
with the shift) through ``ops.reference_linear_fp8`` with the stored bias and no shift — which is
what the reference computed before the change.

    python benchmarks/fp8_shift_bias.py [--out benchmarks/results/fp8_shift_bias_cpu.json] [--no-minilm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import svdq_format as sf  # noqa: E402
from svdq_format import ops, packing  # noqa: E402

SHIFT = 0.171875


def gelu_layer(k: int, n: int, *, dtype: torch.dtype, seed: int) -> sf.SVDQLinear:
    g = torch.Generator().manual_seed(seed)
    layer = sf.SVDQLinear(k, n, rank=32, bias=True, dtype=dtype, act_shift=SHIFT, act_unsigned=True)
    with torch.no_grad():
        layer.smooth.copy_(torch.rand(k, generator=g) * 1.5 + 0.25)
        layer.set_residual(torch.randn(n, k, generator=g) * 0.05)
        layer.lora_down.copy_(torch.randn(32, k, generator=g) / k**0.5)
        layer.lora_up.copy_(torch.randn(n, 32, generator=g) * 0.1)
        b = torch.randn(n, generator=g) * 0.1
        layer.bias.copy_(b - layer.residual() @ (SHIFT / layer.smooth.float()))
    return layer


def mode_weights(layer: sf.SVDQLinear, act: str) -> torch.Tensor:
    """float64 ``[N, K]``: the weights the mode multiplies (``fast8``: e4m3-rounded)."""
    nib = packing.unpack_nibbles(layer.qweight)
    if act == "fp8w":
        codes = packing.nibbles_to_int4(nib)
        pw = packing.fp8_weight_row_scales(codes, layer.wscales)
        w8 = packing.fp8_weight_values(codes, packing.fp8_weight_scales(layer.wscales, pw))
        return w8.double() / pw.double()[:, None]
    return packing.dequantize_int4(nib, layer.wscales, group_size=64).double()


def args(layer: sf.SVDQLinear, act: str, bias: torch.Tensor | None = None) -> tuple:
    return (layer.qweight, layer.wscales, layer.wtscale, layer.smooth, layer.lora_down, layer.lora_up,
            layer.bias if bias is None else bias, layer.lora_scales, layer.precision, act)


def old_output(layer: sf.SVDQLinear, x: torch.Tensor, act: str) -> torch.Tensor:
    """The FP8 modes before: ``x + shift`` quantized, the stored bias as it is."""
    xf = x.reshape(-1, x.shape[-1]).float()
    q, a = ops.fp8_activations(xf, layer.smooth, ops.shift_vector(xf.shape[-1], layer.act_shift, layer.k_segments))
    return ops.reference_linear_fp8(x, q, a, *args(layer, act), k_segments=layer.k_segments)


def new_output(layer: sf.SVDQLinear, x: torch.Tensor, act: str) -> torch.Tensor:
    return ops.reference_linear(x, *args(layer, act), layer.act_shift, layer.act_unsigned, k_segments=layer.k_segments)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def code_stats(q: torch.Tensor) -> dict:
    v = q.float()
    return {"mean": round(v.mean().item(), 3), "std": round(v.std().item(), 3),
            "negative_share": round((v < 0).float().mean().item(), 4)}


def synthetic(rows: int, n: int) -> list[dict]:
    out = []
    for k in (3072, 12288):
        for spread in (1.0, 3.0):
            g = torch.Generator().manual_seed(k + int(spread))
            x32 = F.gelu(spread * torch.randn(rows, k, generator=g), approximate="tanh")
            case: dict = {"k": k, "n": n, "rows": rows, "input": f"gelu({spread:g}·z)"}
            for dtype in (torch.float32, torch.bfloat16):
                layer = gelu_layer(k, n, dtype=dtype, seed=k)
                x = x32.to(dtype)
                xd = x.double()
                lr = (xd @ layer.lora_down.double().t()) @ layer.lora_up.double().t()
                for act in ("fp8w", "fp8"):
                    exact = ((xd + SHIFT) / layer.smooth.double()) @ mode_weights(layer, act).t() + \
                        layer.bias.double() + lr
                    name = f"{act}_{'fp32' if dtype == torch.float32 else 'bf16'}"
                    case[f"{name}_before"] = rel(old_output(layer, x, act), exact)
                    case[f"{name}_after"] = rel(new_output(layer, x, act), exact)
                    if dtype == torch.bfloat16:  # b' kept in fp32 instead of rounded to bf16
                        b32 = ops.fp8_bias(*args(layer, act)[:4], layer.bias.float(), "int4", act, SHIFT,
                                           dtype=torch.float32)
                        q, a = ops.fp8_activations(x.float(), layer.smooth)
                        y32 = ops.reference_linear_fp8(x, q, a, *args(layer, act, bias=b32))
                        case[f"{name}_after_fp32_bias"] = rel(y32, exact)
                        b16 = ops.fp8_bias(*args(layer, act)[:4], layer.bias, "int4", act, SHIFT, dtype=torch.bfloat16)
                        case[f"{act}_bias_rounding"] = rel(b16, b32)
                        case[f"{act}_bias_rms_over_output_rms"] = (b32.double().norm() / exact.norm()
                                                                   * exact.shape[0] ** 0.5).item()
            layer = gelu_layer(k, n, dtype=torch.float32, seed=k)
            case["codes_shifted"] = code_stats(ops.fp8_activations(x32, layer.smooth, SHIFT)[0])
            case["codes_unshifted"] = code_stats(ops.fp8_activations(x32, layer.smooth)[0])
            out.append(case)
            print(json.dumps(case), flush=True)
    return out


def minilm(rows: int) -> list[dict]:
    from converters.quantize.layer import quantize_group
    from converters.quantize.options import QuantizeOptions
    from fidelity import minilm_layers

    linears, calib, held, kinds = minilm_layers(rows)
    opts = QuantizeOptions(rank=32)
    out = []
    for name in linears:
        if not name.endswith("output.dense") or "attention" in name:
            continue  # the GELU-fed layers (intermediate → output)
        layer, _ = quantize_group([name], linears, kinds, calib, opts, report=False)[name]
        lin = linears[name]
        x = held.layers[name].rows.to(lin.weight.dtype)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        layer.backend = "reference"
        case = {"layer": name, "act_shift": layer.act_shift, "k": layer.in_features, "n": layer.out_features}
        layer.mode = "exact"
        case["exact"] = rel(layer(x), ref)
        with torch.no_grad():
            for act in ("fp8w", "fp8"):
                case[f"{act}_before"] = rel(old_output(layer, x, act), ref)
                case[f"{act}_after"] = rel(new_output(layer, x, act), ref)
        out.append(case)
        print(json.dumps(case), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/fp8_shift_bias_cpu.json")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--no-minilm", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    result = {"torch": torch.__version__, "device": "cpu", "synthetic": synthetic(a.rows, a.n)}
    if not a.no_minilm:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        result["minilm"] = minilm(a.rows)
    result["seconds"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
