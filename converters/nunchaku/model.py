"""Deprecated: :func:`load_imported_model` (an imported Nunchaku directory loads like any other).

Imports used to keep a FLUX int4 single block's ``proj_out`` as two layers, which needed this
loader. Since format 2 (per-segment activation handling, ``k_segments``, docs/format.md §7.4) an
import has one ``proj_out`` per block, and the directory loads with stock diffusers
(``FluxTransformer2DModel.from_pretrained(dir)`` after ``import svdq_format``) or
:func:`svdq_format.pretrained.load_model_dir`. :func:`load_imported_model` remains as an alias of the
latter that warns; a directory written by an older import (``nunchaku.k_concat`` in its
``quantization_config``) is refused with the command that re-imports it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from svdq_format.checkpoint import read_model_config
from svdq_format.errors import UnsupportedError
from svdq_format.pretrained import load_model_dir

__all__ = ["load_imported_model"]


def load_imported_model(directory: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> nn.Module:
    """Deprecated alias of :func:`svdq_format.pretrained.load_model_dir`.

    Args:
        directory: A model directory written by :func:`converters.nunchaku.importer.import_nunchaku`.
        device: Target device.

    Returns:
        The stock diffusers model with its ``SVDQLinear`` layers.

    Raises:
        UnsupportedError: a directory from an import before format 2 (two-layer ``proj_out``).
    """
    warnings.warn(
        "converters.nunchaku.model.load_imported_model is deprecated: an imported Nunchaku directory loads with "
        "FluxTransformer2DModel.from_pretrained(dir) after `import svdq_format`, or "
        "svdq_format.pretrained.load_model_dir",
        DeprecationWarning,
        stacklevel=2,
    )
    _, meta = read_model_config(Path(directory))
    old = (meta.extra.get("nunchaku") or {}).get("k_concat")
    if old:
        raise UnsupportedError(
            f"{directory}: written by an older import that kept {sorted(old)[0]} as two layers; re-import the "
            "Nunchaku file (svdq convert --from nunchaku <file> <dir>), which writes one layer"
        )
    return load_model_dir(directory, device=device)
