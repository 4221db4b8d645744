"""One FLUX.1-dev transformer step, bf16 vs SVDQuant, eager and compiled: time, weight memory, peak.

The model is diffusers' ``FluxTransformer2DModel(guidance_embeds=True)`` at the FLUX.1-dev shape
(19 double + 38 single blocks, width 3072) with deterministic random bf16 weights, run at
1024×1024 (4096 image tokens) with 512 text tokens, batch 1 — one denoising step. Measured in
one process, in this order:

1. bf16: eager (and ``--compile``: ``torch.compile``) step time, transformer weights on the GPU,
   peak memory of a step;
1b. ``--fp8-peer``: the same model as dynamic FP8 rowwise W8A8 (every linear of the blocks:
   per-token e4m3 activations, per-row e4m3 weights, ``torch._scaled_mm`` with bias and fast
   accumulation — what torchao's float8 dynamic inference does; :class:`Fp8RowwiseLinear`),
   compiled in the same mode; then the bf16 linears are put back;
2. quantized in place by our quantizer (synthetic calibration, ``--samples``; ``--fast``
   skips the smoothing/clipping searches: speed, not quality, is measured here);
3. SVDQuant in ``--mode`` (default ``fast``; the Hopper kernels when ``import svdq_kernels``
   finds an sm_90 GPU, else the reference backend): eager and compiled step time, weights on
   the GPU, peak.

Targets (issue 10, H100): ≤ 0.67 × the bf16 step time (≈ 120 ms) and ≤ 7 GiB of transformer
weights.

    python benchmarks/flux_step.py --out out/flux_step.json --compile
    python benchmarks/flux_step.py --tiny --device cpu --steps 2     # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize_flux import FLUX_DEV, TINY, build_model  # noqa: E402

GIB = 2**30


def inputs(model: torch.nn.Module, *, image_tokens: int, text_tokens: int, device: str) -> dict:
    """One step's transformer inputs (batch 1): a synthetic sample (another seed than the
    calibration's) on ``device``."""
    from converters.quantize import synthetic_calibration

    sample = synthetic_calibration(model, 1, seed=12345, image_tokens=image_tokens, text_tokens=text_tokens,
                                   warn=False).samples[0]
    return {k: v.to(device) for k, v in sample.items()}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (the transformer's weights as held), each storage once
    (fused q/k/v layers and their members' views share one)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def time_steps(fn, *, steps: int, warmup: int, device: str) -> tuple[list[float], int]:
    """Wall seconds of ``steps`` calls (after ``warmup``) and the peak memory of one call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return times, peak


class Fp8RowwiseLinear(torch.nn.Module):
    """A linear layer as dynamic FP8 rowwise W8A8: e4m3 weights with one fp32 scale per output
    row (``absmax / 448``), activations quantized per token the same way at run time,
    ``torch._scaled_mm`` with the bias and fast accumulation, bf16 out."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        sw = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        self.register_buffer("w8", (w.float() / sw).to(torch.float8_e4m3fn))
        self.register_buffer("sw", sw.t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        sx = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
        xq = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.w8.t(), scale_a=sx, scale_b=self.sw, bias=self.bias,
                             out_dtype=x.dtype, use_fast_accum=True)
        return y.reshape(*x.shape[:-1], self.out_features)


def swap_block_linears(model: torch.nn.Module, make) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace every ``nn.Linear`` inside the transformer blocks by ``make(linear)``; returns
    ``(parent, name, old)`` to put them back."""
    swapped = []
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        for parent in getattr(model, blocks).modules():
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, make(child))
                    swapped.append((parent, name, child))
    return swapped


#: Kernel-name patterns → what the time is spent on (first match wins; see profile_step).
KINDS = (
    ("Inductor fused kernels (norms, quantizer, elementwise)", ("triton_",)),  # names may mention sdpa
    ("svdq gemm (CUTLASS group-64)", ("Svdq",)),
    ("svdq prologue / low-rank down (Triton)", ("prologue_", "lowrank_sum", "lowrank_tiles", "codes_tiles")),
    ("svdq e4m3 weight pass (Triton)", ("e4m3_weights",)),
    ("FP8 GEMM (torch._scaled_mm)", ("f8f8bf16", "e4m3", "Float8", "fp8")),
    ("svdq gemm (Triton)", ("gemm_kernel", "gemm_t_kernel", "splitk_reduce", "gemv_kernel")),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("cuBLAS GEMM (low-rank source, 16-bit layers)", ("nvjet", "gemm", "xmma", "cublas", "cutlass")),
)


def profile_step(fn, *, label: str) -> dict:
    """GPU milliseconds of one call of ``fn`` by kernel kind (:data:`KINDS`; torch.profiler),
    printed with the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    other: list[tuple[float, int, str]] = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0.0)
        if not us or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = next((k for k, pats in KINDS if any(p in evt.key for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
        if kind == "other":
            other.append((us / 1e3, evt.count, evt.key))
    for ms, count, key in sorted(other, reverse=True)[:8]:  # full names: the table cuts them at 70 characters
        print(f"{label}: other {ms:7.2f} ms {count:5d} calls  {key[:400]}")
    kinds["total"] = sum(kinds.values())
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    print(f"{label}: GPU ms by kind: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
          flush=True)
    return kinds


def profile_ops(model, x, *, label: str, rows: int = 30) -> None:
    """Which ops launch the GPU time of a compiled step, by op and input shapes: ``model`` compiled
    without CUDA graphs (graph replays hide the launching op), profiled with ``record_shapes``."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    plain = torch.compile(model)
    with torch.no_grad():
        plain(**x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            plain(**x)
            torch.cuda.synchronize()
    print(f"{label}: compiled without CUDA graphs, GPU time by op and input shapes")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=rows,
                                                               max_name_column_width=60, max_shapes_column_width=90))
    torch._dynamo.reset()


def measure(model, x, *, label: str, args, compile: bool = True, eager: bool = True) -> dict:
    """Eager (unless ``eager=False``) and compiled step times of ``model`` on ``x``."""
    out = {"weights_bytes": weight_bytes(model)}
    if eager:
        times, peak = time_steps(lambda: model(**x), steps=args.steps, warmup=args.warmup, device=args.device)
        out["eager"] = {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak}
        _print_time(label, "eager", out)
        if args.profile and args.device.startswith("cuda"):
            out["eager"]["gpu_ms_by_kind"] = profile_step(lambda: model(**x), label=f"{label} eager")
    if args.compile and compile:
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=args.compile_mode)
        t = time.perf_counter()
        with torch.no_grad():
            compiled(**x)
        compile_s = time.perf_counter() - t
        times, peak = time_steps(lambda: compiled(**x), steps=args.steps, warmup=args.warmup, device=args.device)
        out["compiled"] = {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak,
                           "first_call_s": compile_s, "mode": args.compile_mode}
        _print_time(label, "compiled", out)
        if args.profile and args.device.startswith("cuda"):
            out["compiled"]["gpu_ms_by_kind"] = profile_step(lambda: compiled(**x), label=f"{label} compiled")
        if args.profile_shapes and args.device.startswith("cuda") and label.startswith("svd"):
            profile_ops(model, x, label=label)
    return out


def _print_time(label: str, kind: str, out: dict) -> None:
    """One ``ms/step`` line, printed as soon as it is timed (before any profiling: a run cut short
    still reports it)."""
    extra = f"  first call {out[kind]['first_call_s']:.0f} s" if "first_call_s" in out[kind] else ""
    print(f"{label:<10} {kind:<9} {out[kind]['median_s'] * 1e3:9.1f} ms/step  weights "
          f"{out['weights_bytes'] / GIB:6.2f} GiB  peak {out[kind]['peak_bytes'] / GIB:6.2f} GiB{extra}", flush=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the SVDQuant model (the settings :func:`main` sets before timing it)."""

    key: str  #: its entry in the results JSON
    label: str  #: its printed name (10 characters)
    in_gemm: bool  #: the low-rank branch inside the GEMM (svdq_kernels.cutlass_fast8.LOWRANK_IN_GEMM)
    convert: str  #: where the int4 kernels convert the weights (cutlass_fast8.CONVERT)
    prologue: str  #: the fast8 prologue (svdq_format.ops.FAST8_PROLOGUE)
    weights: str  #: what the GEMM reads at M >= 2048 (cutlass_fast8.WEIGHTS)
    rank0_graph: bool  #: rank-0 layers quantized in the compiled graph (svdq_format.ops.GRAPH_QUANTIZE_RANK0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    ap.add_argument("--image-tokens", type=int, default=None, help="default 4096 (1024x1024); tiny: 64")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 512; tiny: 16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile both models")
    ap.add_argument("--no-bf16-compile", action="store_true", help="with --compile: compile the SVDQuant model only")
    ap.add_argument("--no-svdq-eager", action="store_true",
                    help="with --compile: time the SVDQuant model compiled only (a shorter GPU run)")
    ap.add_argument("--profile", action="store_true",
                    help="GPU time of one SVDQuant step by kernel kind, eager and compiled (torch.profiler)")
    ap.add_argument("--rank0-graph", choices=("on", "off", "both"), default=None,
                    help="compiled: rank-0 layers quantized in the graph with an empty stand-in for x (on, "
                         "svdq_format.ops.GRAPH_QUANTIZE_RANK0's default) or inside svdquant::linear (off); both: "
                         "the SVDQuant model timed with each")
    ap.add_argument("--profile-shapes", action="store_true",
                    help="also profile the SVDQuant model compiled without CUDA graphs, by op and input shapes "
                         "(names the ops behind 'other' GPU time)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode (e.g. reduce-overhead for CUDA graphs)")
    ap.add_argument("--samples", type=int, default=4, help="synthetic calibration samples")
    ap.add_argument("--fast", action="store_true", help="quantize without the smoothing / clipping searches")
    ap.add_argument("--mode", choices=("auto", "fast", "fast8", "exact"), default="fast",
                    help="execution mode of the W4A4 layers")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="fuse q/k/v projections (diffusers' fuse_qkv_projections) in both models")
    ap.add_argument("--fp8-peer", action="store_true",
                    help="also time the model as dynamic FP8 rowwise W8A8 (torch._scaled_mm), compiled like the others")
    ap.add_argument("--convert", default="consumer", choices=("consumer", "producer", "both"),
                    help="where the fast8 kernels at M >= 2048 convert the int4 weights (svdq_kernels."
                         "cutlass_fast8.CONVERT); both: the SVDQuant model timed with each")
    ap.add_argument("--weights", default=None, choices=("int4", "e4m3", "both"),
                    help="what the fast8 GEMM at M >= 2048 reads (svdq_kernels.cutlass_fast8.WEIGHTS; default: "
                         "SVDQ_FAST8_WEIGHTS's setting): the int4 codes, or e4m3 weights from a per-call pass; "
                         "both: the SVDQuant model timed with each")
    ap.add_argument("--prologue", default=None, choices=("fused", "inductor", "both"),
                    help="the fast8 prologue (svdq_format.ops.FAST8_PROLOGUE; default: SVDQ_FAST8_PROLOGUE's "
                         "setting); both: the SVDQuant model timed with each")
    ap.add_argument("--lowrank", default="gemm", choices=("gemm", "two-step", "both"),
                    help="fast8's low-rank branch: inside the GEMM (k-tiles), as a cuBLAS GEMM + bf16 source, "
                         "or both (the SVDQuant model compiled and timed twice)")
    ap.add_argument("--out", default="flux_step.json")
    args = ap.parse_args(argv)
    if args.no_svdq_eager and not args.compile:
        ap.error("--no-svdq-eager needs --compile (nothing else would be timed)")

    from converters.quantize import quantize_model, synthetic_calibration
    from svdq_format import fusion
    from svdq_format.model import set_mode, svdq_modules

    if args.device.startswith("cuda"):
        importlib.import_module("svdq_kernels")  # registers the Hopper backend
    img = args.image_tokens or (64 if args.tiny else 4096)
    txt = args.text_tokens or (16 if args.tiny else 512)
    model = build_model(TINY if args.tiny else FLUX_DEV, args.device, torch.bfloat16, 0).eval()
    x = inputs(model, image_tokens=img, text_tokens=txt, device=args.device)
    print(f"FLUX {'tiny' if args.tiny else '.1-dev'} shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"params, {img} image + {txt} text tokens, batch 1, device {args.device}")
    result: dict = {"benchmark": "flux_step", "image_tokens": img, "text_tokens": txt,
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:  # after every stage: a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    if args.fuse_qkv:
        model.fuse_qkv_projections()
    result["fuse_qkv"] = args.fuse_qkv
    result["bf16"] = measure(model, x, label="bf16", args=args, compile=not args.no_bf16_compile)
    save()
    if args.fp8_peer:
        swapped = swap_block_linears(model, Fp8RowwiseLinear)
        result["fp8_linears"] = len(swapped)
        result["fp8"] = measure(model, x, label="fp8 w8a8", args=args, eager=not args.compile)
        with torch.no_grad():
            y8 = model(**x).sample.float()
        for parent, name, old in swapped:
            setattr(parent, name, old)
        del swapped
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        with torch.no_grad():
            ref8 = model(**x).sample.float()
        result["fp8_output_rel_err_vs_bf16"] = float((y8 - ref8).norm() / ref8.norm())
        del y8, ref8
    if args.fuse_qkv:
        model.unfuse_qkv_projections()  # the quantizer quantizes the separate projections
    save()
    with torch.no_grad():
        ref = model(**x).sample.float()

    t = time.perf_counter()
    calib = synthetic_calibration(model, args.samples, seed=0, image_tokens=img, text_tokens=txt, warn=False)
    extra = {"smoothing": False, "clip_search": False, "refine_iters": 0} if args.fast else {}
    quantize_model(model, calib, rank=32, device=args.device, **extra)
    result["quantize_s"] = round(time.perf_counter() - t, 1)
    layers = svdq_modules(model)
    set_mode(model, args.mode)
    if args.fuse_qkv:
        fusion.install(model)
        model.fuse_qkv_projections()
        result["svdq_fused_layers"] = len(fusion.fused_modules(model))
    result["mode"] = args.mode
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    result["svdq_layers"] = len(layers)
    import warnings

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():  # e.g. a fallback to the reference
        warnings.simplefilter("always")
        model(**x)
    result["svdq_warnings"] = sorted({str(w.message)[:300] for w in caught})
    for w in result["svdq_warnings"]:
        print(f"warning: {w}")
    save()
    from svdq_format import ops

    cutlass_fast8 = None
    if args.device.startswith("cuda"):
        from svdq_kernels import cutlass_fast8
    prologue = args.prologue or ops.FAST8_PROLOGUE
    weights = args.weights or getattr(cutlass_fast8, "WEIGHTS", "int4")
    rank0 = args.rank0_graph or ("on" if ops.GRAPH_QUANTIZE_RANK0 else "off")
    first = Variant("svdq", "svdquant", in_gemm=args.lowrank != "two-step",
                    convert="consumer" if args.convert == "both" else args.convert,
                    prologue="fused" if prologue == "both" else prologue,
                    weights="int4" if weights == "both" else weights, rank0_graph=rank0 != "off")
    variants = [first]
    if args.convert == "both":
        variants.append(dataclasses.replace(first, key="svdq_producer", label="svdq produ", convert="producer"))
    if prologue == "both":
        variants.append(dataclasses.replace(first, key="svdq_inductor", label="svdq induc", prologue="inductor"))
    if weights == "both":
        variants.append(dataclasses.replace(first, key="svdq_e4m3", label="svdq e4m3", weights="e4m3"))
    if args.lowrank == "both":
        variants.append(dataclasses.replace(first, key="svdq_two_step", label="svdq 2step", in_gemm=False))
    if rank0 == "both":
        variants.append(dataclasses.replace(first, key="svdq_rank0_op", label="svdq r0op", rank0_graph=False))
    saved = (ops.FAST8_PROLOGUE, ops.GRAPH_QUANTIZE_RANK0,
             cutlass_fast8 and (cutlass_fast8.LOWRANK_IN_GEMM, cutlass_fast8.CONVERT,
                                getattr(cutlass_fast8, "WEIGHTS", "int4")))

    def use(v: Variant) -> None:
        ops.FAST8_PROLOGUE = v.prologue  # read while tracing: each compile sees its own
        ops.GRAPH_QUANTIZE_RANK0 = v.rank0_graph
        if cutlass_fast8 is not None:
            cutlass_fast8.LOWRANK_IN_GEMM, cutlass_fast8.CONVERT = v.in_gemm, v.convert
            cutlass_fast8.WEIGHTS = v.weights  # read at each call (the op runs Python)

    try:
        for v in variants:
            use(v)
            with torch.no_grad():  # the variant's per-weight caches made outside CUDA graphs' memory pool
                model(**x)
            result[v.key] = measure(model, x, label=v.label, args=args, eager=not args.no_svdq_eager)
            result[v.key].update(lowrank_in_gemm=v.in_gemm, convert=v.convert, prologue=v.prologue,
                                 weights=v.weights, rank0_graph=v.rank0_graph)
            save()
        use(first)
        with torch.no_grad():
            y = model(**x).sample.float()
    finally:  # the process's settings as they were
        ops.FAST8_PROLOGUE, ops.GRAPH_QUANTIZE_RANK0 = saved[0], saved[1]
        if cutlass_fast8 is not None:
            cutlass_fast8.LOWRANK_IN_GEMM, cutlass_fast8.CONVERT, cutlass_fast8.WEIGHTS = saved[2]
    result["svdq_output_rel_err_vs_bf16"] = float((y - ref).norm() / ref.norm())
    for v in variants:
        key, label = v.key, v.label
        for k in ("eager", "compiled"):
            if k in result[key]:
                result[key][k]["vs_bf16_eager"] = result[key][k]["median_s"] / result["bf16"]["eager"]["median_s"]
                if "compiled" in result.get("fp8", {}) and k == "compiled":
                    result[key][k]["vs_fp8_compiled"] = (result[key][k]["median_s"]
                                                         / result["fp8"]["compiled"]["median_s"])
                    print(f"{label} compiled vs FP8 W8A8 compiled: {result[key][k]['vs_fp8_compiled']:.3f}x "
                          "(target <= 0.95)")
    best = min((result["svdq"][k]["vs_bf16_eager"], k) for k in ("eager", "compiled") if k in result["svdq"])
    print(f"quantized in {result['quantize_s']} s; "
          f"output vs bf16: rel err {result['svdq_output_rel_err_vs_bf16']:.3f}; "
          f"step time vs bf16 eager: {best[0]:.2f}x ({best[1]}; target <= 0.67 on an H100)")
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
