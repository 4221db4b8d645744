"""Nunchaku interop: import (all dialect paths used by FLUX), export, nunchaku_lite export.

Nunchaku-layout files are built here with the independent packer of ``nunchaku_reference``
(written from the reference notes); expected outputs come from its own model of Nunchaku's
forward math. Nothing downloads.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save

import nunchaku_reference as ref
from converters.nunchaku.exporter import export_nunchaku
from converters.nunchaku.importer import import_nunchaku
from converters.nunchaku.lite import export_nunchaku_lite
from svdq_format import packing
from svdq_format.checkpoint import load_file, validate
from svdq_format.errors import SVDQError, UnsupportedError
from svdq_format.linear import SVDQLinear
from svdq_format.model import WEIGHTS_NAME, save_model_dir
from svdq_format.pretrained import load_model_dir

SHIFT = 0.171875

# (C++ name, native name, kind, N/D, K/D, extra) for one FLUX double and one single block.
DOUBLE = [
    ("qkv_proj", "attn.to_qkv", "svdq", 3, 1, {"members": ["attn.to_q", "attn.to_k", "attn.to_v"]}),
    ("qkv_proj_context", "attn.add_qkv_proj", "svdq", 3, 1,
     {"members": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}),
    ("out_proj", "attn.to_out.0", "svdq", 1, 1, {}),
    ("out_proj_context", "attn.to_add_out", "svdq", 1, 1, {}),
    ("mlp_fc1", "ff.net.0.proj", "svdq", 4, 1, {}),
    ("mlp_fc2", "ff.net.2", "svdq", 1, 4, {"shifted": True}),
    ("mlp_context_fc1", "ff_context.net.0.proj", "svdq", 4, 1, {}),
    ("mlp_context_fc2", "ff_context.net.2", "svdq", 1, 4, {"shifted": True}),
    ("norm1.linear", "norm1.linear", "awq", 6, 1, {"splits": 6}),
    ("norm1_context.linear", "norm1_context.linear", "awq", 6, 1, {"splits": 6}),
]
SINGLE = [
    ("qkv_proj", "attn.to_qkv", "svdq", 3, 1, {"members": ["attn.to_q", "attn.to_k", "attn.to_v"]}),
    ("mlp_fc1", "mlp_fc1", "svdq", 4, 1, {"target": "proj_mlp"}),
    ("out_proj", "attn.to_out", "svdq", 1, 1, {"kconcat": 0, "zero_bias": True}),
    ("mlp_fc2", "mlp_fc2", "svdq", 1, 4, {"kconcat": 1, "shifted": True}),
    ("norm.linear", "norm.linear", "awq", 3, 1, {"splits": 3}),
]
QWEN = [
    (None, "attn.to_qkv", "svdq", 3, 1, {"members": ["attn.to_q", "attn.to_k", "attn.to_v"]}),
    (None, "attn.add_qkv_proj", "svdq", 3, 1, {"members": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}),
    (None, "attn.to_out.0", "svdq", 1, 1, {}),
    (None, "attn.to_add_out", "svdq", 1, 1, {}),
    (None, "img_mlp.net.0.proj", "svdq", 4, 1, {}),
    (None, "img_mlp.net.2", "svdq", 1, 4, {"shifted": True}),
    (None, "txt_mlp.net.0.proj", "svdq", 4, 1, {}),
    (None, "txt_mlp.net.2", "svdq", 1, 4, {"shifted": True}),
    (None, "img_mod.1", "awq", 6, 1, {"splits": 6}),
    (None, "txt_mod.1", "awq", 6, 1, {"splits": 6}),
]
QWEN_QUANTIZED = {"transformer_blocks.0": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                           "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                                           "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
                                           "txt_mod.1"]}
# Z-Image (absolute sizes, dim 192): Nunchaku runs feed_forward as a diffusers SwiGLU FeedForward.
ZIMAGE = [
    (None, "attention.to_qkv", "svdq", 576, 192,
     {"members": ["attention.to_q", "attention.to_k", "attention.to_v"], "nobias": True}),
    (None, "attention.to_out.0", "svdq", 192, 192, {"nobias": True}),
    (None, "feed_forward.net.0.proj", "svdq", 1024, 192,
     {"members": ["feed_forward.w3", "feed_forward.w1"], "nobias": True}),
    (None, "feed_forward.net.2", "svdq", 192, 512, {"target": "feed_forward.w2", "nobias": True}),
]
ZIMAGE_BLOCKS = ("layers.0", "noise_refiner.0", "context_refiner.0")
ZIMAGE_QUANTIZED = {b: ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                        "feed_forward.w2", "feed_forward.w3"] for b in ZIMAGE_BLOCKS}
# SDXL (C = 128): diffusers module names with a fused self-attention to_qkv, C++ tensor names.
SDXL = [
    (None, "attn1.to_qkv", "svdq", 384, 128,
     {"members": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "zero_bias": True}),
    (None, "attn1.to_out.0", "svdq", 128, 128, {}),
    (None, "attn2.to_q", "svdq", 128, 128, {"zero_bias": True}),
    (None, "attn2.to_out.0", "svdq", 128, 128, {}),
    (None, "ff.net.0.proj", "svdq", 1024, 128, {}),
    (None, "ff.net.2", "svdq", 128, 512, {}),  # after GEGLU: no shift
]
SDXL_MODULES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2"]
CPP_ROLES = {"down": "lora_down", "up": "lora_up", "smooth": "smooth", "smooth_orig": "smooth_orig"}
NATIVE_ROLES = {"down": "proj_down", "up": "proj_up", "smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig"}
QUANTIZED_MODULES = {
    "transformer_blocks.0": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                             "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear"],
    "single_transformer_blocks.0": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"],
}
CPP_NORMS = {"attn.norm_q": "norm_q", "attn.norm_k": "norm_k", "attn.norm_added_q": "norm_added_q",
             "attn.norm_added_k": "norm_added_k"}


def tiny_flux(inner: int = 64, dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    head = inner // 4
    axes = [4, 4, 8] if head == 16 else [8, 12, 12]
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                               attention_head_dim=head, num_attention_heads=4, joint_attention_dim=64,
                               pooled_projection_dim=32, axes_dims_rope=axes)
    return m.to(dtype).eval()


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=1, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                       axes_dims_rope=(4, 6, 6)).eval()


def tiny_sdxl():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8).eval()


def tiny_zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(dim=192, n_layers=1, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                                    cap_feat_dim=64, axes_dims=[16, 16, 16], axes_lens=[64, 32, 32]).eval()


def _svdq_logical(n, k, precision, dtype, gen, *, members=1, zero_bias=False, alpha=None, nobias=False):
    g = 16 if precision == "nvfp4" else 64
    r = 16
    lay = {"precision": precision}
    if precision == "int4":
        lay["codes"] = torch.randint(-8, 8, (n, k), generator=gen)
        lay["wscales"] = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
    else:
        lay["codes"] = torch.randint(0, 16, (n, k), generator=gen)
        lay["wscales"] = (torch.rand(n, k // g, generator=gen) * 3 + 0.25).to(torch.float8_e4m3fn)
        lay["alpha"] = float(
            torch.tensor(alpha or float(torch.rand(1, generator=gen)) * 0.01 + 0.001).to(torch.bfloat16))
        lay["wcscales"] = None
        if members > 1:
            per = torch.tensor([1.0, 0.75, 1.3125][:members])
            lay["wcscales"] = per.repeat_interleave(n // members).to(dtype)
    lay["smooth"] = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    lay["down"] = (torch.randn(r, k, generator=gen) * 0.05).to(dtype)
    lay["up"] = (torch.randn(n, r, generator=gen) * 0.05).to(dtype)
    lay["bias"] = torch.zeros(n, dtype=dtype) if zero_bias else (torch.randn(n, generator=gen) * 0.1).to(dtype)
    if nobias:
        lay["bias"] = None
    return lay


def _svdq_tensors(lay, roles):
    n, k = lay["codes"].shape
    np_, kp = ref.up128(n), ref.up128(k)
    fp4 = lay["precision"] == "nvfp4"
    g = 16 if fp4 else 64
    t = {"qweight": ref.pack_qweight(ref.pad(lay["codes"] & 0xF, (np_, kp)))}
    if fp4:
        t["wscales"] = ref.pack_micro(ref.pad(lay["wscales"], (np_, kp // g)))
        t["wtscale"] = torch.tensor([lay["alpha"]], dtype=torch.bfloat16)
        if lay["wcscales"] is not None:
            t["wcscales"] = ref.pack_vec(ref.pad(lay["wcscales"], (np_,), 1.0))
    else:
        t["wscales"] = ref.pack_scale(ref.pad(lay["wscales"], (np_, kp // g), 1.0))
    t[roles["smooth"]] = ref.pack_vec(ref.pad(lay["smooth"], (kp,), 1.0))
    t[roles["smooth_orig"]] = t[roles["smooth"]].clone()
    t[roles["down"]] = ref.pack_down(ref.pad(lay["down"], (lay["down"].shape[0], kp)))
    t[roles["up"]] = ref.pack_up(ref.pad(lay["up"], (np_, lay["up"].shape[1])))
    if lay["bias"] is not None:
        t["bias"] = ref.pack_vec(ref.pad(lay["bias"], (np_,)))
    return t


def _awq_logical(n, k, splits, dtype, gen):
    q = torch.randint(0, 15, (n, k), generator=gen)
    s32 = torch.rand(n, k // 64, generator=gen) * 0.02 + 0.002
    scales, zeros = s32.to(torch.bfloat16), (-7 * s32).to(torch.bfloat16)  # as DeepCompressor rounds them
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    delta = torch.zeros(splits, n // splits)
    delta[[1, splits - 2]] = 1.0
    perm = ref.interleave_perm(n, splits)
    stored = {"q": q[perm], "scales": scales[perm], "zeros": zeros[perm],
              "bias": (bias.float() + delta.reshape(n))[perm].to(dtype)}
    return stored, perm, delta.reshape(n)[perm]


def _awq_tensors(st):
    n, k = st["q"].shape
    gp = -(-(k // 64) // 16) * 16  # DeepCompressor pads the groups to 16
    return {"qweight": ref.pack_awq(st["q"]), "wscales": ref.pad(st["scales"].T.contiguous(), (gp, n)),
            "wzeros": ref.pad(st["zeros"].T.contiguous(), (gp, n)), "bias": st["bias"]}


def build_file(path, *, precision, dialect, dtype, inner=64, seed=0, single_alpha=None, arch="flux",
               skip_refiners=False):
    """A Nunchaku single file for a tiny FLUX (or Qwen-Image); returns the logical layers."""
    model = {"flux": lambda: tiny_flux(inner), "qwen": tiny_qwen, "zimage": tiny_zimage, "sdxl": tiny_sdxl}[arch]()
    sdxl_blocks = [n[: -len(".attn1")] for n, _ in model.named_modules() if n.endswith("transformer_blocks.0.attn1")]
    quantized = {"flux": QUANTIZED_MODULES, "qwen": QWEN_QUANTIZED, "zimage": ZIMAGE_QUANTIZED,
                 "sdxl": {b: SDXL_MODULES for b in sdxl_blocks}}[arch]
    blocks = {"flux": (("transformer_blocks.0", DOUBLE), ("single_transformer_blocks.0", SINGLE)),
              "qwen": (("transformer_blocks.0", QWEN),),
              "zimage": tuple((b, ZIMAGE) for b in (ZIMAGE_BLOCKS[:1] if skip_refiners else ZIMAGE_BLOCKS)),
              "sdxl": tuple((b, SDXL) for b in sdxl_blocks)}[arch]
    if skip_refiners:
        quantized = {b: ms for b, ms in quantized.items() if b == "layers.0"}
    quantized_full = {f"{b}.{m}" for b, ms in quantized.items() for m in ms}
    gen = torch.Generator().manual_seed(seed)
    roles = CPP_ROLES if dialect in ("flux-cpp", "sdxl") else NATIVE_ROLES
    tensors, logical = {}, {}
    for block, table in blocks:
        for cpp, native, kind, nf, kf, extra in table:
            n, k = (nf, kf) if arch in ("zimage", "sdxl") else (nf * inner, kf * inner)
            name = f"{block}.{cpp if dialect == 'flux-cpp' else native}"
            if kind == "awq":
                st, perm, delta = _awq_logical(n, k, extra["splits"], dtype, gen)
                logical[(block, native)] = ("awq", st, perm, delta, extra)
                for role, t in _awq_tensors(st).items():
                    tensors[f"{name}.{role}"] = t
                continue
            alpha = single_alpha if (single_alpha and "kconcat" in extra) else None
            lay = _svdq_logical(n, k, precision, dtype, gen, members=len(extra.get("members", [1])),
                                zero_bias=extra.get("zero_bias", False), alpha=alpha, nobias=extra.get("nobias", False))
            logical[(block, native)] = ("svdq", lay, None, None, extra)
            for role, t in _svdq_tensors(lay, roles).items():
                tensors[f"{name}.{role}"] = t
    for key, v in model.state_dict().items():
        block = ".".join(key.split(".")[:2])
        mod = key.rsplit(".", 1)[0]
        if mod in quantized_full:
            continue
        if dialect == "flux-cpp" and block in quantized:
            for d, c in CPP_NORMS.items():
                key = key.replace(f"{block}.{d}.", f"{block}.{c}.")
        tensors[key] = v.to(dtype).contiguous()
    if skip_refiners:  # Nunchaku keeps unquantized refiners as its rebuilt SwiGLU FeedForward
        for b in ZIMAGE_BLOCKS[1:]:
            ff = f"{b}.feed_forward"
            tensors[f"{ff}.net.0.proj.weight"] = torch.cat([tensors.pop(f"{ff}.w3.weight"),
                                                            tensors.pop(f"{ff}.w1.weight")])
            tensors[f"{ff}.net.2.weight"] = tensors.pop(f"{ff}.w2.weight")
    meta = {"config": model.to_json_string(), "model_class": f"Nunchaku{type(model).__name__}",
            "quantization_config": json.dumps({"method": "svdquant", "rank": 16}), "comfy_config": "{}"}
    st_save(tensors, str(path), metadata=meta)
    return logical


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _check_forward(out_dir, logical, inner):
    ours = load_file(out_dir / WEIGHTS_NAME)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    kx = {}
    for (block, native), (kind, lay, perm, delta, extra) in logical.items():
        k = lay["codes"].shape[1] if kind == "svdq" else lay["q"].shape[1]
        x = torch.randn(5, k, generator=gen)
        if kind == "awq":
            y_ref = ref.awq_forward(x, lay)
            y = ours[f"{block}.{native}"](x)[:, perm] + delta
        elif "kconcat" in extra:
            kx[extra["kconcat"]] = (x, lay, extra)
            continue
        else:
            shifted = extra.get("shifted") and lay["precision"] == "int4"
            if extra.get("shifted"):
                x = torch.nn.functional.gelu(2 * x, approximate="tanh")
            y_ref = ref.w4a4_forward(x, lay, SHIFT if shifted else 0.0, bool(shifted))
            names = [f"{block}.{m}" for m in extra.get("members", [extra.get("target", native)])]
            y = torch.cat([ours[m](x) for m in names], dim=-1)
        worst = max(worst, _rel(y, y_ref))
    if not kx:
        return worst, ours
    (xa, la, _), (xb, lb, _) = kx[0], kx[1]
    xb = torch.nn.functional.gelu(2 * xb, approximate="tanh")
    int4 = la["precision"] == "int4"
    y_ref = ref.w4a4_forward(xa, la, 0.0, False) + ref.w4a4_forward(xb, lb, SHIFT if int4 else 0.0, int4)
    y = ours["single_transformer_blocks.0.proj_out"](torch.cat([xa, xb], dim=-1))
    return max(worst, _rel(y, y_ref)), ours


@pytest.mark.parametrize("precision,dialect", [("int4", "flux-cpp"), ("nvfp4", "native")])
def test_import_forward_matches_nunchaku_math(tmp_path, precision, dialect):
    src = tmp_path / "svdq.safetensors"
    logical = build_file(src, precision=precision, dialect=dialect, dtype=torch.float32)
    out = import_nunchaku(src, tmp_path / "ours")
    validate(out)
    worst, ours = _check_forward(out, logical, 64)
    assert worst <= 1e-5, worst
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["_class_name"] == "FluxTransformer2DModel" and qc["quant_method"] == "svdquant"
    assert qc["source"]["dialect"] == dialect
    fc2 = qc["layers"]["transformer_blocks.0.ff.net.2"]
    assert fc2.get("act_unsigned", False) == (precision == "int4")
    assert fc2.get("act_shift", 0.0) == (SHIFT if precision == "int4" else 0.0)
    assert qc["layers"]["transformer_blocks.0.norm1.linear"]["kind"] == "w4a16"
    assert "transformer_blocks.0.attn.to_k" in qc["layers"] and "transformer_blocks.0.attn.to_qkv" not in qc["layers"]
    with safe_open(str(out / WEIGHTS_NAME), "pt") as h:
        assert "transformer_blocks.0.attn.norm_added_q.weight" in h.keys()
    # int4: shifted MLP half; nvfp4: two different tensor scales -> one proj_out with two k-segments
    proj_out = qc["layers"]["single_transformer_blocks.0.proj_out"]
    mlp_half = {"size": 256, "act_shift": SHIFT, "act_unsigned": True} if precision == "int4" else {"size": 256}
    assert proj_out["k_segments"] == [{"size": 64}, mlp_half] and "act_shift" not in proj_out
    assert qc["format_version"] == 2 and qc["features"] == ["k_segments"] and "k_concat" not in qc["nunchaku"]
    assert ours["single_transformer_blocks.0.proj_out"].k_segments
    assert not {"single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.0.mlp_fc2"} & set(qc["layers"])
    if precision == "nvfp4":
        assert ours["single_transformer_blocks.0.proj_out"].wtscale.shape == (2,)


@pytest.mark.parametrize("precision", ["int4"])
def test_import_qwen_image_native(tmp_path, precision):
    src = tmp_path / "qwen.safetensors"
    logical = build_file(src, precision=precision, dialect="native", dtype=torch.float32, arch="qwen")
    out = import_nunchaku(src, tmp_path / "ours")
    worst, _ = _check_forward(out, logical, 64)
    assert worst <= 1e-5, worst
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["layers"]["transformer_blocks.0.txt_mlp.net.2"].get("act_unsigned", False) == (precision == "int4")
    assert qc["nunchaku"]["adanorm"] == {"transformer_blocks.0.img_mod.1": 6, "transformer_blocks.0.txt_mod.1": 6}
    model = load_model_dir(out)  # every layer has its stock diffusers module
    assert isinstance(model.transformer_blocks[0].attn.add_v_proj, SVDQLinear)


def test_import_zimage_swiglu_feed_forward(tmp_path):
    src = tmp_path / "zimage.safetensors"
    logical = build_file(src, precision="int4", dialect="native", dtype=torch.float32, arch="zimage")
    out = import_nunchaku(src, tmp_path / "ours")
    worst, ours = _check_forward(out, logical, 192)
    assert worst <= 1e-5, worst
    assert {"layers.0.feed_forward.w1", "noise_refiner.0.feed_forward.w3",
            "context_refiner.0.attention.to_v"} <= set(ours)
    assert not ours["layers.0.feed_forward.w2"].act_unsigned  # SwiGLU, not a GELU fc2
    model = load_model_dir(out)
    assert isinstance(model.layers[0].feed_forward.w2, SVDQLinear)


def test_import_sdxl_dialect(tmp_path):
    src = tmp_path / "sdxl.safetensors"
    logical = build_file(src, precision="int4", dialect="sdxl", dtype=torch.float32, arch="sdxl")
    out = import_nunchaku(src, tmp_path / "ours")
    worst, ours = _check_forward(out, logical, 128)
    assert worst <= 1e-5, worst
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["source"]["dialect"] == "sdxl" and len(qc["layers"]) == 4 * 8
    b = "mid_block.attentions.0.transformer_blocks.0"
    assert not ours[f"{b}.ff.net.2"].act_unsigned and ours[f"{b}.attn1.to_k"].bias is None
    model = load_model_dir(out)
    assert isinstance(model.get_submodule(f"{b}.attn2.to_q"), SVDQLinear)


def test_import_merged_proj_out_loads_into_stock_diffusers(tmp_path):
    src = tmp_path / "fp4.safetensors"
    build_file(src, precision="nvfp4", dialect="native", dtype=torch.bfloat16, single_alpha=0.5)
    out = import_nunchaku(src, tmp_path / "ours")
    model = load_model_dir(out)
    assert isinstance(model.single_transformer_blocks[0].proj_out, SVDQLinear)
    assert isinstance(model.transformer_blocks[0].attn.to_v, SVDQLinear)
    torch.manual_seed(0)
    with torch.no_grad():
        y = model(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, 8, 64, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample
    assert y.shape == (1, 16, 16) and torch.isfinite(y.float()).all()


def _all_tensors(path):
    with safe_open(str(path), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.mark.parametrize("precision,dialect,arch", [("int4", "flux-cpp", "flux"), ("nvfp4", "native", "flux"),
                                                   ("int4", "native", "zimage")])
def test_ours_to_nunchaku_to_ours_is_bit_identical(tmp_path, precision, dialect, arch):
    src = tmp_path / "src.safetensors"
    build_file(src, precision=precision, dialect=dialect, dtype=torch.bfloat16, seed=3, arch=arch)
    ours = import_nunchaku(src, tmp_path / "ours")
    nun = export_nunchaku(ours, tmp_path / "nun.safetensors")
    back = import_nunchaku(nun, tmp_path / "back")
    a, b = _all_tensors(ours / WEIGHTS_NAME), _all_tensors(back / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8),
                                                        b[k].reshape(-1).view(torch.uint8)), k
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]["layers"]
    qb = json.loads((back / "config.json").read_text())["quantization_config"]["layers"]
    assert qa == qb
    with safe_open(str(nun), "pt") as h:
        keys, meta = set(h.keys()), h.metadata()
    with safe_open(str(src), "pt") as h:
        assert keys == set(h.keys())  # the same dialect's names as the original file
    assert json.loads(meta["quantization_config"])["rank"] == 16
    assert json.loads(meta["config"])["_class_name"] == json.loads((ours / "config.json").read_text())["_class_name"]


def _quantized_flux(tmp_path, precision, inner=128):
    """Our own checkpoint of a tiny FLUX: every block linear W4A4, modulation W4A16."""
    model = tiny_flux(inner, torch.bfloat16)
    specs = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            awq = name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))
            new = SVDQLinear.from_linear(mod, rank=0 if awq else 8, precision="int4" if awq else precision,
                                         kind="w4a16" if awq else "w4a4")
            specs[name] = new
    for name, new in specs.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    out = save_model_dir(model, tmp_path / f"q-{precision}")
    return out, specs


def _stub_kernels(monkeypatch):
    """Import diffusers' nunchaku_lite utils offline: a stub ``kernels`` package, trust flag on."""
    import diffusers.utils as du
    import diffusers.utils.constants as dc

    monkeypatch.setitem(sys.modules, "kernels",
                        types.SimpleNamespace(get_kernel=lambda *a, **k: types.SimpleNamespace(ops=None)))
    monkeypatch.setattr(du, "is_kernels_available", lambda: True)
    monkeypatch.setattr(du, "is_kernels_version", lambda *a: False)
    monkeypatch.setattr(dc, "DIFFUSERS_TRUST_REMOTE_KERNELS", True)
    monkeypatch.delitem(sys.modules, "diffusers.quantizers.nunchaku.utils", raising=False)
    import importlib

    return importlib.import_module("diffusers.quantizers.nunchaku.utils")


