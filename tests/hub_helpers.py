"""Tiny quantized diffusers models for the hub / pretrained tests (built in-process, CPU, fast)."""

from __future__ import annotations

import torch
from torch import nn

from svdq_format.linear import SVDQLinear
from svdq_format.model import model_metadata, set_submodule, svdq_modules

__all__ = ["quantize_all", "tiny_flux", "tiny_sd3", "flux_inputs", "sd3_inputs", "run"]


def quantize_all(model: nn.Module, *, rank: int = 8, precision: str = "int4",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every linear with K % 64 == 0 by an SVDQLinear (random smoothing), attach the quantizer."""
    from svdq_format.diffusers import attach_quantizer

    g = torch.Generator().manual_seed(3)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m.in_features % 64 == 0:
            smooth = torch.rand(m.in_features, generator=g) + 0.5
            set_submodule(model, name,
                           SVDQLinear.from_linear(m, rank=rank, precision=precision, smooth=smooth, dtype=dtype))
    assert svdq_modules(model)
    attach_quantizer(model, model_metadata(model, extra={"base_model": "tiny/base", "quantizer": {"rank": rank}}))
    return model.eval()


def tiny_flux(**kw) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return quantize_all(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]), **kw)


def tiny_sd3(**kw) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return quantize_all(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4), **kw)


def flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def sd3_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([500.0]))


@torch.no_grad()
def run(model: nn.Module) -> torch.Tensor:
    """Forward with the inputs that fit the model's class."""
    inputs = flux_inputs() if type(model).__name__.startswith("Flux") else sd3_inputs()
    return model(**inputs).sample
