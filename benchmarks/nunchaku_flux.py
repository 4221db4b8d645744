"""A Nunchaku FLUX checkpoint on a GPU with diffusers: conversion time, memory, step time.

What docs/interop.md's "A Nunchaku FLUX checkpoint on an H100 with diffusers" section measures,
start to finish, in one process:

1. the Nunchaku file: ``--nunchaku-file`` (e.g. ``svdq-int4_r32-flux.1-dev.safetensors`` from the
   Hub), or — the default, so no download is needed — a random-weight FLUX.1-dev transformer in
   Nunchaku's layout (``--precision int4`` or ``nvfp4``, rank ``--rank``): random SVDQ layers with
   Nunchaku's per-layer handling (``converters.quantize.select_layers(target="nunchaku")``: AdaLN
   as AWQ W4A16, GELU-fed fc2 and the MLP half of single-block ``proj_out`` shifted for int4, q|k|v
   sharing smoothing and tensor scale), written by our exporter (``svdq convert --to nunchaku``);
2. ``svdq convert --from nunchaku FILE DIR`` (timed, CPU);
3. ``FluxTransformer2DModel.from_pretrained(DIR, torch_dtype=torch.bfloat16)`` after
   ``import svdq_format`` (timed), moved to the GPU: transformer weights on the GPU;
4. one transformer step at 1024×1024 (4096 image tokens, 512 text tokens, batch 1) in ``--mode``
   (default ``auto``: the Hopper kernels where they run the layer, the reference elsewhere — the
   k-segmented ``proj_out`` layers of an int4 file run on the reference), eager and with
   ``--compile``: median time and peak memory; the count of layers on each backend.

Prints a table and writes ``--out`` (JSON). On the H100 (repo root)::

    python benchmarks/nunchaku_flux.py --out benchmarks/results/nunchaku_flux_h100.json --compile
    python benchmarks/nunchaku_flux.py --precision nvfp4 --out nunchaku_flux_fp4.json
    python benchmarks/nunchaku_flux.py --tiny --device cpu --steps 1 --warmup 0   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flux_step import inputs, measure, weight_bytes  # noqa: E402

from quantize_flux import FLUX_DEV, TINY  # noqa: E402

GIB = 2**30


def random_nunchaku_file(path: Path, *, config: dict, precision: str, rank: int, seed: int, work: Path) -> dict:
    """Write a random-weight FLUX in Nunchaku's single-file layout; returns what was built."""
    from diffusers import FluxTransformer2DModel

    from converters.nunchaku.exporter import export_nunchaku
    from converters.quantize import select_layers
    from svdq_format.fusion import FUSIONS
    from svdq_format.model import replace_linears, save_model_dir
    from svdq_format.spec import LayerSpec

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    sel = select_layers(model, target="nunchaku", precision=precision)
    specs = {}
    for name, kind in sel.kinds.items():
        lin = model.get_submodule(name)
        segments = sel.act_handling.get(name, ())
        whole = segments[0] if len(segments) == 1 else None
        specs[name] = LayerSpec(
            kind=kind, precision=precision if kind == "w4a4" else "int4", in_features=lin.in_features,
            out_features=lin.out_features, rank=rank if kind == "w4a4" else 0, dtype="bfloat16",
            has_bias=lin.bias is not None or bool(segments),
            act_shift=whole.act_shift if whole else 0.0, act_unsigned=whole.act_unsigned if whole else False,
            k_segments=segments if len(segments) > 1 else (),
        )
    replace_linears(model, specs, device="meta")
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rpartition(".")[2]
            if leaf == "qweight":
                t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
            elif leaf == "wscales" and t.dtype == torch.float8_e4m3fn:
                t.copy_((torch.rand(t.shape, generator=gen) * 2 + 0.25).to(t.dtype))
            elif leaf == "wscales":
                t.copy_(torch.rand(t.shape, generator=gen) * 2e-3 + 1e-3)
            elif leaf == "wtscale":
                t.fill_(2.0**-10)  # one value: Nunchaku's fused q|k|v wcscales are then exact
            elif leaf == "smooth":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif leaf in ("lora_down", "lora_up"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
            elif ".norm" in name and leaf == "weight" and t.dim() == 1:
                t.fill_(1.0)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        for name, mod in model.named_modules():  # members of one fused Nunchaku layer share smooth
            for members in FUSIONS.values():
                if all(hasattr(mod, m) and f"{name}.{m}" in specs for m in members):
                    for m in members[1:]:
                        getattr(mod, m).smooth.copy_(getattr(mod, members[0]).smooth)
        for name in specs:
            if specs[name].kind == "w4a16":
                model.get_submodule(name).smooth.fill_(1.0)
    ours = save_model_dir(model, work / "ours-random")
    del model
    export_nunchaku(ours, path)
    shutil.rmtree(ours)
    return {"layers": len(specs), "k_segmented": sum(1 for s in specs.values() if s.k_segments)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nunchaku-file", default=None, help="a Nunchaku FLUX file (default: build a random one)")
    ap.add_argument("--precision", choices=("int4", "nvfp4"), default="int4", help="of the random file")
    ap.add_argument("--rank", type=int, default=32, help="low-rank rank of the random file (Nunchaku: 32)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX config (CPU smoke test)")
    ap.add_argument("--image-tokens", type=int, default=None, help="default 4096 (1024x1024); tiny: 64")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 512; tiny: 16")
    ap.add_argument("--mode", choices=("auto", "fast", "fast8", "exact"), default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd model")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel kind (torch.profiler)")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="nunchaku_flux.json")
    args = ap.parse_args(argv)

    from diffusers import FluxTransformer2DModel

    import svdq_format  # noqa: F401  (registers the "svdquant" quantizer with diffusers)
    from converters.nunchaku.importer import import_nunchaku
    from svdq_format import ops
    from svdq_format.model import svdq_modules

    if args.device.startswith("cuda"):
        import svdq_kernels  # noqa: F401  (the Hopper backend; found by entry point too)
    config = TINY if args.tiny else FLUX_DEV
    img = args.image_tokens or (64 if args.tiny else 4096)
    txt = args.text_tokens or (16 if args.tiny else 512)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="svdq-nunchaku-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                    "torch": torch.__version__, "config": "tiny" if args.tiny else "FLUX.1-dev",
                    "image_tokens": img, "text_tokens": txt, "mode": args.mode}
    try:
        if args.nunchaku_file:
            src = Path(args.nunchaku_file)
            result["source"] = str(src)
        else:
            src = work / f"svdq-{args.precision}_r{args.rank}-random-flux.safetensors"
            t = time.perf_counter()
            built = random_nunchaku_file(src, config=config, precision=args.precision, rank=args.rank,
                                         seed=args.seed, work=work)
            result["source"] = f"random weights, Nunchaku {args.precision} layout, rank {args.rank}"
            result["random_file"] = {**built, "build_s": time.perf_counter() - t}
        result["nunchaku_file_bytes"] = src.stat().st_size
        print(f"Nunchaku file: {src} ({src.stat().st_size / GIB:.2f} GiB)", flush=True)

        t = time.perf_counter()
        out_dir = import_nunchaku(src, work / "flux-svdq")  # = svdq convert --from nunchaku SRC DIR
        result["convert_s"] = time.perf_counter() - t
        result["converted_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
        print(f"svdq convert --from nunchaku: {result['convert_s']:.1f} s -> {out_dir}", flush=True)

        t = time.perf_counter()
        model = FluxTransformer2DModel.from_pretrained(out_dir, torch_dtype=torch.bfloat16).to(args.device).eval()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - t
        layers = svdq_modules(model)
        for layer in layers.values():
            layer.mode = args.mode
        result["svdq_layers"] = len(layers)
        result["k_segmented_layers"] = sum(1 for layer in layers.values() if layer.k_segments)
        result["weights_bytes"] = weight_bytes(model)
        if args.device.startswith("cuda"):
            result["gpu_allocated_after_load_bytes"] = torch.cuda.memory_allocated()
        x = inputs(model, image_tokens=img, text_tokens=txt, device=args.device)
        backends: dict[str, int] = {}
        for layer in layers.values():  # which backend each layer's call picks (fallbacks named once)
            k = layer.in_features
            call = ops.LinearCall(device=torch.device(args.device), dtype=layer.dtype, precision=layer.precision,
                                  act=layer.act_for(torch.device(args.device), layer.dtype), rows=img + txt,
                                  in_features=k, out_features=layer.out_features, rank=layer.rank,
                                  has_bias=layer.bias is not None, act_shift=layer.act_shift,
                                  act_unsigned=layer.act_unsigned, k_segments=layer.k_segments)
            name = ops.select_backend(call, layer.backend).name
            backends[f"{name}/{call.act}"] = backends.get(f"{name}/{call.act}", 0) + 1
        result["layers_by_backend"] = backends
        print("layers by backend/activation mode: " + ", ".join(f"{k} x{v}" for k, v in backends.items()))
        result["step"] = measure(model, x, label=f"nunchaku-{args.precision}", args=args)
        with torch.no_grad():
            y = model(**x).sample
        result["output_finite"] = bool(torch.isfinite(y.float()).all())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    step = result["step"]
    print(f"\nconvert {result['convert_s']:.1f} s, load {result['load_s']:.1f} s, transformer weights "
          f"{result['weights_bytes'] / GIB:.2f} GiB")
    for k in ("eager", "compiled"):
        if k in step:
            print(f"{k:<9} step {step[k]['median_s'] * 1e3:8.1f} ms   peak "
                  f"{step[k]['peak_bytes'] / GIB:.2f} GiB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