@pytest.mark.parametrize("precision", ["nvfp4", "int4"])
def test_nunchaku_lite_matches_diffusers_loader(tmp_path, monkeypatch, precision):
    from diffusers.quantizers.quantization_config import NunchakuLiteQuantizationConfig

    src, layers = _quantized_flux(tmp_path, precision)
    report = export_nunchaku_lite(src, tmp_path / "lite")
    cfg = json.loads((tmp_path / "lite" / "config.json").read_text())
    qc = cfg["quantization_config"]
    config = NunchakuLiteQuantizationConfig.from_dict(qc)  # diffusers' own validation
    assert qc["svdq_w4a4"]["rank"] == 16 and qc["svdq_w4a4"]["group_size"] == (16 if precision == "nvfp4" else 64)
    assert set(qc["awq_w4a16"]["targets"]) == {n for n, x in layers.items() if x.kind == "w4a16"}
    assert report["max_rel_scale_error"] < (2**-11 if precision == "nvfp4" else 1e-30)  # bf16 pair split

    utils = _stub_kernels(monkeypatch)
    model = tiny_flux(128, torch.bfloat16)
    utils.replace_with_nunchaku_linear(model, config.to_dict(), torch.bfloat16)
    state = _all_tensors(tmp_path / "lite" / WEIGHTS_NAME)
    utils.check_strict_state_dict_match(model, state)  # raises on any missing / unexpected key
    expected = dict(model.named_parameters())
    for k, t in state.items():
        assert t.dtype == expected[k].dtype and t.shape == expected[k].shape, k
    # Values: the independent packer applied to our canonical tensors gives the same bytes.
    lay = layers["transformer_blocks.0.attn.to_k"]
    pre = "transformer_blocks.0.attn.to_k."
    assert torch.equal(state[pre + "qweight"], ref.pack_qweight(packing.unpack_nibbles(lay.qweight)))
    assert torch.equal(state[pre + "smooth_factor"], ref.pack_vec(lay.smooth))
    assert torch.equal(state[pre + "proj_down"], ref.pack_down(ref.pad(lay.lora_down, (16, 128))))
    assert torch.equal(state[pre + "proj_up"], ref.pack_up(ref.pad(lay.lora_up, (lay.out_features, 16))))
    packed = ref.pack_micro(lay.wscales) if precision == "nvfp4" else ref.pack_scale(lay.wscales)
    assert torch.equal(state[pre + "wscales"].view(torch.uint8), packed.view(torch.uint8))
    awq = layers["transformer_blocks.0.norm1.linear"]
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(awq.qweight)).long() + 8
    assert torch.equal(state["transformer_blocks.0.norm1.linear.qweight"], ref.pack_awq(codes))


