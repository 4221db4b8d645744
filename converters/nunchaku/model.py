"""Load an imported Nunchaku model directory, including layers kept split along K.

:func:`svdq_format.pretrained.load_model_dir` loads any import whose layers all have a stock
diffusers module. FLUX single blocks whose ``proj_out`` could not be merged into one layer
(int4 files always: the MLP half runs on shifted, unsigned activations) keep two layers,
``single_transformer_blocks.i.attn.to_out`` and ``single_transformer_blocks.i.mlp_fc2``, listed
in ``quantization_config["nunchaku"]["k_concat"]``. :func:`load_imported_model` places those two
layers at their own paths and replaces ``proj_out`` by :class:`KConcatLinear`, a parameter-free
module computing ``attn_part(x[..., :k]) + mlp_part(x[..., k:])`` — exactly what Nunchaku runs.
Everything else (files, manifests, key sets, tensors) is the loading core's
(:func:`svdq_format.checkpoint.open_checkpoint`, :func:`svdq_format.checkpoint.load_into`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from svdq_format.checkpoint import load_into, open_checkpoint
from svdq_format.errors import ManifestError
from svdq_format.linear import SVDQLinear
from svdq_format.model import set_submodule
from svdq_format.pretrained import model_class

__all__ = ["KConcatLinear", "load_imported_model"]


class KConcatLinear(nn.Module):
    """``y = first(x[..., :split]) + second(x[..., split:])`` over two layers owned elsewhere.

    The parts stay registered at their own module paths (so the checkpoint's keys are the
    model's keys); this module only holds references and has no parameters of its own.
    """

    _parts: tuple[nn.Module, nn.Module]

    def __init__(self, first: nn.Module, second: nn.Module, split: int, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "_parts", (first, second))  # not registered: no duplicate keys
        self.split, self.in_features, self.out_features = split, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self._parts
        return first(x[..., : self.split]) + second(x[..., self.split :])

    def extra_repr(self) -> str:
        return f"split={self.split}, in_features={self.in_features}, out_features={self.out_features}"


def load_imported_model(directory: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> nn.Module:
    """Build the diffusers model of an imported directory and load it (K-split layers included).

    Args:
        directory: A model directory written by :func:`converters.nunchaku.importer.import_nunchaku`
            (any SVDQuant model directory works; without K-split layers this equals
            :func:`svdq_format.pretrained.load_model_dir`).
        device: Target device.

    Returns:
        The model, with ``SVDQLinear`` layers (and :class:`KConcatLinear` wrappers) in place.
    """
    ckpt = open_checkpoint(directory, need_config=True)
    assert ckpt.config is not None and ckpt.config_metadata is not None
    cfg_path, layers = ckpt.where, ckpt.layers
    model = model_class(ckpt.config, cfg_path).from_config(ckpt.config)
    k_concat = (ckpt.config_metadata.extra.get("nunchaku") or {}).get("k_concat") or {}
    for target, parts in k_concat.items():
        if not isinstance(parts, list) or len(parts) != 2 or not all(p in layers for p in parts):
            raise ManifestError(cfg_path, f"nunchaku.k_concat.{target}", "must name two layers of the manifest")
        old = model.get_submodule(target)
        first, second = (SVDQLinear.from_spec(layers[p], device="meta") for p in parts)
        if first.in_features + second.in_features != old.in_features or first.out_features != old.out_features:
            raise ManifestError(cfg_path, f"nunchaku.k_concat.{target}", "parts do not add up to the module's shape")
        set_submodule(model, parts[0], first)
        set_submodule(model, parts[1], second)
        set_submodule(model, target, KConcatLinear(first, second, first.in_features, old.in_features,
                                                   old.out_features))
    load_into(model, ckpt, device=device)
    return model.to(device)
