"""Tiny Flux transformers (dense and SVDQuant) and LoRA state dicts in every key format.

Used by tests/test_lora*.py. Everything is random and built in memory; nothing downloads. The
pytest fixtures here (:func:`isolated_cache`, :func:`models`) work in a test module that imports them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdq_format.linear import SVDQLinear

INNER = 64  # inner dim of the tiny model
FF = 4 * INNER
CTX = 64
HEADS = 4
HEAD_DIM = 16


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """The converted-LoRA cache of each test in its own temporary folder (``SVDQ_CACHE``)."""
    monkeypatch.setenv("SVDQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models():
    """``(dense, quantized)``: the tiny Flux transformer and its SVDQuant version (shared by a module)."""
    dense = tiny_flux()
    return dense, quantize(dense)


def tiny_flux(seed: int = 0) -> nn.Module:
    """A float32 FluxTransformer2DModel with 1 double and 1 single block, inner dim 64."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=CTX, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    # diffusers zero-inits nothing here, but make every weight clearly non-trivial
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def flux_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 8, CTX, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    )


def quantizable(model: nn.Module) -> list[str]:
    """Linears inside the blocks (what SVDQuant quantizes); embedders etc. stay 16-bit."""
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and "_blocks." in n and m.in_features % 64 == 0
    ]


def quantize(model: nn.Module, *, rank: int = 16, fuse_qkv: bool = False) -> nn.Module:
    """A deep copy with the block linears replaced by SVDQLinear.from_linear (int4 W4A4;
    the AdaLN modulation linears as W4A16). With ``fuse_qkv``, the double block's image
    attention q|k|v becomes one fused layer ``attn.to_qkv`` with ``fused_from``."""
    q = copy.deepcopy(model)
    if fuse_qkv:
        attn = q.transformer_blocks[0].attn
        lin = nn.Linear(INNER, 3 * INNER)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
            lin.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
        fused = SVDQLinear.from_linear(lin, rank=rank)
        fused.fused_from = ("to_q", "to_k", "to_v")
        fused.split_sizes = (INNER, INNER, INNER)
        attn.to_qkv = fused
        attn.fused_projections = True
    for name in quantizable(model):
        if fuse_qkv and name.startswith("transformer_blocks.0.attn.to_") and name[-1] in "qkv":
            continue
        lin = q.get_submodule(name)
        kind = "w4a16" if name.endswith("norm1.linear") or name.endswith("norm.linear") else "w4a4"
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent), child, SVDQLinear.from_linear(lin, rank=rank, kind=kind))
    return q


def lora_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the dense model (diffusers name → (out, in))."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_factors(targets: dict[str, tuple[int, int]], *, rank: int = 4, seed: int = 2,
                   scale: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(rank, k, generator=g) * scale, torch.randn(o, rank, generator=g) * scale)
        for n, (o, k) in sorted(targets.items())
    }


def apply_dense(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                scale: float | dict[str, float] = 1.0) -> nn.Module:
    """A deep copy of a dense model with ``W += scale · B @ A`` merged (float64 math)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, (a, b) in factors.items():
            s = scale[n] if isinstance(scale, dict) else scale
            lin = m.get_submodule(n)
            lin.weight.copy_((lin.weight.double() + s * b.double() @ a.double()).to(lin.weight.dtype))
    return m


def peft_state_dict(factors, *, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    sd = {}
    for n, (a, b) in factors.items():
        sd[f"{prefix}{n}.lora_A.weight"] = a.clone()
        sd[f"{prefix}{n}.lora_B.weight"] = b.clone()
    return sd


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model (incl. non-persistent buffers), cloned, by name."""
    out = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for n, m in model.named_modules():
        if isinstance(m, SVDQLinear):
            out[f"{n}.lora_scales"] = None if m.lora_scales is None else m.lora_scales.clone()
    return out


