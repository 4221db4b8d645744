"""Every diffusers transformer family (and SDXL's UNet): what the quantizer does with it, measured.

For each transformer class of the installed diffusers (``diffusers.models.transformers``) plus
``UNet2DConditionModel``:

* with a tiny config in ``tests/family_fixtures.py``: quantize it as ``svdq quantize`` does
  (synthetic calibration from the forward signature, 8 samples, the default search; rank 8, as
  the layers are 64 wide), then count the linears W4A4 / W4A16 / kept 16-bit and measure the
  relative output error ``‖y − y_dense‖ / ‖y_dense‖`` on a held-out synthetic input; note whether
  diffusers has a LoRA loader for its pipelines and whether its attention fuses q/k/v;
* without one: whether synthetic inputs can be derived at all (the one-line reason when not),
  read from the forward signature of the class built with its default config on the meta device.

Prints a markdown table, writes JSON, and with ``--docs`` replaces the table in
docs/quantization.md (between its ``families-table`` markers).

    python benchmarks/families.py --threads 1 --out benchmarks/results/families_cpu.json --docs docs/quantization.md
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.quantize import QuantizeOptions, run_quantization  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402
from converters.quantize.synthetic import InputPlan, build_sample, synthetic_samples  # noqa: E402
from svdq_format.errors import QuantizationError  # noqa: E402
from svdq_format.model import svdq_modules  # noqa: E402
from tests.family_fixtures import FAMILIES, build, lora_loader  # noqa: E402

BEGIN, END = "<!-- families-table:begin -->", "<!-- families-table:end -->"


def diffusers_classes() -> list[str]:
    """Every model class defined in ``diffusers.models.transformers``, plus ``UNet2DConditionModel``."""
    import diffusers
    import diffusers.models.transformers as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, diffusers.ModelMixin) and obj.__module__ == mod.__name__:
                names.add(name)
    return sorted(names) + ["UNet2DConditionModel"]


def _output(out: Any) -> torch.Tensor:
    o = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    return o[0] if isinstance(o, list) else o


def measure(family: str, *, rank: int, samples: int) -> dict[str, Any]:
    from svdq_format import fusion

    cls_name, _ = FAMILIES[family]
    dense = build(family)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan, calib = synthetic_samples(dense, samples, seed=0)
        _, (x,) = synthetic_samples(dense, 1, seed=123)
    with torch.no_grad():
        ref = _output(dense(**x))
    linears = [n for n, m in dense.named_modules() if type(m) is nn.Linear]
    result = run_quantization(dense, calib, options=QuantizeOptions(rank=rank), device="cpu", offload=False)
    layers = svdq_modules(result.model)
    with torch.no_grad():
        y = _output(result.model(**x))
    kinds = [m.kind for m in layers.values()]
    loader = lora_loader(cls_name)
    return {
        "family": family, "class": cls_name, "status": "tested", "layout": plan.layout, "plan": plan.describe(),
        "linears": len(linears), "w4a4": kinds.count("w4a4"), "w4a16": kinds.count("w4a16"),
        "kept": len(linears) - len(layers), "rel_error": float((y - ref).norm() / ref.norm()),
        "mean_layer_error": result.report.summary().get("svdq"), "lora_loader": loader,
        "fuse_qkv": bool(hasattr(result.model, "fuse_qkv_projections") and fusion.install(result.model)),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def untested(cls_name: str) -> dict[str, Any]:
    """Why synthetic inputs cannot be derived for a class without a tiny config (or that they could)."""
    import diffusers
    from accelerate import init_empty_weights

    row: dict[str, Any] = {"family": "", "class": cls_name}
    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(diffusers, cls_name)()
    except Exception as exc:
        return {**row, "status": f"not tested: its default config does not build ({type(exc).__name__})"}
    try:
        params = inspect.signature(type(model).forward).parameters
        latent = next((n for n in ("hidden_states", "sample", "x", "latents") if n in params), None)
        if latent is None:
            return {**row, "status": "no synthetic inputs: its forward has no latent argument"}
        build_sample(model, InputPlan(latent, "tokens", 1, 4, 4, 8, False), torch.Generator().manual_seed(0))
    except QuantizationError as exc:
        reason = str(exc).split("calibration inputs: ", 1)[-1].split(";")[0].split(" (")[0]
        return {**row, "status": f"no synthetic inputs: {reason}"}
    except Exception:
        pass
    return {**row, "status": "not tested (no tiny config)"}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| class | status | quantized / linears | W4A4 / W4A16 / kept 16-bit | output error (tiny) | "
            "LoRA loader | fuse q/k/v | synthetic latent |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        if r["status"] == "tested":
            lora = r["lora_loader"].removesuffix("LoraLoaderMixin") if r["lora_loader"] else "no"
            lines.append(f"| {r['class']} | tested | {r['w4a4'] + r['w4a16']} / {r['linears']} | "
                         f"{r['w4a4']} / {r['w4a16']} / {r['kept']} | {r['rel_error']:.3f} | {lora} | "
                         f"{'yes' if r['fuse_qkv'] else 'no'} | {r['layout']} |")
        else:
            lines.append(f"| {r['class']} | {r['status']} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/families_cpu.json")
    ap.add_argument("--docs", default=None, help="replace the families table of this markdown file")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    by_class = {cls: fam for fam, (cls, _) in FAMILIES.items()}
    rows = []
    for cls_name in diffusers_classes():
        fam = by_class.get(cls_name)
        try:
            row = measure(fam, rank=args.rank, samples=args.samples) if fam else untested(cls_name)
        except Exception as exc:  # a tested family that breaks is a bug: keep the line
            row = {"family": fam, "class": cls_name, "status": f"FAILED: {type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        print(f"{cls_name:42s} {row['status'][:90]}", flush=True)
    md = table(rows)
    print(md)
    tested = [r for r in rows if r["status"] == "tested"]
    result = {"environment": environment_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
              "options": {"rank": args.rank, "samples": args.samples, "threads": torch.get_num_threads()},
              "summary": {"classes": len(rows), "tested": len(tested),
                          "with_lora_loader": sum(bool(r["lora_loader"]) for r in tested)},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        doc.write_text(f"{head}{BEGIN}\n{md}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