def test_export_refuses_what_nunchaku_cannot_express(tmp_path):
    src, _ = _quantized_flux(tmp_path, "nvfp4", inner=64)
    with pytest.raises(UnsupportedError, match="layer .*to_k.*tensor scale"):
        export_nunchaku(src, tmp_path / "x.safetensors")  # q/k/v have their own fp32 tensor scales
    src4, _ = _quantized_flux(tmp_path, "int4", inner=64)
    with pytest.raises(UnsupportedError, match=r"layer \S+(proj_out|net\.2)"):
        export_nunchaku(src4, tmp_path / "y.safetensors")  # fc2 quantized without the GELU shift
    f32 = tmp_path / "f32.safetensors"
    build_file(f32, precision="int4", dialect="flux-cpp", dtype=torch.float32)
    ours = import_nunchaku(f32, tmp_path / "ours32")
    with pytest.raises(UnsupportedError, match="16-bit compute dtype"):
        export_nunchaku(ours, tmp_path / "z.safetensors")
    b16 = tmp_path / "b16.safetensors"
    build_file(b16, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16, inner=128)
    with pytest.raises(UnsupportedError, match=r"layer \S+(proj_out|net\.2): nunchaku_lite has no activation shift"):
        export_nunchaku_lite(import_nunchaku(b16, tmp_path / "o16"), tmp_path / "lite")  # shifted int4 layers


