"""``svdq quantize SRC OUT``: quantize a local diffusers transformer to an SVDQuant directory."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not (sep and h.strip().isdigit() and w.strip().isdigit()) or int(h) <= 0 or int(w) <= 0:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 1024x1024, got {text!r}")
    return int(h), int(w)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from svdq_format.errors import QuantizationError

    from .distributed import env_world_size, launch

    world = env_world_size()
    if args.gpus < 1:
        raise QuantizationError(f"--gpus must be >= 1, got {args.gpus}")
    if world > 1 and args.gpus not in (1, world):
        raise QuantizationError(f"--gpus {args.gpus} under torchrun with WORLD_SIZE={world}: drop --gpus")
    if args.gpus > 1 and world <= 1:
        launch(_rank_main, args.gpus, (args,))  # every rank runs _quantize; rank 0 prints
        return 0
    return _quantize(args)


def _rank_main(args: argparse.Namespace) -> None:
    """Entry point of one process started by ``--gpus N`` (errors: one line, exit status 1)."""
    from svdq_format.errors import SVDQError

    try:
        code = _quantize(args)
    except SVDQError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: lines of several ranks do not interleave
        sys.stderr.flush()
        sys.exit(1)
    if code:
        sys.exit(code)


def _quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from svdq_format.errors import QuantizationError

    from .directory import quantize_directory
    from .options import QuantizeOptions

    opts_kw = dict(
        rank=args.rank, precision=args.precision, smoothing=not args.no_smoothing,
        clip_search=not args.no_clip_search, gptq=args.gptq, gptq_rounds=args.gptq_rounds,
        gptq_damp=args.gptq_damp, gptq_hessian_gib=args.gptq_hessian_gib, rank_allocation=args.rank_allocation,
        max_rank=args.max_rank, refine_iters=args.refine,
        lowrank=args.lowrank, w4a16_rank=args.w4a16_rank, weight_only=args.weight_only,
        calib_rows=args.calib_rows, include=tuple(args.include), exclude=tuple(args.exclude), seed=args.seed,
        target=args.target,
    )
    if args.target == "nunchaku" and args.dtype == "float32":
        raise QuantizationError("--target nunchaku: Nunchaku runs bfloat16 or float16 models; drop --dtype float32")
    if args.alphas is not None:
        opts_kw["alphas"] = args.alphas
    if args.activation_alphas is not None:
        opts_kw["activation_alphas"] = args.activation_alphas
    opts = QuantizeOptions(**opts_kw)
    prompts = None
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise QuantizationError(f"{p}: prompt file not found")
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not prompts:
            raise QuantizationError(f"{p}: the prompt file holds no prompt")
    elif args.steps is not None or args.resolution or args.guidance_scale is not None:
        raise QuantizationError("--steps, --resolution and --guidance-scale apply only with --prompts "
                                "(they set its pipeline calls)")
    steps = 8 if args.steps is None else args.steps
    if steps < 1:
        raise QuantizationError(f"--steps must be >= 1, got {steps}")
    call: dict[str, object] = {"num_inference_steps": steps}
    if args.resolution:
        call["height"], call["width"] = args.resolution
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    import warnings

    import torch

    from .distributed import init_distributed, rank_device
    from .memory import reset_host_peak

    if args.components:
        return _quantize_components(args, opts, prompts, call)

    dist = init_distributed(args.device, timeout_s=args.dist_timeout)
    root = dist is None or dist.is_root
    device = rank_device(args.device, dist) if dist is not None else args.device
    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        torch.empty(0, device=device or "cuda")  # the CUDA context is not part of the run's peak
    host_reset = reset_host_peak()

    def show(message: Warning | str, *_args: object, **_kwargs: object) -> None:
        print(f"warning: {message}", file=sys.stderr)  # one line, when it happens

    finished = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default" if root else "ignore", UserWarning)
            warnings.showwarning = show
            result = quantize_directory(
                args.src, args.out, calibration=args.calibration, prompts=prompts, num_samples=args.num_samples,
                pipeline_kwargs=call if prompts else None,
                options=opts, dtype=args.dtype, device=args.device, offload=args.offload,
                progress=not args.quiet and root, keep_state=args.keep_state, max_shard_size=args.max_shard_size,
                dist=dist, host_peak_reset=host_reset, overwrite=args.overwrite,
            )
        finished = True
    finally:
        if dist is not None:
            dist.close(synchronize=finished)
    if not args.quiet and root:
        print(result.report.table(limit=args.table_rows))
        t = result.report.timings
        print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if v))
        if result.report.skipped:
            print(f"kept 16-bit: {len(result.report.skipped)} candidate layers (see fidelity.json)")
        mem = result.report.environment.get("memory_per_rank") or []
        parts = []
        for m in mem:
            who = f"rank {m['rank']} " if len(mem) > 1 else ""
            gpu = f", GPU {m['peak_gpu_bytes'] / 2**30:.2f} GiB" if m["peak_gpu_bytes"] else ""
            parts.append(f"{who}host {m['peak_host_rss_bytes'] / 2**30:.2f} GiB{gpu}")
        if parts:
            print("peak memory: " + "; ".join(parts))
        from svdq_format.summary import format_size

        weights = sorted(Path(args.out).glob("*.safetensors"))
        files = weights[0].name if len(weights) == 1 else f"{len(weights)} weight shards + index"
        size = format_size(sum(f.stat().st_size for f in weights))
        print(f"wrote {args.out} (config.json, {files}: {size}, fidelity.json)")
    return 0 if result.complete else 3


def _quantize_components(args: argparse.Namespace, opts: object, prompts: list[str] | None,
                         call: dict[str, object]) -> int:
    """``--components``: several components of the pipeline in SRC into the pipeline directory OUT."""
    import warnings

    from svdq_format.errors import QuantizationError
    from svdq_format.summary import format_size

    from .components import quantize_pipeline
    from .options import QuantizeOptions

    if args.gpus > 1:
        raise QuantizationError("--components runs in one process: drop --gpus")
    if args.offload == "disk":
        raise QuantizationError("--components loads each component: --offload disk is not supported with it")
    assert isinstance(opts, QuantizeOptions)

    def show(message: Warning | str, *_args: object, **_kwargs: object) -> None:
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = show
        results = quantize_pipeline(
            args.src, args.out, [c.strip() for c in args.components.split(",") if c.strip()], prompts=prompts,
            num_samples=args.num_samples, pipeline_kwargs=call if prompts else None, options=opts,
            text_encoder_mode=args.text_encoder_mode, dtype=args.dtype, device=args.device, offload=args.offload,
            progress=not args.quiet, keep_state=args.keep_state, max_shard_size=args.max_shard_size)
    if not args.quiet:
        from pathlib import Path

        for name, result in results.items():
            kinds = [r["kind"] for r in result.report.layers]
            size = format_size(sum(f.stat().st_size for f in (Path(args.out) / name).glob("*.safetensors")))
            mean = result.report.summary().get("svdq")
            err = f", mean layer error {mean:.4f}" if mean is not None else ""
            print(f"{name}: {kinds.count('w4a4')} W4A4 + {kinds.count('w4a16')} W4A16 layers{err}, {size}")
        print(f"wrote pipeline {args.out} (DiffusionPipeline.from_pretrained loads it)")
    return 0 if all(r.complete for r in results.values()) else 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``svdq quantize``."""
    from .options import RANK_ALLOCATIONS, QuantizeOptions

    p = subparsers.add_parser(
        "quantize",
        help="quantize a diffusers transformer directory to SVDQuant (W4A4 + low-rank)",
        description="Quantize the transformer of a local diffusers model directory to an SVDQuant "
        "model directory (config.json + diffusion_pytorch_model.safetensors + fidelity.json). "
        "Interrupted runs resume from OUT/.svdq-state.",
    )
    p.add_argument("src", help="local diffusers model (or pipeline) directory")
    p.add_argument("out", help="output model directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model in a non-empty OUT (refused otherwise, unless OUT holds only the "
                        "resume state of an interrupted run)")
    defaults = QuantizeOptions()
    p.add_argument("--rank", type=int, default=32,
                   help="low-rank branch rank (default 32); with --rank-allocation budget: the average")
    p.add_argument("--rank-allocation", choices=RANK_ALLOCATIONS, default=defaults.rank_allocation,
                   help="uniform: every W4A4 layer gets --rank; budget: the same low-rank bytes spent where they "
                   f"lower the model's output error most (ranks multiples of 16; default {defaults.rank_allocation})")
    p.add_argument("--max-rank", type=int, default=None, metavar="R",
                   help="largest rank of --rank-allocation budget (default 4 x --rank)")
    p.add_argument("--precision", choices=("int4", "nvfp4"), default="int4",
                   help="4-bit format of the residual: int4 (group 64, any GPU) or nvfp4 (E2M1, group 16; "
                   "Blackwell's native format) (default int4)")
    p.add_argument("--target", choices=("svdquant", "nunchaku"), default="svdquant",
                   help="runtime preset: svdquant (default) or nunchaku: every layer representable in Nunchaku's "
                   "files (norm_out 16-bit, AdaLN as AWQ W4A16, int4 GELU-fed inputs shifted unsigned), so "
                   "'svdq convert --to nunchaku' succeeds")
    p.add_argument("--calibration", default="synthetic",
                   help="'synthetic' (default; lower quality) or a calibration .safetensors file")
    p.add_argument("--prompts", help="text file, one prompt per line: calibrate by running the pipeline in SRC")
    p.add_argument("--num-samples", type=int, default=8, help="calibration samples (synthetic / prompts)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="with --prompts: denoising steps of each pipeline call (default 8)")
    p.add_argument("--resolution", type=_size, default=None, metavar="HxW",
                   help="with --prompts: image height x width of each call, e.g. 1024x1024 (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="G",
                   help="with --prompts: guidance scale of each call (default: the pipeline's)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated pipeline components to quantize, e.g. transformer,text_encoder_2 "
                   "(or 'all'): OUT becomes a whole pipeline directory, the other components copied")
    p.add_argument("--text-encoder-mode", choices=("auto", "w4a16", "w4a4"), default="auto",
                   help="with --components: text encoders W4A16 with W4A4 where its measured error is within 10%% "
                        "of W4A16's (auto, default), all weight-only (w4a16) or all W4A4 + low-rank (w4a4)")
    p.add_argument("--calib-rows", type=int, default=256, help="activation rows kept per layer")
    p.add_argument("--alphas", type=_floats, default=None, help="smoothing grid, e.g. 0.2,0.4,0.6")
    p.add_argument("--activation-alphas", type=_floats, default=None,
                   help="extra candidates s = amax_x^alpha (default 0.4,0.6)")
    p.add_argument("--no-smoothing", action="store_true", help="no smoothing search (s = 1)")
    p.add_argument("--no-clip-search", action="store_true", help="int4 scales = absmax/7")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=defaults.gptq,
                   help="GPTQ on the int4 residual, low-rank branch re-fitted after it. Default: on int4 layers "
                   "with enough calibration rows; --gptq: required (refused when a layer has too few rows)")
    p.add_argument("--gptq-rounds", type=int, default=defaults.gptq_rounds, metavar="N",
                   help=f"GPTQ + low-rank re-fit rounds (default {defaults.gptq_rounds})")
    p.add_argument("--gptq-damp", type=float, default=defaults.gptq_damp, metavar="D",
                   help=f"GPTQ damping, a fraction of the Hessian's mean diagonal (default {defaults.gptq_damp})")
    p.add_argument("--gptq-hessian-gib", type=float, default=None, metavar="GIB",
                   help="memory for GPTQ's Hessians over every calibration row (default: 16 GiB or a quarter of "
                   "the device's memory, whichever is less); layers left out use the kept rows")
    p.add_argument("--refine", type=int, default=3, metavar="N", help="low-rank refinement iterations")
    p.add_argument("--lowrank", choices=("auto", "svd", "randomized"), default="auto",
                   help="how the low-rank branch is computed: exact SVD, randomised SVD (much faster on large "
                   "layers), or auto: exact only on small layers (default auto)")
    p.add_argument("--w4a16-rank", type=int, default=0, help="rank of weight-only (AdaLN) layers")
    p.add_argument("--weight-only", action="store_true", help="quantize every layer W4A16")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="also quantize these layers")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="keep these layers 16-bit")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype SRC is loaded in and the 16-bit parts (low-rank branch, smoothing, biases, "
                   "unquantized layers) are stored in (default bfloat16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--offload", choices=("auto", "blocks", "none", "disk"), default="auto",
                   help="stream blocks between CPU and device (auto: when the model does not fit); disk: "
                   "read each block from SRC's safetensors files when needed (model never fully in memory)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic calibration, the pipeline calls of --prompts, the row sampling "
                   "and the randomised SVD: the same seed gives the same bytes (default 0)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="processes (one per GPU; gloo on --device cpu) sharing the work; the result is "
                   "byte-identical to one process. Under torchrun, WORLD_SIZE is used instead")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="seconds a process waits for the others before the run fails (default 1800)")
    p.add_argument("--keep-state", action="store_true", help="keep OUT/.svdq-state after success")
    p.add_argument("--max-shard-size", default="10GB", help="largest weight file (default 10GB)")
    p.add_argument("--table-rows", type=int, default=40, help="rows of the fidelity table to print")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no closing report (errors and warnings still go to stderr)")
    p.set_defaults(func=_cmd_quantize)


if __name__ == "__main__":  # pragma: no cover
    from svdq_format.cli import main

    sys.exit(main(["quantize", *sys.argv[1:]]))