def same_tensors(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if (x is None) != (y is None):
            return False
        if x is not None and (x.dtype != y.dtype or x.shape != y.shape
                               or not torch.equal(x.view(torch.uint8) if x.numel() else x,
                                                  y.view(torch.uint8) if y.numel() else y)):
            return False
    return True


# --------------------------------------------------------------------------- key formats

def _r(g, *shape, scale=0.05):
    return torch.randn(*shape, generator=g) * scale


# BFL/kohya name -> (diffusers targets, row splits) for the tiny model (block 0 only)
KOHYA_MAP = {
    "double_blocks_0_img_attn_qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                      "transformer_blocks.0.attn.to_v"], [INNER] * 3),
    "double_blocks_0_img_attn_proj": (["transformer_blocks.0.attn.to_out.0"], [INNER]),
    "double_blocks_0_img_mlp_0": (["transformer_blocks.0.ff.net.0.proj"], [FF]),
    "double_blocks_0_img_mlp_2": (["transformer_blocks.0.ff.net.2"], [INNER]),
    "double_blocks_0_img_mod_lin": (["transformer_blocks.0.norm1.linear"], [6 * INNER]),
    "double_blocks_0_txt_attn_qkv": (["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                      "transformer_blocks.0.attn.add_v_proj"], [INNER] * 3),
    "double_blocks_0_txt_attn_proj": (["transformer_blocks.0.attn.to_add_out"], [INNER]),
    "double_blocks_0_txt_mlp_0": (["transformer_blocks.0.ff_context.net.0.proj"], [FF]),
    "double_blocks_0_txt_mlp_2": (["transformer_blocks.0.ff_context.net.2"], [INNER]),
    "double_blocks_0_txt_mod_lin": (["transformer_blocks.0.norm1_context.linear"], [6 * INNER]),
    "single_blocks_0_linear2": (["single_transformer_blocks.0.proj_out"], [INNER]),
    "single_blocks_0_modulation_lin": (["single_transformer_blocks.0.norm.linear"], [3 * INNER]),
    "img_in": (["x_embedder"], [INNER]),
    "txt_in": (["context_embedder"], [INNER]),
    "final_layer_linear": (["proj_out"], [16]),
    "final_layer_adaLN_modulation_1": (["norm_out.linear"], [2 * INNER]),  # BFL [shift, scale]
}


def kohya_lora(model: nn.Module, *, rank: int = 4, alpha: float = 2.0, seed: int = 3, prefix: str = "lora_unet_",
               sep: str = "_"):
    """A kohya (``prefix='lora_unet_'``) or ComfyUI (``prefix='diffusion_model.'``, ``sep='.'``)
    LoRA for the tiny model, and the dense ΔW each diffusers target must receive."""
    g = torch.Generator().manual_seed(seed)
    shapes = lora_targets(model)
    sd, expected = {}, {}
    for kname, (targets, splits) in KOHYA_MAP.items():
        k_in = shapes[targets[0]][1]
        a, b = _r(g, rank, k_in), _r(g, sum(splits), rank)
        key = prefix + (kname if sep == "_" else _comfy_name(kname))
        sd[f"{key}.lora_down.weight"] = a
        sd[f"{key}.lora_up.weight"] = b
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        off = 0
        for t, n in zip(targets, splits):
            bb = b[off:off + n]
            if t == "norm_out.linear":  # diffusers' AdaLayerNormContinuous is [scale, shift]
                bb = torch.cat([bb[INNER:], bb[:INNER]])
            expected[t] = (alpha / rank) * bb.double() @ a.double()
            off += n
    return sd, expected


def _comfy_name(kname: str) -> str:
    # double_blocks_0_img_attn_qkv -> double_blocks.0.img_attn.qkv
    import re

    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", kname)
    if not m:
        return {"img_in": "img_in", "txt_in": "txt_in", "final_layer_linear": "final_layer.linear",
                "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}[kname]
    rest = m.group(3)
    rest = {"img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
            "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin", "txt_attn_qkv": "txt_attn.qkv",
            "txt_attn_proj": "txt_attn.proj", "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2",
            "txt_mod_lin": "txt_mod.lin", "linear2": "linear2", "modulation_lin": "modulation.lin"}[rest]
    return f"{m.group(1)}.{m.group(2)}.{rest}"


def xlabs_lora(*, rank: int = 4, seed: int = 4):
    """An XLabs LoRA (``double_blocks.0.processor.qkv_lora1.down.weight`` ...) and expected ΔW."""
    g = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    blocks = {
        "double_blocks.0.processor.qkv_lora1": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                 "transformer_blocks.0.attn.to_v"], INNER, [INNER] * 3),
        "double_blocks.0.processor.proj_lora1": (["transformer_blocks.0.attn.to_out.0"], INNER, [INNER]),
        "double_blocks.0.processor.qkv_lora2": (["transformer_blocks.0.attn.add_q_proj",
                                                 "transformer_blocks.0.attn.add_k_proj",
                                                 "transformer_blocks.0.attn.add_v_proj"], INNER, [INNER] * 3),
        "double_blocks.0.processor.proj_lora2": (["transformer_blocks.0.attn.to_add_out"], INNER, [INNER]),
    }
    for key, (targets, k_in, splits) in blocks.items():
        a, b = _r(g, rank, k_in), _r(g, sum(splits), rank)
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = a, b
        off = 0
        for t, n in zip(targets, splits):
            expected[t] = b[off:off + n].double() @ a.double()
            off += n
    return sd, expected


def factors_expected(factors, scale: float = 1.0):
    return {n: scale * b.double() @ a.double() for n, (a, b) in factors.items()}


def effective_deltas(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name → the dense ΔW (float64) the LoRA state adds, for every layer that changed."""
    out = {}
    base_mods = dict(base.named_modules())
    for n, m in model.named_modules():
        b = base_mods.get(n)
        if isinstance(m, SVDQLinear):
            d = m.dequantize().double() - b.dequantize().double()
            if m.bias is not None:
                d = torch.cat([d, (m.bias.double() - b.bias.double())[:, None]], dim=1)
        elif isinstance(m, nn.Linear):
            eye = torch.eye(m.in_features, dtype=m.weight.dtype)
            with torch.no_grad():
                d = (m(eye) - b(eye)).double().T
            d = torch.cat([d, torch.zeros(m.out_features, 1, dtype=d.dtype)], dim=1)
        else:
            continue
        if d.abs().max() > 0:
            out[n] = d[:, :-1]
    return out


# --------------------------------------------------------------------------- FLUX.1-dev shapes

FLUX_BFL_LINEARS = {  # BFL name -> (in, out) for FLUX.1-dev
    "img_mod.lin": (3072, 18432), "txt_mod.lin": (3072, 18432), "img_attn.qkv": (3072, 9216),
    "txt_attn.qkv": (3072, 9216), "img_attn.proj": (3072, 3072), "txt_attn.proj": (3072, 3072),
    "img_mlp.0": (3072, 12288), "img_mlp.2": (12288, 3072), "txt_mlp.0": (3072, 12288), "txt_mlp.2": (12288, 3072),
}
FLUX_BFL_SINGLE = {"linear1": (3072, 21504), "linear2": (15360, 3072), "modulation.lin": (3072, 9216)}
FLUX_BFL_GLOBAL = {
    "time_in.in_layer": (256, 3072), "time_in.out_layer": (3072, 3072), "vector_in.in_layer": (768, 3072),
    "vector_in.out_layer": (3072, 3072), "guidance_in.in_layer": (256, 3072), "guidance_in.out_layer": (3072, 3072),
    "txt_in": (4096, 3072), "img_in": (64, 3072), "final_layer.linear": (3072, 64),
    "final_layer.adaLN_modulation.1": (3072, 6144),
}


def flux_bfl_lora(*, prefix: str = "", norms: bool = False, rank: int = 2, seed: int = 0,
                  globals_: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA over every FLUX.1-dev linear with BFL names and PEFT lora_A/lora_B
    (the BFL control / fal Kontext layout), bf16, small enough for a unit test."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, k, n):
        sd[f"{prefix}{name}.lora_A.weight"] = (torch.randn(rank, k, generator=g) * 0.01).bfloat16()
        sd[f"{prefix}{name}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * 0.01).bfloat16()

    for i in range(19):
        for name, (k, n) in FLUX_BFL_LINEARS.items():
            add(f"double_blocks.{i}.{name}", k, n)
        if norms:
            for part in ("img_attn", "txt_attn"):
                for nk in ("query_norm", "key_norm"):
                    sd[f"{prefix}double_blocks.{i}.{part}.norm.{nk}.scale"] = (
                        torch.rand(128, generator=g).bfloat16() + 0.5)
    for i in range(38):
        for name, (k, n) in FLUX_BFL_SINGLE.items():
            add(f"single_blocks.{i}.{name}", k, n)
        if norms:
            for nk in ("query_norm", "key_norm"):
                sd[f"{prefix}single_blocks.{i}.norm.{nk}.scale"] = torch.rand(128, generator=g).bfloat16() + 0.5
    for name, (k, n) in FLUX_BFL_GLOBAL.items():
        if globals_ is None or name in globals_:
            add(name, k, n)
    return sd


def flux_dev_skeleton(*, rank: int = 32) -> nn.Module:
    """FLUX.1-dev-shaped FluxTransformer2DModel on the meta device (no memory) whose block
    linears are SVDQLinear (meta), for planning LoRAs against the real module names/shapes."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "_blocks." in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    SVDQLinear(mod.in_features, mod.out_features, rank=rank, bias=mod.bias is not None, device="meta"))
    return model


def assert_deltas(model, base, expected, *, rtol=1e-5):
    """The LoRA state changed exactly the ``expected`` layers, each by the expected ΔW."""
    got = effective_deltas(model, base)
    assert sorted(got) == sorted(expected), (sorted(set(got) ^ set(expected)))
    for name, want in expected.items():
        err = (got[name] - want).abs().max().item()
        assert err <= rtol * want.abs().max().item() + 1e-7, (name, err)
