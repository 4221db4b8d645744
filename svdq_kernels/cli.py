"""``svdq kernels ...``: prebuild the CUTLASS kernels into the cache, show the kernel setup.

Registered into the ``svdq`` CLI by ``svdq_format.cli`` (entry ``svdq_kernels.cli:register``).
"""

from __future__ import annotations

import argparse
import json

from svdq_format.errors import BackendError

__all__ = ["register"]


def _check_build_host() -> None:
    import torch

    if torch.version.cuda is None:
        raise BackendError(
            f"this torch build ({torch.__version__}) has no CUDA: kernels link against "
            "libtorch_cuda; install a CUDA build of torch on the GPU machine and run "
            "'svdq kernels build' there"
        )


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build_kernels
    from .configs import (
        AUTO_GROUP64_LR_CONFIGS,
        AUTO_GROUP64_W4A16_CONFIGS,
        DEFAULT_CONFIGS,
        SS_TUNED_CONFIGS,
        config_by_name,
    )
    from .cutlass_fast8 import WEIGHTS
    from .registry import experimental_kernels

    if args.config:
        configs = [config_by_name(n) for n in args.config]
    else:  # what the model will ask for: the low-rank k-tile kernels (every fast8 layer with a low-rank
        # branch), the experimental W4A16 kernels only when they are on, the tuned pre-converted fast8
        # ones with SVDQ_FAST8_WEIGHTS=e4m3 (the default)
        configs = (list(DEFAULT_CONFIGS) + list(AUTO_GROUP64_LR_CONFIGS)
                   + (list(AUTO_GROUP64_W4A16_CONFIGS) if experimental_kernels() else [])
                   + (list(SS_TUNED_CONFIGS) if WEIGHTS == "e4m3" else []))
    if args.list:
        for config in configs:
            print(config.name)
        return 0
    toolchain = None
    if args.torch_dir:
        from .build import detect_toolchain

        toolchain = detect_toolchain(torch_dir=args.torch_dir)
        print(f"building against torch {toolchain.torch_version} in {toolchain.torch_dir}")
    else:
        _check_build_host()
    results = build_kernels(configs, jobs=args.jobs, force=args.force, verbose=args.verbose, toolchain=toolchain)
    for config, res in zip(configs, results):
        state = "cached" if res.cached else f"built in {res.seconds:.0f} s"
        print(f"{config.name}: {state}: {res.path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import registry
    from .build import cache_dir, detect_toolchain

    info: dict[str, object] = {"cache_dir": str(cache_dir()), "backend": registry.BACKEND_NAME}
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for need in ("triton", "nvcc", "nvidia-cutlass"):
        info[need] = registry.requirement_missing(need) or "ok"
    try:
        info["toolchain"] = detect_toolchain().key_fields()
    except BackendError as exc:
        info["toolchain"] = f"unavailable: {exc}"
    root = cache_dir()
    info["cached_kernels"] = sorted(p.name for p in root.glob("*.so")) if root.is_dir() else []
    info["paths"] = {f"{prec}/{act}": path.name for (prec, act), path in registry.PATHS.items()}
    on = registry.experimental_kernels()
    info["experimental_paths"] = {f"{prec}/{act}": f"{path.name} ({'on' if on else 'off: SVDQ_EXPERIMENTAL_KERNELS=1'})"
                                  for (prec, act), path in registry.EXPERIMENTAL_PATHS.items()}
    from .triton_prologue import SPLIT_K_MAX_M, small_m_splits

    info["small_m_splits"] = f"on at M <= {SPLIT_K_MAX_M}" if small_m_splits() else "off"
    from .triton_gemv import GEMV_MAX_M

    info["w4a16_gemv"] = f"at M <= {GEMV_MAX_M} (SVDQ_GEMV_MAX_M)" if GEMV_MAX_M else "off (SVDQ_GEMV_MAX_M=0)"
    from svdq_format import ops

    from . import cutlass_fast8

    # the fast8 layer's two settings (docs/kernels.md): where it quantizes, where it converts weights
    info["fast8_prologue"] = f"{ops.FAST8_PROLOGUE} (SVDQ_FAST8_PROLOGUE: {' | '.join(ops.FAST8_PROLOGUES)})"
    info["fast8_convert"] = f"{cutlass_fast8.CONVERT} (cutlass_fast8.CONVERT: consumer | producer, at M >= 2048)"
    from .configs import SS_TUNED_CONFIGS

    choices = " | ".join(cutlass_fast8.WEIGHTS_CHOICES)
    info["fast8_weights"] = (f"{cutlass_fast8.WEIGHTS} (SVDQ_FAST8_WEIGHTS: {choices}; e4m3 at M >= "
                             f"{cutlass_fast8.SS_MIN_M}: {', '.join(c.name for c in SS_TUNED_CONFIGS)})")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``svdq kernels build|info``."""
    p = subparsers.add_parser("kernels", help="GPU kernels: prebuild the cache, show the setup")
    sub = p.add_subparsers(dest="kernels_command", metavar="ACTION")
    b = sub.add_parser("build", help="compile the CUTLASS kernels into the cache (needs nvcc + CUDA torch)")
    b.add_argument("--config", action="append", metavar="NAME",
                   help="a kernel configuration name (repeatable; default: all defaults and the low-rank "
                        "k-tile kernels, plus the experimental W4A16 kernels with SVDQ_EXPERIMENTAL_KERNELS=1 "
                        "and the pre-converted fast8 kernels with SVDQ_FAST8_WEIGHTS=e4m3, the default)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--jobs", type=int, default=0, help="parallel nvcc processes (default: auto)")
    b.add_argument("--list", action="store_true", help="print the configuration names and exit")
    b.add_argument("--torch-dir", metavar="DIR",
                   help="build against this unpacked CUDA torch wheel (its torch/ folder) instead of the "
                        "installed torch: prebuild a GPU machine's cache on a machine without a GPU "
                        "(copy the cache directory over)")
    b.add_argument("-v", "--verbose", action="store_true", help="print nvcc commands and timings")
    b.set_defaults(func=_cmd_build)
    i = sub.add_parser("info", help="cache directory, toolchain, GPU and backend requirements")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
