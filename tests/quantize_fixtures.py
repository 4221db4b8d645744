"""Shared helpers of the quantizer tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_flux(num_layers: int = 1, num_single_layers: int = 1) -> nn.Module:
    """A FLUX transformer small enough to quantize in a second (seed 0, float32)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=4,
                                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
