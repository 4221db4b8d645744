"""``svdq convert``: Nunchaku ↔ SVDQuant, and SVDQuant → diffusers ``nunchaku_lite``.

    svdq convert --from nunchaku IN.safetensors OUT_DIR [--dialect flux-cpp|sdxl|native] [--config CONFIG]
    svdq convert --to nunchaku OUT_OF_DIR OUT.safetensors [--dialect ...]
    svdq convert --to nunchaku-lite MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from svdq_format import jsonsafe
from svdq_format.errors import UnsupportedError

__all__ = ["register"]


def _cmd_convert(args: argparse.Namespace) -> int:
    if bool(args.source_format) == bool(args.target_format):
        raise UnsupportedError("give exactly one of --from nunchaku or --to nunchaku|nunchaku-lite")
    if args.config and args.source_format != "nunchaku":
        raise UnsupportedError("--config applies only to --from nunchaku")
    if args.source_format == "nunchaku":
        from svdq_format.errors import FormatError

        from .importer import import_nunchaku

        try:
            out = import_nunchaku(args.input, args.output, dialect=args.dialect, config=_read_config(args.config),
                                  overwrite=args.overwrite)
        except FormatError as exc:
            if exc.key != "config" or not exc.reason.startswith("no diffusers config"):
                raise
            raise FormatError(exc.file, exc.key, "no diffusers config in the header: give the model's config "
                              "with --config (its config.json, or the folder holding it)") from None
        print(f"ok: {args.input} -> {out} (SVDQuant model directory)")
    elif args.target_format == "nunchaku":
        from .exporter import export_nunchaku

        out = export_nunchaku(args.input, args.output, dialect=args.dialect)
        print(f"ok: {args.input} -> {out} (Nunchaku single file)")
    else:
        from .lite import export_nunchaku_lite

        report = export_nunchaku_lite(args.input, args.output, overwrite=args.overwrite)
        print(f"ok: {args.input} -> {args.output} (nunchaku_lite; max nvfp4 scale rounding "
              f"{report['max_rel_scale_error']:.2e})")
    return 0


def _read_config(path: str | None) -> dict[str, Any] | None:
    """The diffusers config of ``--config``: a ``config.json`` file or the folder holding one."""
    if path is None:
        return None
    from svdq_format.errors import FormatError

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        config = jsonsafe.loads(p.read_text())
    except FileNotFoundError:
        raise FormatError(str(p), None, "no such file (--config: the model's config.json)") from None
    except (OSError, ValueError) as exc:
        raise FormatError(str(p), None, f"not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(str(p), None, "not a JSON object (--config: the model's diffusers config)")
    return config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``svdq convert`` to the CLI."""
    p = subparsers.add_parser("convert", help="convert between Nunchaku / nunchaku_lite and SVDQuant checkpoints")
    p.add_argument("--from", dest="source_format", choices=["nunchaku"], help="import from this format")
    p.add_argument("--to", dest="target_format", choices=["nunchaku", "nunchaku-lite"], help="export to this format")
    p.add_argument("--dialect", choices=["flux-cpp", "sdxl", "native"], default=None,
                   help="Nunchaku key dialect (default: detected on import, the model's usual one on export)")
    p.add_argument("--config", metavar="CONFIG",
                   help="with --from nunchaku, for files whose header holds no diffusers config: the model's "
                   "config.json (or the folder holding it), e.g. the base model's transformer/config.json")
    p.add_argument("input", help="Nunchaku .safetensors (or org/repo/file.safetensors) for --from; model dir for --to")
    p.add_argument("output", help="model directory (--from, --to nunchaku-lite) or .safetensors file (--to nunchaku)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model in a non-empty output directory (refused otherwise)")
    p.set_defaults(func=_cmd_convert)
