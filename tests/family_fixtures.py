"""Tiny random configs of every diffusers denoiser family the quantizer is tested on.

Each is small enough to quantize in about a second on one CPU thread, and wide enough (64) that
its block linears are quantizable (``in_features`` a multiple of 64). Used by
``tests/test_families.py`` and ``benchmarks/families.py`` (the docs table).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CAPTURED", "FAMILIES", "LORA_LOADERS", "NOTES", "NOT_TESTED", "build", "family_samples", "output"]

_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=[4, 4, 8])

#: Family name → (diffusers class name, constructor keyword arguments).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "allegro": ("AllegroTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=64, sample_width=8, sample_height=8, sample_frames=8, caption_channels=32)),
    "auraflow": ("AuraFlowTransformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64, joint_attention_dim=32,
        out_channels=4, pos_embed_max_size=64)),
    "bria": ("BriaTransformer2DModel", dict(_FLUX, pooled_projection_dim=None, axes_dims_rope=[0, 8, 8])),
    "chroma": ("ChromaTransformer2DModel", dict(_FLUX, approximator_num_channels=8, approximator_hidden_dim=64,
                                                 approximator_layers=1)),
    "chronoedit": ("ChronoEditTransformer3DModel", dict(_WAN, rope_temporal_skip_len=8)),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)),
    "cogview3plus": ("CogView3PlusTransformer2DModel", dict(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=64, condition_dim=4, pos_embed_max_size=16, sample_size=8)),
    "cogview4": ("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=64, condition_dim=4)),
    "dit": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10)),
    "easyanimate": ("EasyAnimateTransformer3DModel", dict(
        attention_head_dim=32, num_attention_heads=2, in_channels=4, mmdit_layers=1, num_layers=1, out_channels=4,
        patch_size=2, sample_height=16, sample_width=16, text_embed_dim=32, time_embed_dim=64,
        time_position_encoding_type="3d_rope", timestep_activation_fn="silu")),
    "flux": ("FluxTransformer2DModel", dict(_FLUX, pooled_projection_dim=32)),
    "flux2": ("Flux2Transformer2DModel", dict(_FLUX, timestep_guidance_channels=64, axes_dims_rope=[4, 4, 4, 4])),
    "hidream": ("HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(32, 32), llama_layers=(0, 1))),
    "hunyuandit": ("HunyuanDiT2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=32, num_attention_heads=2,
        cross_attention_dim=64, cross_attention_dim_t5=64, pooled_projection_dim=16, hidden_size=64, text_len=8,
        text_len_t5=8)),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12))),
    "latte": ("LatteTransformer3DModel", dict(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=32, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=64, out_channels=8, num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)),
    "longcat": ("LongCatImageTransformer2DModel", dict(_FLUX, pooled_projection_dim=32)),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=32)),
    "lumina2": ("Lumina2Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=1, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=64, norm_eps=1e-5, axes_dim_rope=(8, 4, 4),
        axes_lens=(64, 64, 64), cap_feat_dim=32)),
    "mochi": ("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=1, pooled_projection_dim=64,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=8, activation_fn="swiglu",
        max_sequence_length=8)),
    "ovis": ("OvisImageTransformer2DModel", dict(_FLUX, out_channels=16)),
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, cross_attention_dim=64, caption_channels=64, norm_type="ada_norm_single",
        use_additional_conditions=False)),
    "qwenimage": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(8, 4, 4))),
    "sana": ("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=64,
        mlp_ratio=2.5, sample_size=8, patch_size=1)),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16)),
    "skyreels-v2": ("SkyReelsV2Transformer3DModel", dict(_WAN)),
    "wan": ("WanTransformer3DModel", dict(_WAN)),
    "z-image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[16, 8, 8], axes_lens=[64, 32, 32])),
    "helios": ("HeliosTransformer3DModel", dict(
        {k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, rope_dim=(8, 12, 12),
        has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
        is_amplify_history=False)),
    "joyimage": ("JoyImageEditTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=64, num_attention_heads=2, text_dim=32, num_layers=1,
        rope_dim_list=[8, 12, 12], theta=256)),
    "motif-video": ("MotifVideoTransformer3DModel", dict(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
        norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(8, 12, 12),
        enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False)),
    "nucleus-moe": ("NucleusMoEImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(8, 4, 4), moe_enabled=False)),
    "prx": ("PRXTransformer2DModel", dict(
        in_channels=16, patch_size=2, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
        axes_dim=[16, 16], theta=10000)),
    "ernie-image": ("ErnieImageTransformer2DModel", dict(
        hidden_size=64, num_attention_heads=2, num_layers=1, ffn_hidden_size=128, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=32, rope_theta=256, rope_axes_dim=(16, 8, 8), eps=1e-6, qk_layernorm=True)),
    "sana-video": ("SanaVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32,
        mlp_ratio=2.0, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)),
    "wan-vace": ("WanVACETransformer3DModel", dict(_WAN, num_layers=2, vace_layers=[0], vace_in_channels=8)),
    "ltx2": ("LTX2VideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=32, audio_cross_attention_dim=64, num_layers=1, qk_norm="rms_norm_across_heads",
        caption_channels=32, rope_double_precision=False)),
    "hunyuanvideo15": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
        image_embed_dim=16, rope_axes_dim=(8, 12, 12), target_size=16, task_type="t2v")),
    "longcat-audio": ("LongCatAudioDiTTransformer", dict(
        dit_dim=64, dit_depth=1, dit_heads=2, dit_text_dim=32, latent_dim=8, text_conv=False)),
    "stable-audio3": ("StableAudio3DiTModel", dict(
        io_channels=8, patch_size=1, embed_dim=64, depth=1, num_heads=2, cond_token_dim=32, global_cond_dim=16,
        local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
        use_differential_attention=False)),
    "sdxl-unet": ("UNet2DConditionModel", dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32,
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 1))),
    "anyflow": ("AnyFlowTransformer3DModel", dict({k: v for k, v in _WAN.items() if k != "qk_norm"})),
    "bria-fibo": ("BriaFiboTransformer2DModel", dict(_FLUX, text_encoder_dim=32, axes_dims_rope=[0, 8, 8])),
    "consisid": ("ConsisIDTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, cross_attn_dim_head=32,
        cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=1, LFE_dim_head=16, LFE_num_heads=2,
        LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=1)),
    # concat_padding_mask=False: the padding-mask concatenation resizes with torchvision, which this
    # environment's torch cannot have beside it (the rest of the model is the same)
    "cosmos": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=16, max_size=(4, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=False)),
    "dreamlite": ("DreamLiteTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=32, num_layers=1, norm_num_groups=32,
        cross_attention_dim=32)),
    "flux3": ("Flux3Transformer2DModel", dict(
        in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, timestep_channels=64, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4))),
    "glm-image": ("GlmImageTransformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        text_embed_dim=32, time_embed_dim=64, condition_dim=4, prior_vq_quantizer_codebook_size=32)),
    "hunyuanimage": ("HunyuanImageTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=32, rope_axes_dim=(16, 16))),
    "joyimage-edit-plus": ("JoyImageEditPlusTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=64, num_attention_heads=2, text_dim=32, num_layers=1,
        rope_dim_list=[8, 12, 12], theta=256)),
    "kandinsky5": ("Kandinsky5Transformer3DModel", dict(
        in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12))),
    "kandinsky6": ("Kandinsky6Transformer3DModel", dict(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32, patch_size=(1, 2, 2),
        model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12), visual_cond=False)),
    "minimax-music3": ("MiniMaxMusic3Transformer1DModel", dict(
        in_channels=8, condition_dim=32, num_layers=1, num_attention_heads=2, attention_head_dim=32, ff_inner_dim=128,
        rotary_dim=16, fourier_embedding_dim=16)),
    "stable-audio": ("StableAudioDiTModel", dict(
        sample_size=16, in_channels=8, num_layers=1, attention_head_dim=32, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=8, cross_attention_dim=64, time_proj_dim=16,
        global_states_input_dim=32, cross_attention_input_dim=32)),
    # the continuous-input spatial transformer of SD UNets (a patched one loads back as PixArt / DiT:
    # diffusers remaps it)
    "transformer2d": ("Transformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=32, num_layers=1, norm_num_groups=32,
        cross_attention_dim=32, use_linear_projection=True)),
    "krea2": ("Krea2Transformer2DModel", dict(
        in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, timestep_embed_dim=32, text_hidden_dim=32, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=64, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6))),
    # the frame-autoregressive AnyFlow: its training-rollout forward (no KV cache) over two one-frame chunks
    "anyflow-far": ("AnyFlowFARTransformer3DModel", dict(
        {k: v for k, v in _WAN.items() if k not in ("qk_norm", "cross_attn_norm")}, compressed_patch_size=(1, 4, 4),
        full_chunk_limit=1, chunk_partition=(1, 1))),
    # the temporal transformer of AnimateDiff's motion modules (frames of one position attend to each other)
    "transformer-temporal": ("TransformerTemporalModel", dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=64, num_layers=1, norm_num_groups=32,
        double_self_attention=True, positional_embeddings="sinusoidal", num_positional_embeddings=32)),
    # no synthetic inputs (each says why in one line): quantized from a calibration file of CAPTURED inputs
    "ace-step": ("AceStepTransformer1DModel", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=8)),
    "bria-fibo2": ("BriaFibo2Transformer2DModel", dict(
        in_channels=16, patch_size=2, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(8, 12, 12), axes_lens=(64, 32, 32))),
    "prior": ("PriorTransformer", dict(
        num_attention_heads=2, attention_head_dim=32, num_layers=1, embedding_dim=32, num_embeddings=8,
        additional_embeddings=4)),
    "qwenimage21": ("QwenImage21Transformer2DModel", dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=4,
        context_in_dim=32, mlp_ratio=2, axes_dims_rope=(8, 4, 4))),
    "sana-wm": ("SanaWMTransformer3DModel", dict(
        in_channels=8, num_layers=2, hidden_size=64, num_attention_heads=2, linear_head_dim=32, softmax_every_n=2,
        chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2, image_size=64, caption_channels=32,
        mlp_ratio=2.0)),
    "wan-animate": ("WanAnimateTransformer3DModel", dict(
        {k: v for k, v in _WAN.items() if k != "in_channels"}, in_channels=12, latent_channels=4, image_dim=16,
        motion_encoder_size=16, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=32,
        face_encoder_num_heads=2, inject_face_latents_blocks=1)),
    "hunyuanvideo-framepack": ("HunyuanVideoFramepackTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(8, 12, 12), has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)),
    "ideogram4": ("Ideogram4Transformer2DModel", dict(
        in_channels=16, num_layers=1, attention_head_dim=32, num_attention_heads=2, intermediate_size=128, adaln_dim=32,
        llm_features_dim=32, rope_theta=10000, mrope_section=(8, 4, 4))),
    "kandinsky6-sr": ("Kandinsky6SRTransformer3DModel", dict(
        in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 2, 2), model_dim=64, ff_dim=128,
        num_visual_blocks=1, axes_dims=(8, 12, 12))),
    "lumina-next": ("LuminaNextDiT2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=1, num_attention_heads=4, num_kv_heads=2,
        multiple_of=64, cross_attention_dim=32)),
    "omnigen": ("OmniGenTransformer2DModel", dict(
        in_channels=4, patch_size=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, num_layers=1, pad_token_id=0, vocab_size=64, max_position_embeddings=256,
        original_max_position_embeddings=64, pos_embed_max_size=16, time_step_dim=32,
        rope_scaling={"short_factor": [1.0] * 16, "long_factor": [1.0] * 16})),
    "sana-wm-refiner": ("SanaWMLTX2RefinerTransformer3DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=32,
        audio_cross_attention_dim=64, num_layers=1, caption_channels=32, rope_double_precision=False)),
    "minimax-h3": ("MiniMaxH3Transformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=32, hidden_size=64, num_layers=1, num_refiner_layers=1, ffn_dim=128,
        in_channels=4, audio_in_channels=8, text_dim=32, freq_dim=32, time_embed_hidden_dim=64, time_embed_dim=32,
        rope_freq_dim=4)),
    # not a denoiser: the autoregressive RVQ depth decoder whose hidden states condition MiniMax-Music3's
    # flow-matching transformer (quantized the same way)
    "minimax-music3-depth": ("MiniMaxMusic3RVQDepthDecoder", dict(
        hidden_size=64, num_layers=1, num_attention_heads=2, intermediate_size=128, audio_vocab_size=32,
        num_codebooks=4, max_position_embeddings=8)),
    # the features reduced to the noisy state and its times (the released checkpoint also reads molecular
    # topology features its preprocessor computes); the trunk's linears are the same
    "rfd4-proteina": ("RFD4ProteinaTransformer", dict(
        nlayers=1, token_dim=64, nheads=2, dim_cond=64, pair_repr_dim=32, latent_dim=8, token_type_emb_dim=8,
        cath_emb_dim=8, t_emb_dim=32, seq_sep_dim=16, xt_pair_dist_dim=8, feats_seq=("xt_bb_ca", "xt_local_latents"),
        feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"), feats_pair_repr=("xt_bb_ca_pair_dists",),
        feats_pair_cond=("time_emb_bb_ca", "time_emb_local_latents"), tri_mult_c=16)),
    "cosmos3-omni": ("Cosmos3OmniTransformer", dict(
        head_dim=32, hidden_size=64, intermediate_size=128, latent_channel=4, latent_patch_size=2,
        num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=1, patch_latent_dim=16, vocab_size=64,
        rope_axes_dim=[8, 4, 4], dtype="float32")),
    "t5-film": ("T5FilmDecoder", dict(
        input_dims=8, targets_length=16, d_model=64, num_layers=1, num_heads=2, d_kv=32, d_ff=128, dropout_rate=0.0)),
}


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _t(gen: torch.Generator, scale: float = 1000.0) -> torch.Tensor:
    return scale * torch.rand(1, generator=gen)


#: Family → its forward inputs built as its pipeline builds them, for the families whose inputs no
#: generic rule derives (the one-line reason is asserted by the tests): they are quantized from a
#: calibration file of these (``svdq quantize --calibration FILE``), the path a user of such a
#: model takes. Each is called with a seeded generator and the tiny model (whose helpers some
#: pipelines call: SANA-WM's rotary tables, Cosmos3-Omni's config); where diffusers has a
#: pipeline helper that lays the inputs out, it is called rather than copied.
CAPTURED: dict[str, Callable[[torch.Generator, nn.Module], dict[str, Any]]] = {
    # the context latents ride along the audio latent's channels: [B, N, in_channels - acoustic]
    "ace-step": lambda g, m: dict(hidden_states=_randn(g, 1, 16, 8), timestep=_t(g, 1.0), timestep_r=_t(g, 0.5),
                               encoder_hidden_states=_randn(g, 1, 8, 64), context_latents=_randn(g, 1, 16, 16)),
    # text states in bundles: [B, 1 + len(injection_layer_ids), T, D]
    "bria-fibo2": lambda g, m: dict(hidden_states=_randn(g, 1, 16, 8, 8), timestep=_t(g, 1.0),
                                 encoder_hidden_states=_randn(g, 1, 2, 8, 32)),
    # an image embedding, not a latent: [B, embedding_dim]
    "prior": lambda g, m: dict(hidden_states=_randn(g, 1, 32), timestep=_t(g), proj_embedding=_randn(g, 1, 32),
                            encoder_hidden_states=_randn(g, 1, 8, 32),
                            attention_mask=torch.ones(1, 8, dtype=torch.bool)),
    # img_mask: the vision-language sequence, text positions then one slot per 2x2 latent tokens
    "qwenimage21": lambda g, m: dict(
        hidden_states=_randn(g, 1, 16, 16), encoder_hidden_states=_randn(g, 1, 8, 32), timestep=_t(g, 1.0),
        img_shapes=[[(1, 4, 4)]], img_mask=torch.cat([torch.zeros(1, 8, dtype=torch.bool),
                                                      torch.ones(1, 4, dtype=torch.bool)], 1)),
    # a timestep per frame as [B, 1, F]; text states as [B, 1, T, D]
    "sana-wm": lambda g, m: dict(hidden_states=_randn(g, 1, 8, 2, 8, 8), timestep=_t(g).expand(1, 1, 2).clone(),
                              encoder_hidden_states=_randn(g, 1, 1, 8, 32), mask=torch.ones(1, 8)),
    # pose latents one frame shorter than the latent; face crops in pixels at motion_encoder_size
    "wan-animate": lambda g, m: dict(
        hidden_states=_randn(g, 1, 12, 3, 8, 8), timestep=_t(g), encoder_hidden_states=_randn(g, 1, 8, 32),
        encoder_hidden_states_image=_randn(g, 1, 4, 16), pose_hidden_states=_randn(g, 1, 4, 2, 8, 8),
        face_pixel_values=_randn(g, 1, 3, 5, 16, 16)),
    # the pipeline always passes the clean and 2x / 4x history latents with their frame indices (the
    # forward reads their rotary tables unconditionally)
    "hunyuanvideo-framepack": lambda g, m: dict(
        hidden_states=_randn(g, 1, 4, 2, 8, 8), timestep=_t(g), encoder_hidden_states=_randn(g, 1, 8, 32),
        encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool), pooled_projections=_randn(g, 1, 16),
        image_embeds=_randn(g, 1, 4, 16), guidance=_t(g, 10_000.0), indices_latents=torch.arange(8, 10),
        latents_clean=_randn(g, 1, 4, 2, 8, 8), indices_latents_clean=torch.tensor([0, 7]),
        latents_history_2x=_randn(g, 1, 4, 2, 8, 8), indices_latents_history_2x=torch.arange(5, 7),
        latents_history_4x=_randn(g, 1, 4, 4, 8, 8), indices_latents_history_4x=torch.arange(1, 5)),
    # the packed [left-pad][text][image] sequence, ids from the pipeline's own helper
    "ideogram4": lambda g, m: _ideogram4(g),
    # channels last: the noisy latent, the anchor latent and its mask ([B, F, H, W, 2C + 1]); the token
    # grid a multiple of 8 (NABLA blocks)
    "kandinsky6-sr": lambda g, m: dict(hidden_states=_randn(g, 1, 1, 16, 16, 9), timestep=_t(g)),
    # 2-D rotary table from the pipeline's helper; timestep in [0, 1]
    "lumina-next": lambda g, m: dict(
        hidden_states=_randn(g, 1, 4, 8, 8), timestep=_t(g, 1.0), encoder_hidden_states=_randn(g, 1, 8, 32),
        encoder_mask=torch.ones(1, 8, dtype=torch.bool), image_rotary_emb=_lumina_rope(), cross_attention_kwargs={}),
    # text-to-image: token ids, no input images; causal text / bidirectional image mask from the pipeline's collator
    "omnigen": lambda g, m: _omnigen(g),
    # token latents with a timestep per token; the RoPE of the window's absolute frames from the model's helper
    "sana-wm-refiner": lambda g, m: dict(
        hidden_states=_randn(g, 1, 32, 8), encoder_hidden_states=_randn(g, 1, 8, 32),
        timestep=_t(g, 1.0).expand(1, 32).clone(), encoder_attention_mask=torch.ones(1, 8),
        video_rotary_emb=m.build_rotary_emb_for_absolute_positions(
            batch_size=1, frame_positions=[0, 1], height=4, width=4, device=torch.device("cpu"), fps=24.0)),
    # one packed sequence of text, video and audio rows; per row its modality, timestep index and (t, h, w)
    "minimax-h3": lambda g, m: _minimax_h3(g),
    # the global language model's hidden state then the frame's code embeddings: [B, steps, hidden]
    "minimax-music3-depth": lambda g, m: dict(inputs_embeds=_randn(g, 1, 4, 64)),
    # a protein: noisy backbone coordinates [B, N, 3] and local latents, a time for each
    "rfd4-proteina": lambda g, m: dict(
        bb_ca=_randn(g, 1, 16, 3), local_latents=_randn(g, 1, 16, 8), bb_ca_time=_t(g, 1.0),
        local_latents_time=_t(g, 1.0), padding_mask=torch.ones(1, 16, dtype=torch.bool),
        token_type=torch.zeros(1, 16, dtype=torch.long),
        conditioning=dict(is_in_context_conditioning=torch.zeros(1, 16, dtype=torch.bool),
                          supports_local_latent=torch.ones(1, 16, dtype=torch.bool))),
    # one packed sequence of text tokens then vision latent tokens, laid out by the pipeline's own segment builders
    "cosmos3-omni": lambda g, m: _cosmos3_omni(g, m),
    # a spectrogram decoder: no latent argument (decoder_input_tokens), the encoders' outputs as (states, mask)
    "t5-film": lambda g, m: dict(
        encodings_and_masks=[(_randn(g, 1, 8, 64), torch.ones(1, 8, dtype=torch.bool))],
        decoder_input_tokens=_randn(g, 1, 16, 8), decoder_noise_time=_t(g, 1.0)),
}


def _ideogram4(g: torch.Generator) -> dict[str, Any]:
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids([6], 4, 4, 8, torch.device("cpu"))
    latent = torch.cat([torch.zeros(1, 8, 16), _randn(g, 1, 16, 16)], 1)  # text slots zero, then the image
    return dict(hidden_states=latent, timestep=_t(g, 1.0), encoder_hidden_states=_randn(g, 1, 24, 32),
                position_ids=position_ids, segment_ids=segment_ids, indicator=indicator)


def _minimax_h3(g: torch.Generator) -> dict[str, Any]:
    txt, vid, aud = 8, 16, 8  # text rows, then a 4 x 4 video latent (patched), then audio rows
    tags = torch.cat([torch.ones(txt), torch.zeros(vid), torch.full((aud,), 2)]).long()  # 0 video, 1 text, 2 audio
    pos = torch.zeros(txt + vid + aud, 3, dtype=torch.long)
    grid = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    pos[txt:txt + vid, 1:] = torch.stack(grid, -1).reshape(-1, 2)
    pos[txt + vid:, 0] = torch.arange(aud)
    return dict(hidden_states=_randn(g, 1, vid, 16), audio_hidden_states=_randn(g, 1, aud, 8),
                encoder_hidden_states=_randn(g, 1, txt, 32), timestep=torch.rand(2, generator=g),
                timestep_indices=(tags == 2).long(), token_tags=tags, position_ids=pos,
                video_indices=torch.arange(txt, txt + vid), audio_indices=torch.arange(txt + vid, txt + vid + aud),
                text_indices=torch.arange(txt))


def _cosmos3_omni(g: torch.Generator, model: nn.Module) -> dict[str, Any]:
    import types

    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline as Pipe

    pipe = types.SimpleNamespace(transformer=model, vae_scale_factor_temporal=4)  # what the builders read
    text = Pipe._prepare_text_segment(pipe, torch.randint(0, 64, (6,), generator=g).tolist(), device="cpu")
    latents = _randn(g, 1, 4, 2, 8, 8)
    vision = Pipe._prepare_vision_segment(
        pipe, input_vision_tokens=latents, has_image_condition=False, mrope_offset=text["vision_start_temporal_offset"],
        vision_fps=24.0, curr=text["und_len"], device="cpu", condition_frame_indexes=[])
    return dict(input_ids=text["input_ids"], text_indexes=text["text_indexes"],
                position_ids=torch.cat([text["text_mrope_ids"], vision["vision_mrope_ids"]], 1),
                und_len=text["und_len"], sequence_length=text["und_len"] + vision["num_vision_tokens"],
                vision_tokens=[latents], vision_token_shapes=vision["vision_token_shapes"],
                vision_sequence_indexes=vision["vision_sequence_indexes"],
                vision_mse_loss_indexes=vision["vision_mse_loss_indexes"],
                vision_timesteps=_t(g).expand(vision["num_noisy_vision_tokens"]).clone(),
                vision_noisy_frame_indexes=vision["vision_noisy_frame_indexes"])


def _lumina_rope() -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return get_2d_rotary_pos_embed_lumina(16, 32, 32)  # head_dim 16


def _omnigen(g: torch.Generator) -> dict[str, Any]:
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    text_mask = torch.ones(1, 6, dtype=torch.long)
    collator = OmniGenCollator(pad_token_id=0, hidden_size=64)
    mask, _ = collator.create_mask(text_mask, [16])
    return dict(hidden_states=_randn(g, 1, 4, 8, 8), timestep=_t(g, 1.0),
                input_ids=torch.randint(0, 64, (1, 6), generator=g), input_img_latents=[], input_image_sizes={},
                attention_mask=mask, position_ids=collator.create_position(text_mask, [16]))


#: Family → what its tiny config leaves out and why (the docs table shows it).
NOTES: dict[str, str] = {
    "cosmos": "concat_padding_mask off: it resizes with torchvision, not installable beside this torch; "
              "without torchvision, quantizing says so in one line",
    "transformer2d": "continuous input as inside SD UNets; a patched config loads back as PixArt / DiT",
    "rfd4-proteina": "features reduced to the noisy state and its times; the checkpoint's molecular topology "
                     "features come from its preprocessor",
    "minimax-music3-depth": "not a denoiser: the autoregressive RVQ depth decoder conditioning MiniMax-Music3",
    "anyflow-far": "its training-rollout forward (no KV cache)",
}

#: Class → why the diffusers classes without a tiny test have none (the docs table shows it).
NOT_TESTED: dict[str, str] = {
    "WanAnimate2Transformer3DModel": "its forward takes a stateful KV cache (a reference pass fills it, each "
                                     "denoising pass reads it): no calibration file holds one, and diffusers has no "
                                     "pipeline to capture from",
}

#: Family → the diffusers LoRA loader its pipelines use (``diffusers.loaders.lora_pipeline``), for
#: the families that have one. Filled from diffusers itself by ``lora_loader()``.
LORA_LOADERS: dict[str, str] = {}


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny random model of ``family`` (seeded, eval mode)."""
    import diffusers

    cls_name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**kwargs)
    with torch.no_grad():  # zero-initialised projections / gates: a random model whose output is 0 tests nothing
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def lora_loader(cls_name: str) -> str | None:
    """The diffusers LoRA loader mixin of the pipelines built around ``cls_name`` (None: no loader).

    Read from diffusers: a pipeline class that inherits a ``*LoraLoaderMixin`` which loads into its
    ``transformer`` (or ``unet``), and takes a denoiser of this class.
    """
    return _lora_loaders().get(cls_name)


