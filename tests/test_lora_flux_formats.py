"""Formats whose diffusers converters are hard-wired to FLUX.1-dev shapes (BFL control LoRAs,
fal Kontext): normalised and planned against a FLUX.1-dev-shaped model on the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from converters.lora import convert_lora
from svdq_format.linear import SVDQLinear
from tests.lora_fixtures import flux_bfl_lora, flux_dev_skeleton


@pytest.fixture(scope="module")
def skeleton():
    return flux_dev_skeleton()


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SVDQLinear))}


def test_bfl_control_lora_every_linear_and_norms(skeleton):
    sd = flux_bfl_lora(norms=True)
    plan, report = convert_lora(skeleton, sd, adapter_name="control")
    assert report.format == "bfl-control"
    assert not report.unmatched, report.unmatched[:5]
    # every linear of the model receives the LoRA, plus the q/k norms as whole-weight swaps
    assert set(plan.layers) == _linear_names(skeleton)
    assert len(plan.params) == 19 * 4 + 38 * 2
    assert all(p.endswith((".norm_q.weight", ".norm_k.weight", ".norm_added_q.weight", ".norm_added_k.weight"))
               for p in plan.params)
    # the single-block linear1 (q|k|v|mlp) was split by diffusers; ranks padded to 16 on SVDQ layers
    q = plan.layers["single_transformer_blocks.5.attn.to_q"]
    assert q.down.shape == (16, 3072) and q.up.shape == (3072, 16)
    assert int((q.scales != 0).sum()) == 2
    a = sd["single_blocks.5.linear1.lora_A.weight"]
    b = sd["single_blocks.5.linear1.lora_B.weight"]
    assert torch.equal(q.down[:2], a) and torch.equal(q.up[:, :2], b[:3072])
    mlp = plan.layers["single_transformer_blocks.5.proj_mlp"]
    assert torch.equal(mlp.up[:, :2], b[9216:])
    # 16-bit layers keep their rank (no padding)
    assert plan.layers["x_embedder"].down.shape == (2, 64)
    _check_norm_out(plan, sd, "")


def test_fal_kontext_peft_wrapped_bfl_names(skeleton):
    # fal's converter covers the blocks and the final projection
    sd = flux_bfl_lora(prefix="base_model.model.", globals_=("final_layer.linear",))
    plan, report = convert_lora(skeleton, sd, adapter_name="kontext")
    assert report.format == "fal-kontext"
    assert not report.unmatched, report.unmatched[:5]
    blocks = {n for n in _linear_names(skeleton) if "_blocks." in n}
    assert set(plan.layers) == blocks | {"proj_out"}
    a = sd["base_model.model.double_blocks.3.txt_attn.qkv.lora_A.weight"]
    b = sd["base_model.model.double_blocks.3.txt_attn.qkv.lora_B.weight"]
    v = plan.layers["transformer_blocks.3.attn.add_v_proj"]
    assert torch.equal(v.down[:2], a) and torch.equal(v.up[:, :2], b[6144:])


def _check_norm_out(plan, sd, prefix):
    # BFL's final adaLN is [shift, scale], diffusers' norm_out.linear [scale, shift]: ΔW's output
    # rows swap, and only those (diffusers also permutes lora_A's rank rows; we undo that).
    a = sd[f"{prefix}final_layer.adaLN_modulation.1.lora_A.weight"]
    b = sd[f"{prefix}final_layer.adaLN_modulation.1.lora_B.weight"]
    d = plan.layers["norm_out.linear"]
    got = d.up.double() @ (d.down.double() * d.scales.double()[:, None])
    want = torch.cat([b[3072:], b[:3072]]).double() @ a.double()
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
