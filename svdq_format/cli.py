"""``svdq`` — the command line. Thin: argparse in, library calls out.

Core commands (``inspect``, ``validate``) live here; the commands of the other packages
(``quantize``, ``demo``, ``lora``, ``convert``, ``push``, ``kernels`` ...) are contributed by
``register(subparsers)`` functions listed in :data:`_PLUGINS` and imported only when the CLI
starts, so ``svdq_format`` itself imports nothing of ours at import time.

Errors the library raises on purpose (:class:`~svdq_format.errors.SVDQError`) and missing
files are printed as one line ``error: ...`` on stderr with exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from .errors import SVDQError
from .version import __version__

__all__ = ["main", "build_parser"]

#: ``module:function`` entries that add subcommands; a missing optional package is skipped.
_PLUGINS: tuple[str, ...] = (
    "converters.cli:register",
    "svdq_kernels.cli:register",
)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .summary import format_summary, summarize

    summary = summarize(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .checkpoint import validate

    meta = validate(args.path, check_values=not args.headers_only)
    if not args.quiet:
        print(f"ok: {args.path}: format_version {meta.format_version}, {len(meta.layers)} layers")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    info = push_to_hub(
        args.directory,
        args.repo_id,
        revision=args.revision,
        private=True if args.private else None,
        commit_message=args.commit_message,
        token=args.token,
        endpoint=args.endpoint,
        base_model=args.base_model,
        license=args.license,
    )
    print(f"pushed {args.directory} to {args.repo_id}@{args.revision or 'main'}: commit {info.oid}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull

    path = pull(
        args.repo_id,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        allow_patterns=args.include or None,
        endpoint=args.endpoint,
    )
    print(path)
    return 0


def _add_hub_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub (one commit, with a model card)")
    p.add_argument("directory", help="SVDQuant model directory (config.json + safetensors)")
    p.add_argument("repo_id", help="owner/name on the Hub (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--base-model", help="base model repo id for the model card")
    p.add_argument("--license", help="license for the model card")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN / the saved login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("pull", help="download a model repo into the Hugging Face cache and print its path")
    p.add_argument("repo_id", help="owner/name on the Hub")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--include", action="append", help="glob of files to fetch (repeatable)")
    p.add_argument("--cache-dir", help="cache directory (default HF_HUB_CACHE)")
    p.add_argument("--local-files-only", action="store_true", help="use the cache only (offline)")
    p.add_argument("--token", help="Hub token")
    p.add_argument("--endpoint", help="Hub URL")
    p.set_defaults(func=_cmd_pull)


def build_parser() -> argparse.ArgumentParser:
    """The full ``svdq`` argument parser (plugins included)."""
    parser = argparse.ArgumentParser(
        prog="svdq",
        description="SVDQuant 4-bit checkpoints: inspect, validate, quantize, LoRA, Hub.",
    )
    parser.add_argument("--version", action="version", version=f"svdquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="summarise a checkpoint file or model directory")
    p.add_argument("path", help="an SVDQuant .safetensors file or a model directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("validate", help="check a checkpoint against the format spec")
    p.add_argument("path", help="an SVDQuant .safetensors file or a model directory")
    p.add_argument("--headers-only", action="store_true", help="skip the value checks (faster)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    p.set_defaults(func=_cmd_validate)

    _add_hub_commands(sub)

    for entry in _PLUGINS:
        module_name, _, func = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # the optional package is not installed
            raise
        getattr(module, func)(sub)
    _add_summaries(parser)
    return parser


def _add_summaries(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its one-line help as the summary line of
    ``svdq COMMAND --help`` (nested commands too)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    text = str(helps[name])
                    sub.description = text[:1].upper() + text[1:] + "."
                _add_summaries(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``svdq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SVDQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        name = exc.filename if exc.filename is not None else ""
        print(f"error: {name}: {exc.strerror or exc}".replace(": : ", ": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
