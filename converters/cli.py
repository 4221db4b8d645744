"""Subcommands of ``svdq`` contributed by :mod:`converters` (registered by svdq_format.cli).

Each command lives in its own module with a ``register(subparsers)`` function; this file only
lists them. Modules import heavy dependencies (diffusers, transformers) inside their command
functions, so ``svdq --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["register"]

#: Modules providing ``register(subparsers)``, one per command family.
COMMAND_MODULES: tuple[str, ...] = (
    "converters.nunchaku.cli",
    "converters.quantize.cli",
    "converters.demo",
    "converters.lora.cli",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add every converters command to the ``svdq`` parser."""
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
