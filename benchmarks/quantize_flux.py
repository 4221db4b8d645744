"""Speed benchmark: quantize a FLUX.1-dev-shaped transformer (random weights, 11.9 B params).

Builds ``FluxTransformer2DModel(guidance_embeds=True)`` with the FLUX.1-dev config directly on
the device (meta init + deterministic per-tensor random init, bf16), calibrates on
``--samples`` synthetic samples (4096 image + 512 text tokens each, i.e. 1024×1024 images),
then quantizes block by block (smoothing search, low-rank SVD, int4 residual with clipping
search). Reports total time, the per-phase breakdown and peak GPU memory as a table and JSON.

Runs in chunks: state (calibration statistics + finished blocks) lives in ``--state-dir``; a
run stops starting new blocks after ``--time-budget`` seconds and exits with status 3; run the
same command again to continue (one device command is limited to 10 minutes). Model build
time is reported separately and not counted as quantization time.

    python benchmarks/quantize_flux.py --device cuda                # the H100 run (repeat until done)
    python benchmarks/quantize_flux.py --tiny --device cpu          # tiny config, for testing
    python benchmarks/quantize_flux.py --recipe old ...             # the recipe before issue 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.quantize import QuantizeOptions, run_quantization, synthetic_calibration  # noqa: E402
from converters.quantize.report import environment_info  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=[16, 56, 56])
SMALL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
             axes_dims_rope=[8, 28, 28])
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[4, 4, 8])

#: ``--recipe``: options on top of rank / precision / calib_rows / seed.
RECIPES: dict[str, dict] = {
    "default": {},
    "old": dict(gptq=False, rank_allocation="uniform"),
}


def build_model(config: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The transformer with deterministic random weights, created directly on ``device``."""
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16: no fp32 copy ever exists
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=device).manual_seed(seed * 7919 + zlib.crc32(name.encode()))
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.01, generator=g)
        for name, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return model.eval()


def add_workload_arguments(ap: argparse.ArgumentParser, *, small_help: str) -> None:
    """The model-size and calibration options of the FLUX quantizer benchmarks (this one, quantize_flux_dist)."""
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU test of the script)")
    ap.add_argument("--small", action="store_true", help=small_help)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--image-tokens", type=int, default=None, help="default 4096 (tiny: 64)")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 512 (tiny: 16)")
    ap.add_argument("--rank", type=int, default=32)


def workload(args: argparse.Namespace) -> tuple[dict, int, int, str]:
    """(model config, image tokens, text tokens, config name) of :func:`add_workload_arguments`' options."""
    config = TINY if args.tiny else SMALL if args.small else FLUX_DEV
    img = args.image_tokens or (64 if args.tiny else 256 if args.small else 4096)
    txt = args.text_tokens or (16 if args.tiny else 64 if args.small else 512)
    return config, img, txt, "tiny" if args.tiny else "small" if args.small else "FLUX.1-dev"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    add_workload_arguments(ap, small_help="width-256 config (CPU test at non-trivial shapes)")
    ap.add_argument("--precision", choices=("int4", "nvfp4"), default="int4")
    ap.add_argument("--calib-rows", type=int, default=256)
    ap.add_argument("--offload", choices=("auto", "blocks", "none"), default="auto")
    ap.add_argument("--state-dir", default="out/quantize_flux_state")
    ap.add_argument("--out", default="out/quantize_flux", help="directory for the JSON report")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds after which no new block starts (then rerun to resume)")
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                    help="default: QuantizeOptions' defaults (GPTQ where a layer has the rows, rank allocation "
                    "under the --rank budget); old: the default before issue 25 (uniform rank, no GPTQ)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", action="store_true", help="also write the quantized model directory")
    args = ap.parse_args()

    start = time.time()
    deadline = start + args.time_budget
    config, img, txt, config_name = workload(args)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    chunks_file = state / "bench-chunks.json"
    chunks = json.loads(chunks_file.read_text()) if chunks_file.is_file() else []

    t = time.time()
    model = build_model(config, args.device, torch.bfloat16, args.seed)
    build_s = time.time() - t
    params = sum(p.numel() for p in model.parameters())
    print(f"built FluxTransformer2DModel ({params / 1e9:.2f} B params) on {args.device} in {build_s:.1f}s")
    calib = synthetic_calibration(model, args.samples, seed=args.seed, image_tokens=img, text_tokens=txt, warn=False)
    opts = QuantizeOptions(rank=args.rank, precision=args.precision, calib_rows=args.calib_rows, seed=args.seed,
                           **RECIPES[args.recipe])
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = run_quantization(model, calib, options=opts, device=args.device,
                              offload={"none": False, "blocks": True}.get(args.offload, "auto"),
                              state_dir=state, progress=True, deadline=deadline)
    rep = result.report
    chunk_timings = rep.timings  # includes the resumed blocks' recorded times
    chunks.append({"wall_s": round(time.time() - start - build_s, 2), "build_s": round(build_s, 2),
                   "peak_gpu_bytes": rep.peak_memory_bytes, "layers_total": len(rep.layers)})
    chunks_file.write_text(json.dumps(chunks, indent=1))
    blocks = len(result.selection.blocks)
    total = sum(v for k, v in chunk_timings.items())
    peak = max(c["peak_gpu_bytes"] for c in chunks)
    out = {
        "benchmark": "quantize_flux",
        "complete": result.complete,
        "config": config_name,
        "params": params,
        "samples": args.samples,
        "image_tokens": img,
        "text_tokens": txt,
        "recipe": args.recipe,
        "options": opts.to_json(),
        "rank_allocation": rep.rank_allocation,
        "gptq_layers": sum(bool(r.get("gptq")) for r in rep.layers),
        "layers_quantized": len(rep.layers),
        "blocks": blocks,
        "phases_s": chunk_timings,
        "total_quantization_s": round(total, 2),
        "sum_of_chunk_wall_s": round(sum(c["wall_s"] for c in chunks), 2),
        "chunks": chunks,
        "peak_gpu_memory_gib": round(peak / 2**30, 2),
        "fidelity_summary": rep.summary(),
        "environment": environment_info(args.device),
    }
    print()
    print(f"{'phase':<20} {'seconds':>10}")
    for k, v in chunk_timings.items():
        print(f"{k:<20} {v:>10.1f}")
    print(f"{'total':<20} {total:>10.1f}   (wall over {len(chunks)} chunk(s): {out['sum_of_chunk_wall_s']:.1f}s)")
    print(f"peak GPU memory: {out['peak_gpu_memory_gib']:.2f} GiB; layers quantized: {len(rep.layers)}; "
          f"params: {params / 1e9:.2f} B; mean layer error {rep.summary().get('svdq', float('nan')):.4f}")
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "quantize_flux.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    if not result.complete:
        done = len({r['layer'] for r in rep.layers})
        print(f"stopped at the time budget after {done} layers: run the same command again to resume")
        return 3
    if args.save:
        from svdq_format.model import save_model_dir

        save_model_dir(result.model.to("cpu"), Path(args.out) / "model")
    print(f"wrote {Path(args.out) / 'quantize_flux.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