@functools.lru_cache(maxsize=1)
def _lora_loaders() -> dict[str, str]:
    """Denoiser class name → LoRA loader mixin name, over every diffusers pipeline (imports them once)."""
    import inspect

    import diffusers

    found: dict[str, str] = {}
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            pipe = getattr(diffusers, name)
        except Exception:  # optional backends
            continue
        if not inspect.isclass(pipe):
            continue
        mixins = [b for b in pipe.__mro__ if b.__name__.endswith("LoraLoaderMixin")]
        if not mixins:
            continue
        try:
            params = inspect.signature(pipe.__init__).parameters
        except (TypeError, ValueError):
            continue
        loadable = getattr(mixins[0], "_lora_loadable_modules", ())
        for comp in ("transformer", "unet"):
            ann = params.get(comp)
            if ann is None or comp not in loadable:
                continue
            for cls_name in re.findall(r"\b(\w+Model\w*|\w+Transformer\w*)\b", str(ann.annotation)):
                found.setdefault(cls_name, mixins[0].__name__)
    return found


def family_samples(family: str, model: nn.Module, n: int, *, seed: int, **synthetic: Any) -> list[dict[str, Any]]:
    """``n`` forward inputs of ``family``'s tiny ``model``: :data:`CAPTURED`'s where the family has them,
    else the quantizer's synthetic ones (``synthetic`` goes to ``synthetic_samples``)."""
    if family in CAPTURED:
        gen = torch.Generator().manual_seed(seed)
        return [CAPTURED[family](gen, model) for _ in range(n)]
    from converters.quantize.synthetic import synthetic_samples

    return synthetic_samples(model, n, seed=seed, **synthetic)[1]


def output(out: Any) -> torch.Tensor:
    """The denoiser's prediction in a forward's return value (tuple, ``BaseOutput`` or a tensor; a
    list of per-sample latents gives the first)."""
    o = out if isinstance(out, torch.Tensor) else out[0]
    return o[0] if isinstance(o, list) else o
