"""svdq_format — the SVDQuant checkpoint format: spec, packing, reference math, I/O.

This package depends on nothing else of svdquant. Quick start::

    import torch, svdq_format as sf
    layer = sf.SVDQLinear.from_linear(torch.nn.Linear(256, 128), rank=16, precision="int4")
    sf.save_file({"proj": layer}, "proj.safetensors")
    layers = sf.load_file("proj.safetensors")
    sf.validate("proj.safetensors")
"""

from __future__ import annotations

# diffusers and transformers: ``quant_method: "svdquant"`` (registered when their quantizers are imported).
from ._autoregister import install as _install_integrations
from .checkpoint import load_file, validate
from .errors import (
    BackendError,
    FormatError,
    HeaderError,
    HubError,
    LoRAError,
    ManifestError,
    OutputError,
    QuantizationError,
    SVDQError,
    TensorError,
    UnsupportedError,
    VersionError,
    WriteError,
)
from .io import read_metadata, save_file
from .linear import EXEC_MODES, SVDQLinear
from .model import save_pretrained, save_single_file, set_mode
from .ops import Backend, available_backends, reference_linear, register_backend, svdq_linear
from .pretrained import load_pretrained
from .spec import FEATURES, FORMAT_VERSION, LAYOUT, QUANT_METHOD, FormatMetadata, KSegment, LayerSpec
from .version import __version__

_install_integrations()

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "FEATURES",
    "LAYOUT",
    "QUANT_METHOD",
    "EXEC_MODES",
    "FormatMetadata",
    "LayerSpec",
    "KSegment",
    "SVDQLinear",
    "save_file",
    "load_file",
    "read_metadata",
    "validate",
    "save_pretrained",
    "save_single_file",
    "load_pretrained",
    "set_mode",
    "Backend",
    "available_backends",
    "register_backend",
    "reference_linear",
    "svdq_linear",
    "SVDQError",
    "FormatError",
    "HeaderError",
    "VersionError",
    "ManifestError",
    "TensorError",
    "UnsupportedError",
    "BackendError",
    "QuantizationError",
    "LoRAError",
    "HubError",
    "OutputError",
    "WriteError",
]
