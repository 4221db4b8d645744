"""Shared helpers of the quantizer tests."""

from __future__ import annotations

import json

import torch
from torch import nn


def tiny_flux(num_layers: int = 1, num_single_layers: int = 1) -> nn.Module:
    """A FLUX transformer small enough to quantize in a second (seed 0, float32)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=16, num_attention_heads=4,
                                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def tiny_flux_inputs(seed: int) -> dict[str, torch.Tensor]:
    """bfloat16 inputs of :func:`tiny_flux` (16 image and 8 text tokens), drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 8, 64, dtype=torch.bfloat16),
                pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def tiny_sd3_pipeline(*, wide_text_encoders: bool = False):
    """A whole text-to-image pipeline (SD3: two CLIP encoders, T5, transformer, VAE), random and tiny,
    built offline: its tokenizers come from a hand-written vocabulary (seed 0, float32).

    ``wide_text_encoders``: CLIP and T5 64 / 128 wide (their linears quantizable), the transformer's
    text width to match."""
    import tempfile
    from pathlib import Path

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:  # character-level BPE with no merges
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        clip_tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    width = 64 if wide_text_encoders else 32  # SD3 concatenates the two CLIP widths, padded to T5's
    clip = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width if wide_text_encoders
                          else 37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -5.0) for c in letters]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=2 * width, d_kv=16, d_ff=2 * width, num_layers=1,
                                 num_heads=4))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=2 * width,
                                        caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=16)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
                        shift_factor=0.0, scaling_factor=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok,
    )
