"""Shared pieces of the Nunchaku converters: model skeletons, layer construction, constants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from svdq_format.linear import SVDQLinear
from svdq_format.pretrained import build_model, model_class
from svdq_format.spec import KSegment

__all__ = ["GELU_SHIFT", "EXACT_BIAS_KEY", "PRESET_HINT", "build_skeleton", "find_linear", "is_gelu_fc2", "new_layer",
           "group_indicator", "lora_down", "lora_up", "tensor_scale"]

#: The constant Nunchaku adds to GELU outputs before unsigned int4 quantization.
GELU_SHIFT = 0.171875
#: Header key where our exporter keeps biases that Nunchaku's baked ``+1`` would round.
EXACT_BIAS_KEY = "svdquant_exact_bias"
#: Ends every export error that the quantizer's Nunchaku preset avoids.
PRESET_HINT = 'quantize with `svdq quantize --target nunchaku` (Python: target="nunchaku") so every layer fits Nunchaku'


def build_skeleton(config: Mapping[str, Any], *, file: str | None = None) -> nn.Module:
    """The diffusers model of ``config["_class_name"]`` on the meta device (no memory)."""
    where = file or "config"
    cls = model_class(config, where)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    with torch.device("meta"):
        return build_model(cls, cfg, file=where, meta=False)


def find_linear(model: nn.Module, name: str) -> nn.Linear | None:
    """The ``nn.Linear`` named ``name`` in ``model``, or ``None``."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def is_gelu_fc2(model: nn.Module, name: str) -> bool:
    """``name`` is ``<ff>.net.2`` of a FeedForward whose first layer is a GELU."""
    from diffusers.models.activations import GELU

    if not name.endswith(".net.2"):
        return False
    try:
        return isinstance(model.get_submodule(name[: -len("2")] + "0"), GELU)
    except AttributeError:
        return False


def new_layer(
    *,
    precision: str,
    kind: str,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: float | Sequence[float] | None,
    smooth: torch.Tensor,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
    k_segments: Sequence[KSegment] = (),
) -> SVDQLinear:
    """An ``SVDQLinear`` holding the given canonical tensors (``qweight``: packed uint8 [N, K/2];
    ``wtscale``: nvfp4 tensor scale, one per segment for a layer with ``k_segments``)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    rank = 0 if down is None else down.shape[0]
    layer = SVDQLinear(
        k, n, rank=rank, precision=precision, kind=kind, bias=bias is not None, dtype=dtype,
        scale_dtype=wscales.dtype if precision == "int4" else None,
        act_shift=act_shift, act_unsigned=act_unsigned, k_segments=k_segments,
    )
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.wscales.copy_(wscales)
        if precision == "nvfp4":
            ts = tensor_scale(layer)
            ts.copy_(torch.tensor(wtscale if wtscale is not None else 1.0, dtype=torch.float32).reshape(ts.shape))
        layer.smooth.copy_(smooth)
        if rank:
            assert down is not None and up is not None  # rank > 0: down is given, and up with it
            lora_down(layer).copy_(down)
            lora_up(layer).copy_(up)
        if bias is not None:
            assert layer.bias is not None  # built with bias=True
            layer.bias.copy_(bias)
    return layer


def lora_down(layer: SVDQLinear) -> torch.Tensor:
    """``layer.lora_down``, which every layer with ``rank > 0`` has."""
    assert layer.lora_down is not None, "a rank-0 layer has no low-rank branch"
    return layer.lora_down


def lora_up(layer: SVDQLinear) -> torch.Tensor:
    """``layer.lora_up``, which every layer with ``rank > 0`` has."""
    assert layer.lora_up is not None, "a rank-0 layer has no low-rank branch"
    return layer.lora_up


def tensor_scale(layer: SVDQLinear) -> torch.Tensor:
    """``layer.wtscale``, the fp32 tensor scale every nvfp4 layer has."""
    assert layer.wtscale is not None, "an int4 layer has no tensor scale"
    return layer.wtscale


def group_indicator(groups: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``[groups, k]`` with ones on each group: ``x · Dᵀ`` = per-group sums of x."""
    return torch.eye(groups, dtype=dtype).repeat_interleave(k // groups, dim=1)