def test_import_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.safetensors"
    st_save({"a.weight": torch.zeros(2)}, str(bad),
            metadata={"config": json.dumps({"_class_name": "FluxTransformer2DModel"})})
    with pytest.raises(UnsupportedError, match="unknown Nunchaku dialect"):
        import_nunchaku(bad, tmp_path / "o")
    src = tmp_path / "src.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    t = _all_tensors(src)
    with safe_open(str(src), "pt") as h:
        meta = h.metadata()
    del t["transformer_blocks.0.norm_q.weight"]
    st_save(t, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(SVDQError, match="norm_q.weight.*missing"):
        import_nunchaku(tmp_path / "missing.safetensors", tmp_path / "o2")
    assert not (tmp_path / "o2" / WEIGHTS_NAME).exists()


def test_cli_convert_round_trip(tmp_path, capsys):
    from svdq_format.cli import main

    src = tmp_path / "src.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    assert main(["convert", "--from", "nunchaku", str(src), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "nunchaku", str(tmp_path / "ours"), str(tmp_path / "n.safetensors")]) == 0
    assert main(["convert", "--to", "nunchaku-lite", str(tmp_path / "ours"), str(tmp_path / "lite")]) == 1
    assert "error:" in capsys.readouterr().err



def test_cli_convert_of_a_file_without_config_asks_for_config_option(tmp_path, capsys):
    """The header-less case gives CLI advice at the CLI (--config), and --config makes it work."""
    from svdq_format.cli import main

    src = tmp_path / "src.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    with safe_open(str(src), "pt") as h:
        meta = h.metadata()
    config = json.loads(meta.pop("config"))
    st_save(_all_tensors(src), str(tmp_path / "bare.safetensors"), metadata=meta)
    assert main(["convert", "--from", "nunchaku", str(tmp_path / "bare.safetensors"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"error: {tmp_path / 'bare.safetensors'}: config: no diffusers config in the header: give the "
                   "model's config with --config (its config.json, or the folder holding it)")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--from", "nunchaku", str(tmp_path / "bare.safetensors"), str(tmp_path / "o"),
                 "--config", str(tmp_path / "transformer")]) == 0
    assert main(["convert", "--from", "nunchaku", str(src), str(tmp_path / "ref")]) == 0
    got, ref = _all_tensors(tmp_path / "o" / WEIGHTS_NAME), _all_tensors(tmp_path / "ref" / WEIGHTS_NAME)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert main(["convert", "--from", "nunchaku", str(src), str(tmp_path / "x"), "--config", "nope.json"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "error: nope.json: no such file (--config: the model's config.json)"


def test_dialect_detection_and_names():
    from converters.nunchaku.names import detect_dialect, from_native, to_native

    sdxl = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.lora_down",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.smooth"]
    cpp = ["transformer_blocks.3.mlp_context_fc2.lora_up", "transformer_blocks.3.qkv_proj.smooth"]
    native = ["transformer_blocks.0.attn.to_qkv.proj_down", "transformer_blocks.0.img_mlp.net.2.smooth_factor"]
    assert (detect_dialect(sdxl), detect_dialect(cpp), detect_dialect(native)) == ("sdxl", "flux-cpp", "native")
    assert to_native(sdxl[0], "sdxl") == sdxl[0]
    assert (to_native("transformer_blocks.3.mlp_context_fc2.lora_up", "flux-cpp")
            == "transformer_blocks.3.ff_context.net.2.lora_up")
    assert (to_native("single_transformer_blocks.2.out_proj.smooth_orig", "flux-cpp")
            == "single_transformer_blocks.2.attn.to_out.smooth_orig")
    assert (to_native("transformer_blocks.1.norm_added_k.weight", "flux-cpp")
            == "transformer_blocks.1.attn.norm_added_k.weight")
    assert (to_native("transformer_blocks.0.attn.to_qkv.smooth_factor", "native")
            == "transformer_blocks.0.attn.to_qkv.smooth")
    for key, d in [(k, "flux-cpp") for k in cpp] + [(k, "native") for k in native] + [(k, "sdxl") for k in sdxl]:
        assert from_native(to_native(key, d), d) == key
    with pytest.raises(UnsupportedError, match="mixes"):
        detect_dialect(cpp + native)


def test_native_quantized_flux_round_trips_through_nunchaku(tmp_path):
    """Our own nvfp4 FLUX (q/k/v with separate low-rank branches, one proj_out, exact AdaLN biases)."""
    src, layers = _quantized_flux(tmp_path, "nvfp4", inner=64)
    cfg = json.loads((src / "config.json").read_text())
    # Nunchaku's fused q|k|v needs tensor scales whose ratios are exact in bf16: requantize the
    # residuals of every attention projection with one shared tensor scale.
    for name, layer in layers.items():
        if layer.kind == "w4a4":
            nib, gs, ts = packing.quantize_nvfp4(layer.residual(), tensor_scale=1e-3)
            layer.qweight.copy_(packing.pack_nibbles(nib))
            layer.wscales.copy_(gs)
            layer.wtscale.copy_(ts)
    model = tiny_flux(64, torch.bfloat16)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    src = save_model_dir(model, tmp_path / "ours", config={k: v for k, v in cfg.items() if k != "quantization_config"})
    nun = export_nunchaku(src, tmp_path / "nun.safetensors")
    with safe_open(str(nun), "pt") as h:
        meta = h.metadata()
        assert "transformer_blocks.0.qkv_proj.wcscales" in h.keys()  # flux-cpp names by default
    assert "svdquant_exact_bias" in meta  # bf16(b + 1) rounds for most random AdaLN biases
    back = import_nunchaku(nun, tmp_path / "back")
    a, b = _all_tensors(src / WEIGHTS_NAME), _all_tensors(back / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_imported_int4_flux_loads_with_stock_from_pretrained(tmp_path):
    """One proj_out per single block (k_segments): stock diffusers loads the import, and the model's
    layers compute Nunchaku's math within the bounds of the forward test."""
    from diffusers import FluxTransformer2DModel

    import svdq_format  # noqa: F401  (registers the "svdquant" quantizer with diffusers)
    from converters.nunchaku.model import load_imported_model

    src = tmp_path / "int4.safetensors"
    logical = build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.float32)
    out = import_nunchaku(src, tmp_path / "ours")
    model = FluxTransformer2DModel.from_pretrained(out)
    proj_out = model.single_transformer_blocks[0].proj_out
    assert isinstance(proj_out, SVDQLinear) and [s.size for s in proj_out.k_segments] == [64, 256]
    la = logical[("single_transformer_blocks.0", "attn.to_out")][1]
    lb = logical[("single_transformer_blocks.0", "mlp_fc2")][1]
    torch.manual_seed(2)
    xa, xb = torch.randn(3, 64), torch.nn.functional.gelu(torch.randn(3, 256), approximate="tanh")
    y_ref = ref.w4a4_forward(xa, la, 0.0, False) + ref.w4a4_forward(xb, lb, SHIFT, True)
    assert _rel(proj_out(torch.cat([xa, xb], -1)), y_ref) <= 1e-5
    fc2 = model.transformer_blocks[0].ff.net[2]
    x2 = torch.nn.functional.gelu(torch.randn(3, 256), approximate="tanh")
    lay2 = logical[("transformer_blocks.0", "ff.net.2")][1]
    assert _rel(fc2(x2), ref.w4a4_forward(x2, lay2, SHIFT, True)) <= 1e-5
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 64),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        y = model(**inputs).sample
    assert y.shape == (1, 16, 16) and torch.isfinite(y).all()
    with pytest.deprecated_call():  # the old loader is an alias now
        again = load_imported_model(out)
    with torch.no_grad():
        assert torch.equal(again(**inputs).sample, y)
    # a model saved from the loaded one keeps the per-segment layer (format 2) and reloads to the same outputs
    model.save_pretrained(tmp_path / "saved", max_shard_size="200KB")
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, y)


