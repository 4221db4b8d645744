"""Tiny random configs of every diffusers denoiser family the quantizer is tested on.

Each is small enough to quantize in about a second on one CPU thread, and wide enough (64) that
its block linears are quantizable (``in_features`` a multiple of 64). Used by
``tests/test_families.py`` and ``benchmarks/families.py`` (the docs table).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "build", "LORA_LOADERS"]

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
