"""diffusers' ``fuse_qkv_projections()`` on a quantized model: SVDQ q/k/v layers fused per
docs/format.md §10 (svdq_format.fusion), exact, memory-flat, reversible, LoRA-aware."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from converters.lora import load_lora, unload_all  # noqa: E402
from lora_fixtures import flux_inputs, lora_targets, peft_state_dict, quantize, random_factors, tiny_flux  # noqa: E402
from svdq_format import fusion  # noqa: E402
from svdq_format.errors import SVDQError, UnsupportedError  # noqa: E402
from svdq_format.linear import SVDQLinear  # noqa: E402
from svdq_format.model import save_pretrained  # noqa: E402

FUSED = ["transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv",
         "single_transformer_blocks.0.attn.to_qkv"]


@pytest.fixture(scope="module")
def dense():
    return tiny_flux()


@pytest.fixture()
def q(dense):
    model = quantize(dense)
    assert fusion.install(model) == 2  # the double and the single block's attention
    return model


def _run(model):
    with torch.no_grad():
        return model(**flux_inputs(), return_dict=False)[0]


def _close(a, b, tol=1e-5):
    return ((a - b).norm() / b.norm()).item() <= tol


def test_fuse_qkv_projections_gives_the_same_output(q):
    before = _run(q)
    q.fuse_qkv_projections()  # diffusers' own API
    assert sorted(fusion.fused_modules(q)) == sorted(FUSED)
    attn = q.transformer_blocks[0].attn
    assert attn.fused_projections and attn.to_qkv.fused_from == ("to_q", "to_k", "to_v")
    assert attn.to_qkv.out_features == 3 * attn.to_q.out_features
    assert attn.to_qkv.rank == attn.to_q.rank + attn.to_k.rank + attn.to_v.rank
    assert _close(_run(q), before)


def test_fused_members_hold_views_not_copies(q):
    q.fuse_qkv_projections()
    attn = q.transformer_blocks[0].attn
    base = attn.to_qkv.qweight.untyped_storage().data_ptr()
    for member in (attn.to_q, attn.to_k, attn.to_v):
        assert member.qweight.untyped_storage().data_ptr() == base
        assert member.wscales.untyped_storage().data_ptr() == attn.to_qkv.wscales.untyped_storage().data_ptr()


def test_unfuse_restores_the_members_exactly(q):
    attn = q.transformer_blocks[0].attn
    originals = {n: {k: v.clone() for k, v in getattr(attn, n).state_dict().items()} for n in ("to_q", "to_k", "to_v")}
    before = _run(q)
    q.fuse_qkv_projections()
    q.unfuse_qkv_projections()
    assert fusion.fused_modules(q) == [] and not attn.fused_projections and not hasattr(attn, "to_qkv")
    for n, state in originals.items():
        member = getattr(attn, n)
        assert isinstance(member, SVDQLinear) and member.fused_from == ()
        assert member.state_dict().keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(member.state_dict()[k], v), (n, k)
        assert member.qweight.untyped_storage().data_ptr() != 0
    assert torch.equal(_run(q), before)


def test_a_lora_loaded_while_fused_matches_the_unfused_model(dense, q):
    sd = peft_state_dict(random_factors(lora_targets(dense), rank=4))
    plain = quantize(dense)
    load_lora(plain, sd, adapter_name="a")
    q.fuse_qkv_projections()
    report = load_lora(q, sd, adapter_name="a")
    assert report.matched["transformer_blocks.0.attn.to_q"] == "transformer_blocks.0.attn.to_qkv"
    assert _close(_run(q), _run(plain))
    with pytest.raises(SVDQError, match="unload"):
        q.transformer_blocks[0].attn.unfuse_projections()
    unload_all(q)
    q.unfuse_qkv_projections()
    assert fusion.fused_modules(q) == []
    assert _close(_run(q), _run(quantize(dense)))


def test_members_with_a_lora_stay_separate_with_a_warning(dense, q):
    load_lora(q, peft_state_dict(random_factors(lora_targets(dense), rank=4)), adapter_name="a")
    with pytest.warns(UserWarning, match="LoRA is loaded"):
        q.fuse_qkv_projections()
    assert fusion.fused_modules(q) == []


def test_different_smoothing_stays_separate(q):
    attn = q.single_transformer_blocks[0].attn
    attn.to_k.smooth.mul_(2.0)
    before = _run(q)
    with pytest.warns(UserWarning, match="smoothing vectors differ"):
        q.fuse_qkv_projections()
    assert fusion.fused_modules(q) == FUSED[:2]  # the double block fused, the single one not
    assert _close(_run(q), before)


def test_saving_a_fused_model_is_refused(q, tmp_path):
    q.fuse_qkv_projections()
    with pytest.raises(SVDQError, match="unfuse_qkv_projections"):
        save_pretrained(q, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    q.unfuse_qkv_projections()
    save_pretrained(q, tmp_path / "m")


def test_split_of_a_fusion_is_the_members(q):
    attn = q.transformer_blocks[0].attn
    members = [attn.to_q, attn.to_k, attn.to_v]
    fused = fusion.fuse_layers(members, ("to_q", "to_k", "to_v"))
    x = torch.randn(5, attn.to_q.in_features)
    with torch.no_grad():
        assert _close(fused(x), torch.cat([m(x) for m in members], dim=-1))
    for member, back in zip(members, fusion.split_layer(fused)):
        for k, v in member.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


def test_fuse_layers_says_why_not(q):
    attn = q.transformer_blocks[0].attn
    with pytest.raises(UnsupportedError, match="in_features"):
        fusion.fuse_layers([attn.to_q, q.transformer_blocks[0].ff.net[2]], ("to_q", "ff"))
    with pytest.raises(UnsupportedError, match="two or more"):
        fusion.fuse_layers([attn.to_q], ("to_q",))
    attn.to_k.mode = "exact"
    with pytest.raises(UnsupportedError, match="mode"):
        fusion.fuse_layers([attn.to_q, attn.to_k], ("to_q", "to_k"))


def test_fusing_twice_and_unfusing_an_unfused_model_are_no_ops(q):
    before = _run(q)
    q.unfuse_qkv_projections()
    q.fuse_qkv_projections()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.fuse_qkv_projections()
    assert sorted(fusion.fused_modules(q)) == sorted(FUSED)
    assert _close(_run(q), before)


def test_a_fused_model_compiles_without_graph_breaks(q):
    q.fuse_qkv_projections()
    eager = _run(q)
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**flux_inputs(), return_dict=False)[0]
    assert _close(out, eager)


def test_models_marked_quantized_get_the_fusing_methods(dense):
    """Loaded (``from_pretrained`` / ``load_pretrained``) and converted models are marked with
    ``attach_quantizer``: that installs the fusing ``fuse_projections``."""
    from svdq_format.diffusers import attach_quantizer
    from svdq_format.model import model_metadata

    model = quantize(dense)
    with pytest.raises(AttributeError):  # diffusers' own fuse_projections reads .weight
        model.fuse_qkv_projections()
    model = quantize(dense)
    attach_quantizer(model, model_metadata(model))
    model.fuse_qkv_projections()
    assert sorted(fusion.fused_modules(model)) == sorted(FUSED)


def _storage_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def test_fusing_costs_only_the_block_diagonal_zeros(q):
    before = _storage_bytes(q)
    q.fuse_qkv_projections()
    zeros = 0
    for name in fusion.fused_modules(q):
        f = q.get_submodule(name)
        zeros += int((f.lora_up == 0).sum()) * f.lora_up.element_size()
    assert _storage_bytes(q) - before <= zeros
    q.unfuse_qkv_projections()
    assert _storage_bytes(q) == before


def _sd3(*, dense_key: bool = False):
    """A tiny SD3 (diffusers' legacy ``Attention``) with SVDQ q/k/v (one ``to_k`` left dense)."""
    from diffusers import SD3Transformer2DModel
    from torch import nn

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                              num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                              pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear) and "transformer_blocks." in name and mod.in_features % 64 == 0:
            if dense_key and name.endswith("attn.to_k"):
                continue
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, SVDQLinear.from_linear(mod, rank=8))
    gen = torch.Generator().manual_seed(1)
    x = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(1, 8, 64,
             generator=gen), pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([500.0]))
    return m, x