def test_load_imported_model_refuses_a_two_layer_proj_out_directory(tmp_path):
    from converters.nunchaku.model import load_imported_model

    src = tmp_path / "int4.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    out = import_nunchaku(src, tmp_path / "ours")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["nunchaku"]["k_concat"] = {"single_transformer_blocks.0.proj_out": ["a", "b"]}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.deprecated_call(), pytest.raises(UnsupportedError, match="re-import"):
        load_imported_model(out)


def test_import_errors_name_the_tensor_as_written_in_the_file(tmp_path):
    src = tmp_path / "src.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    t = _all_tensors(src)
    with safe_open(str(src), "pt") as h:
        meta = h.metadata()
    bad = dict(t)
    bad["transformer_blocks.0.qkv_proj.qweight"] = bad["transformer_blocks.0.qkv_proj.qweight"][:64].clone()
    st_save(bad, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(SVDQError, match=r"transformer_blocks\.0\.qkv_proj\.qweight: packed shape") as info:
        import_nunchaku(tmp_path / "short.safetensors", tmp_path / "o1")
    assert "to_qkv" not in str(info.value)
    bad = dict(t)
    del bad["single_transformer_blocks.0.mlp_fc2.smooth"]
    st_save(bad, str(tmp_path / "nosmooth.safetensors"), metadata=meta)
    with pytest.raises(SVDQError, match=r"single_transformer_blocks\.0\.mlp_fc2\.smooth: missing"):
        import_nunchaku(tmp_path / "nosmooth.safetensors", tmp_path / "o2")
    bad = {k: v for k, v in t.items() if not k.startswith("single_transformer_blocks.0.out_proj.")}
    st_save(bad, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(SVDQError, match=r"single_transformer_blocks\.0\.mlp_fc2\.qweight: only one half"):
        import_nunchaku(tmp_path / "half.safetensors", tmp_path / "o3")


def test_zimage_unquantized_refiners_round_trip(tmp_path):
    src = tmp_path / "z.safetensors"
    build_file(src, precision="int4", dialect="native", dtype=torch.bfloat16, arch="zimage", skip_refiners=True)
    out = import_nunchaku(src, tmp_path / "ours")
    ours = _all_tensors(out / WEIGHTS_NAME)
    model = tiny_zimage()
    for m in ("w1", "w2", "w3"):
        key = f"noise_refiner.0.feed_forward.{m}.weight"
        assert torch.equal(ours[key], model.state_dict()[key].to(torch.bfloat16)), key
    nun = export_nunchaku(out, tmp_path / "z2.safetensors")
    with safe_open(str(nun), "pt") as h:
        assert json.loads(h.metadata()["quantization_config"])["skip_refiners"] is True
        assert set(h.keys()) == set(_all_tensors(src))
    back = _all_tensors(import_nunchaku(nun, tmp_path / "back") / WEIGHTS_NAME)
    assert ours.keys() == back.keys()
    for k in ours:
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), back[k].reshape(-1).view(torch.uint8)), k


