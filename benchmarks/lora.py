"""LoRA apply / strength change / cached reload on a FLUX.1-dev-shaped SVDQuant model.

The model is ``FluxTransformer2DModel`` (19 double + 38 single blocks, dim 3072) whose block
linears are ``SVDQLinear`` int4 W4A4 layers with **random codes** (built directly, not
quantized: ~6.5 GB), rank-32 own low-rank branches, the other (16-bit) modules random. The
LoRA is rank 64 on **every** linear (diffusers/PEFT keys, bf16, ~0.7 GB file).

Measured (median of ``--repeat`` runs, wall clock, ``torch.set_num_threads(--threads)``):

* ``apply``          — ``load_lora(model, file, cache=False)``: read, normalise (diffusers),
  validate, plan, concatenate onto every layer;
* ``apply+cache``    — first ``load_lora`` with the cache on (also hashes the file and writes
  the converted delta);
* ``strength``       — ``set_lora_strengths`` (rewrites ``lora_scales`` only);
* ``cached reload``  — ``unload_all`` then ``load_lora`` served from the cache;
* ``unload``         — ``unload_all`` (original tensors back).

Usage: ``python benchmarks/lora.py [--threads 2] [--device cpu] [--out lora.json]``.
Prints a table and writes JSON (device, versions, date, load average).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svdq_format.linear import SVDQLinear  # noqa: E402

REFERENCE_ENGINE_S = 300.0  # nunchaku: ~300 s per LoRA load or strength change (comfy#309)


def build_model(*, device: str, rank: int = 32, double: int = 19, single: int = 38) -> nn.Module:
    """FLUX.1-dev-shaped transformer, block linears as random-code SVDQLinear on ``device``."""
    from diffusers import FluxTransformer2DModel

    g = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "_blocks." in name:
            layer = SVDQLinear(mod.in_features, mod.out_features, rank=rank, bias=mod.bias is not None,
                               device=device)
            with torch.no_grad():
                kw = {"generator": g, "device": device}
                layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, **kw))
                layer.wscales.copy_(torch.rand(layer.wscales.shape, **kw) * 0.01 + 1e-3)
                layer.lora_down.copy_(torch.randn(layer.lora_down.shape, **kw) * 0.02)
                layer.lora_up.copy_(torch.randn(layer.lora_up.shape, **kw) * 0.02)
                layer.bias.copy_(torch.randn(layer.bias.shape, **kw) * 0.02)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    for mod in model.modules():  # everything still on meta: the 16-bit part
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[pname] = nn.Parameter(
                    (torch.randn(p.shape, generator=g, device=device) * 0.02).to(torch.bfloat16), requires_grad=False)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    return model.eval()


def write_lora(model: nn.Module, path: Path, *, rank: int = 64) -> int:
    """A rank-``rank`` diffusers-format LoRA on every linear of the model; returns its bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, SVDQLinear)):
            sd[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, mod.in_features, generator=g) * 0.01).bfloat16()
            sd[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(mod.out_features, rank, generator=g) * 0.01).bfloat16()
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": rank})}
    save_file(sd, str(path), metadata=meta)
    return path.stat().st_size


def _timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--out", default="lora.json")
    ap.add_argument("--tmp", default=None, help="directory for the LoRA file and the cache")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile of one apply (top 25 by cumulative and by own time)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="svdq-lora-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if not args.tmp:  # a directory we made (~1.7 GB of LoRA and cache) goes at exit; a named one stays
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ["SVDQ_CACHE"] = str(tmp / "cache")
    from converters.lora import load_lora, set_lora_strengths, unload_all

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    model = build_model(device=args.device, double=args.double, single=args.single)
    build_s = time.perf_counter() - t0
    svdq = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    int4_gb = sum(m.qweight.numel() for m in svdq) / 1e9
    lora_path = tmp / "lora_r64.safetensors"
    lora_bytes = write_lora(model, lora_path)
    n_linear = sum(isinstance(m, (nn.Linear, SVDQLinear)) for m in model.modules())
    print(f"model: {len(svdq)} SVDQ layers ({int4_gb:.2f} GB int4 codes), {n_linear} linears, "
          f"built in {build_s:.1f} s; "
          f"LoRA file {lora_bytes / 1e9:.2f} GB; threads {args.threads}; device {args.device}")

    load_lora(model, lora_path, adapter_name="warm", cache=False)  # imports, page cache
    unload_all(model)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        load_lora(model, lora_path, adapter_name="prof", cache=False)
        sync()
        prof.disable()
        unload_all(model)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    results: dict[str, list[float]] = {k: [] for k in ("apply", "strength", "unload", "apply+cache", "cached reload")}
    for _ in range(args.repeat):
        results["apply"].append(_timed(lambda: load_lora(model, lora_path, adapter_name="a", cache=False), sync))
        for s in (0.3, 0.7, 1.0):
            results["strength"].append(_timed(lambda: set_lora_strengths(model, {"a": s}), sync))
        results["unload"].append(_timed(lambda: unload_all(model), sync))
    for i in range(args.repeat):
        for f in Path(os.environ["SVDQ_CACHE"]).rglob("*"):
            if f.is_file():
                f.unlink()
        results["apply+cache"].append(_timed(lambda: load_lora(model, lora_path, adapter_name="a"), sync))
        unload_all(model)
        rep = []
        results["cached reload"].append(_timed(lambda: rep.append(load_lora(model, lora_path, adapter_name="a")), sync))
        assert rep[0].cached
        unload_all(model)

    targets = {"apply": 2.0, "strength": 0.1, "cached reload": 0.5}
    rows = []
    print(f"\n{'operation':<16}{'median s':>10}{'min s':>10}{'target s':>10}{'reference engine s':>20}")
    for k, v in results.items():
        med, mn = statistics.median(v), min(v)
        ref = REFERENCE_ENGINE_S if k in ("apply", "strength") else None
        rows.append({"operation": k, "median_s": med, "min_s": mn, "runs": v, "target_s": targets.get(k),
                     "reference_engine_s": ref})
        print(f"{k:<16}{med:>10.3f}{mn:>10.3f}{targets.get(k, float('nan')):>10.2f}"
              f"{(f'~{ref:.0f}' if ref else '-'):>20}")
    import diffusers

    out = {
        "benchmark": "lora", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "loadavg": os.getloadavg(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "blocks": [args.double, args.single], "svdq_layers": len(svdq),
        "linears": n_linear, "int4_code_gb": int4_gb, "lora_rank": 64, "lora_file_bytes": lora_bytes,
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs: the CPU is shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