def test_sd3_legacy_attention_fuses_and_unfuses(tmp_path):
    """SD3's legacy ``Attention`` keeps its fused state in the model's processors, and diffusers'
    unfuse only swaps them back: the SVDQ projections fuse behind the fused processors, and the
    model's unfuse splits them back bit for bit (so the model saves again)."""

    def run(model):
        with torch.no_grad():
            return model(**x, return_dict=False)[0]

    m, x = _sd3()
    assert fusion.install(m) == 1
    processors = {k: type(v) for k, v in m.attn_processors.items()}
    y = run(m)
    m.fuse_qkv_projections()
    assert sorted(fusion.fused_modules(m)) == ["transformer_blocks.0.attn.to_added_qkv",
                                               "transformer_blocks.0.attn.to_qkv"]
    assert {type(p).__name__ for p in m.attn_processors.values()} == {"FusedJointAttnProcessor2_0"}
    assert _close(run(m), y)
    with pytest.raises(SVDQError, match="unfuse_qkv_projections"):
        save_pretrained(m, tmp_path / "fused")
    m.unfuse_qkv_projections()
    assert fusion.fused_modules(m) == [] and not hasattr(m.transformer_blocks[0].attn, "to_qkv")
    assert {k: type(v) for k, v in m.attn_processors.items()} == processors
    assert torch.equal(run(m), y)
    save_pretrained(m, tmp_path / "unfused")