def _with_rank(layer: SVDQLinear, rank: int) -> SVDQLinear:
    """``layer`` with its low-rank branch cut to the first ``rank`` ranks (as the rank allocation
    gives layers different ranks)."""
    new = SVDQLinear(layer.in_features, layer.out_features, rank=rank, precision=layer.precision, kind=layer.kind,
                     bias=layer.bias is not None, dtype=layer.dtype, scale_dtype=layer.wscales.dtype,
                     act_shift=layer.act_shift, act_unsigned=layer.act_unsigned)
    with torch.no_grad():
        for name in ("qweight", "wscales", "wtscale", "smooth", "bias"):
            if getattr(layer, name, None) is not None:
                getattr(new, name).copy_(getattr(layer, name))
        if rank:
            new.lora_down.copy_(layer.lora_down[:rank])
            new.lora_up.copy_(layer.lora_up[:, :rank])
    return new


def test_export_of_per_layer_ranks_pads_them_and_keeps_every_layer(tmp_path):
    """Unequal ranks, inside a fused q|k|v group too: the file gets one rank (zero-padded branches)
    and every layer comes back computing what it did."""
    src = tmp_path / "src.safetensors"
    build_file(src, precision="nvfp4", dialect="native", dtype=torch.bfloat16, seed=4, single_alpha=0.5)
    model = load_model_dir(import_nunchaku(src, tmp_path / "ours"))  # (int4's K-split proj_out needs its own loader)
    cuts = {"transformer_blocks.0.attn.to_k": 0, "transformer_blocks.0.attn.to_v": 8,
            "transformer_blocks.0.ff.net.0.proj": 0, "single_transformer_blocks.0.attn.to_q": 0}
    for name, rank in cuts.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _with_rank(model.get_submodule(name), rank))
    ours = save_model_dir(model, tmp_path / "ranks")
    layers = json.loads((ours / "config.json").read_text())["quantization_config"]["layers"]
    assert {n: layers[n]["rank"] for n in cuts} == cuts
    nun = export_nunchaku(ours, tmp_path / "nun.safetensors")
    with safe_open(str(nun), "pt") as h:
        file_rank = json.loads(h.metadata()["quantization_config"])["rank"]
        assert file_rank >= max(x["rank"] for x in layers.values())  # one rank: every branch zero-padded to it
        fc1 = h.get_tensor("transformer_blocks.0.mlp_fc1.lora_down")  # (flux-cpp names: [K, rank])
    assert fc1.shape[1] == file_rank and not fc1.any()  # a rank-0 layer: all padding
    back = load_model_dir(import_nunchaku(nun, tmp_path / "back"))
    g = torch.Generator().manual_seed(0)
    for name, layer in model.named_modules():
        if isinstance(layer, SVDQLinear):
            x = torch.randn(5, layer.in_features, generator=g).to(torch.bfloat16)
            with torch.no_grad():
                a, b = layer(x).float(), back.get_submodule(name)(x).float()
            assert _rel(b, a) < 1e-2, name  # bf16 outputs; the branches' zero padding adds nothing
            assert torch.allclose(back.get_submodule(name).dequantize(), layer.dequantize(), rtol=0, atol=1e-6), name
