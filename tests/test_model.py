"""Whole-model checkpoints: tiny diffusers Flux → SVDQ layers → directory → reload, bit-identical."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from svdq_format import SVDQLinear
from svdq_format.errors import ManifestError, TensorError
from svdq_format.model import save_model_dir, svdq_modules
from svdq_format.pretrained import load_model_dir


def tiny_flux():
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()


def flux_inputs():
    return dict(
        hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 64),
        pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )


def quantize_blocks(model):
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and "transformer_blocks" in name and mod.in_features % 64 == 0:
            parent, _, child = name.rpartition(".")
            kind = "w4a16" if name.endswith("norm1.linear") or name.endswith("norm.linear") else "w4a4"
            setattr(model.get_submodule(parent), child, SVDQLinear.from_linear(mod, rank=8, kind=kind))
    return model


def test_model_directory_round_trip_is_bit_identical(tmp_path):
    model = quantize_blocks(tiny_flux())
    assert len(svdq_modules(model)) > 10
    save_model_dir(model, tmp_path / "q")
    loaded = load_model_dir(tmp_path / "q").eval()
    assert type(loaded) is FluxTransformer2DModel
    assert {k: v.spec for k, v in svdq_modules(loaded).items()} == {k: v.spec for k, v in svdq_modules(model).items()}
    inputs = flux_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, loaded(**inputs).sample)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    model = quantize_blocks(tiny_flux())
    save_model_dir(model, tmp_path / "q")
    from svdq_format.pretrained import load_model_file

    other = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[8, 8, 16],
    )
    with pytest.raises(ManifestError, match="linear, checkpoint a"):
        load_model_file(other, tmp_path / "q" / "diffusion_pytorch_model.safetensors")
    smaller = tiny_flux()
    del smaller.single_transformer_blocks[0]
    with pytest.raises((ManifestError, TensorError)):
        load_model_file(smaller, tmp_path / "q" / "diffusion_pytorch_model.safetensors")