def test_sd3_legacy_attention_with_a_dense_projection_refuses_with_the_reason():
    """Projections only partly SVDQ layers cannot fuse; the model would switch to fused processors
    next, so it is refused before that (diffusers' own fuse would fail on ``.weight``)."""
    m, x = _sd3(dense_key=True)
    fusion.install(m)
    processors = {k: type(v) for k, v in m.attn_processors.items()}
    with pytest.raises(UnsupportedError, match="not all SVDQ layers"):
        m.fuse_qkv_projections()
    assert {k: type(v) for k, v in m.attn_processors.items()} == processors


def test_members_sharing_one_lora_down_keep_it_shared(q):
    """Members with one ``lora_down`` (Nunchaku's fused q|k|v, split on import) fuse to rank r,
    not 3r: the native §10 form, ``lora_up`` rows stacked."""
    attn = q.transformer_blocks[0].attn
    members = [attn.to_q, attn.to_k, attn.to_v]
    for m in members[1:]:
        m._buffers["lora_down"] = attn.to_q.lora_down.clone()
    before = _run(q)
    q.fuse_qkv_projections()
    fused = attn.to_qkv
    assert fused.rank == attn.to_q.rank and fused.lora_up.shape == (3 * attn.to_q.out_features, attn.to_q.rank)
    assert _close(_run(q), before)
    q.unfuse_qkv_projections()
    assert all(m.rank == attn.to_q.rank for m in (attn.to_q, attn.to_k, attn.to_v))
    assert torch.equal(_run(q), before)


def test_partly_quantized_projections_stay_separate_with_a_warning(dense):
    model = quantize(dense)
    attn = model.single_transformer_blocks[0].attn
    attn.to_v = torch.nn.Linear(attn.to_v.in_features, attn.to_v.out_features)  # left dense
    assert fusion.install(model) == 1
    before = _run(model)
    with pytest.warns(UserWarning, match="not all SVDQ layers"):
        model.fuse_qkv_projections()
    assert sorted(fusion.fused_modules(model)) == sorted(FUSED[:2]) and not attn.fused_projections
    assert _close(_run(model), before)


def test_nvfp4_members_fuse_only_with_one_tensor_scale():
    torch.manual_seed(3)
    lins = [torch.nn.Linear(64, 32) for _ in range(3)]
    members = [SVDQLinear.from_linear(lin, rank=4, precision="nvfp4") for lin in lins]
    if not all(torch.equal(m.wtscale, members[0].wtscale) for m in members):
        with pytest.raises(UnsupportedError, match="tensor scales differ"):
            fusion.fuse_layers(members, ("to_q", "to_k", "to_v"))
        for m in members[1:]:
            m._buffers["wtscale"] = members[0].wtscale.clone()
    fused = fusion.fuse_layers(members, ("to_q", "to_k", "to_v"))
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert _close(fused(x), torch.cat([m(x) for m in members], dim=-1))
