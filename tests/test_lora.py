"""LoRA on SVDQuant models: every key format lands on exactly the expected layers with the
expected ΔW, quantized+LoRA tracks dense+LoRA, strengths, multi-adapter, bit-identical unload,
strict reports and bad input (model unchanged)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from converters.lora import list_loras, load_lora, set_lora_strengths, unload_all, unload_lora
from svdq_format.errors import LoRAError
from svdq_format.linear import SVDQLinear
from tests import lora_fixtures
from tests.lora_fixtures import (
    INNER,
    apply_dense,
    assert_deltas,
    factors_expected,
    flux_inputs,
    kohya_lora,
    lora_targets,
    peft_state_dict,
    quantize,
    random_factors,
    same_tensors,
    snapshot,
    tiny_flux,
    xlabs_lora,
)

# the LoRA tests' shared pytest fixtures (tests/lora_fixtures.py)
isolated_cache = lora_fixtures.isolated_cache


@pytest.fixture(scope="module")
def dense():
    return tiny_flux()


@pytest.fixture(scope="module")
def qbase(dense):
    return quantize(dense)


@pytest.fixture
def q(qbase):
    return copy.deepcopy(qbase)


# --------------------------------------------------------------------------- formats


def test_diffusers_file_with_metadata_scale(dense, q, qbase, tmp_path):
    f = random_factors(lora_targets(dense), rank=4)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.target_modules": sorted(f)}
    save_file(peft_state_dict(f), str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    report = load_lora(q, path, adapter_name="a")
    assert report.format == "diffusers" and not report.unmatched
    assert sorted(report.matched) == sorted(f)
    assert_deltas(q, qbase, factors_expected(f, 8 / 4))


def test_peft_directory_rslora_and_alpha_pattern(dense, q, qbase, tmp_path):
    f = random_factors(lora_targets(dense), rank=4)
    d = tmp_path / "adapter"
    d.mkdir()
    save_file(peft_state_dict(f, prefix="base_model.model."), str(d / "adapter_model.safetensors"))
    special = "transformer_blocks.0.attn.to_q"
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "use_rslora": True, "alpha_pattern": {special: 2},
           "target_modules": sorted(f)}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    report = load_lora(q, d, adapter_name="a")
    assert report.format == "peft" and len(report.layers) == len(f)
    scales = {n: (2 if n == special else 6) / math.sqrt(4) for n in f}
    expected = {n: scales[n] * w for n, w in factors_expected(f).items()}
    assert_deltas(q, qbase, expected)


def test_diffusers_network_alpha_keys(dense, q, qbase):
    f = random_factors(lora_targets(dense), rank=4)
    sd = peft_state_dict(f)
    for n in f:
        sd[f"transformer.{n}.alpha"] = torch.tensor(1.0)
    load_lora(q, sd, adapter_name="a")
    assert_deltas(q, qbase, factors_expected(f, 1 / 4))


@pytest.mark.parametrize("flavour", ["kohya", "comfyui"])
def test_kohya_and_comfyui_keys(dense, q, qbase, flavour):
    kw = {} if flavour == "kohya" else {"prefix": "diffusion_model.", "sep": "."}
    sd, expected = kohya_lora(dense, **kw)
    report = load_lora(q, sd, adapter_name="k")
    assert report.format == flavour and not report.unmatched
    assert_deltas(q, qbase, expected)
    # the embedders stay 16-bit: plain additive branch, weights untouched
    assert isinstance(q.x_embedder, torch.nn.Linear)
    assert torch.equal(q.x_embedder.weight, qbase.x_embedder.weight)


def test_xlabs_keys_and_narrow_lora_a_padding(dense, q, qbase):
    sd, expected = xlabs_lora()
    report = load_lora(q, sd, adapter_name="x")
    assert report.format == "xlabs"
    assert_deltas(q, qbase, expected)


def test_lycoris_locon_plain_low_rank_loads(dense, q, qbase):
    # LyCORIS LoCon on linears uses exactly the kohya key scheme (lora_down/lora_up/alpha)
    sd, expected = kohya_lora(dense, rank=8, alpha=8.0, seed=9)
    load_lora(q, sd, adapter_name="locon")
    assert_deltas(q, qbase, expected)


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_double_blocks_0_img_attn_proj.dora_scale", "DoRA"),
    ("lora_unet_double_blocks_0_img_attn_proj.lokr_w1", "LoKr"),
    ("lora_unet_double_blocks_0_img_attn_proj.hada_w1_a", "LoHa"),
])
def test_unsupported_adapter_types_raise(dense, q, qbase, key, kind):
    sd, _ = kohya_lora(dense)
    sd[key] = torch.ones(4, INNER)
    with pytest.raises(LoRAError, match=f"unsupported adapter type .*{kind}"):
        load_lora(q, sd, adapter_name="u")
    assert same_tensors(snapshot(q), snapshot(qbase)) and not list_loras(q)


def test_peft_use_dora_config_refused(dense, q, tmp_path):
    f = random_factors(lora_targets(dense), rank=4)
    path = tmp_path / "l.safetensors"
    save_file(peft_state_dict(f), str(path), metadata={"lora_adapter_metadata": json.dumps({"r": 4, "use_dora": True})})
    with pytest.raises(LoRAError, match="DoRA"):
        load_lora(q, path)


# --------------------------------------------------------------------------- fused q|k|v


@pytest.mark.parametrize("shared_a", [True, False])
def test_fused_qkv_shared_a_or_block_diagonal(dense, shared_a):
    qf = quantize(dense, fuse_qkv=True)
    base = copy.deepcopy(qf)
    if shared_a:
        sd, expected = kohya_lora(dense)  # kohya qkv: one A, B split by rows
    else:
        f = random_factors(lora_targets(dense), rank=4)
        sd, expected = peft_state_dict(f), factors_expected(f)
    report = load_lora(qf, sd, adapter_name="f")
    members = [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    assert all(report.matched[m] == "transformer_blocks.0.attn.to_qkv" for m in members)
    fused = qf.transformer_blocks[0].attn.to_qkv
    base_rank = base.transformer_blocks[0].attn.to_qkv.rank
    added = fused.lora_down.shape[0] - base_rank
    assert added == (16 if shared_a else 16)  # rank 4 (shared) / 12 (block-diag), padded to 16
    nonzero = int((fused.lora_scales[base_rank:] != 0).sum())
    assert nonzero == (4 if shared_a else 12)
    want = {k: v for k, v in expected.items() if k not in members}
    want["transformer_blocks.0.attn.to_qkv"] = torch.cat([expected[m] for m in members])
    assert_deltas(qf, base, want)


# --------------------------------------------------------------------------- accuracy


def test_quantized_plus_lora_tracks_dense_plus_lora(dense, q):
    inp = flux_inputs()
    f = random_factors(lora_targets(dense), rank=8, scale=0.05)
    with torch.no_grad():
        y_dense = dense(**inp).sample
        quant_err = (q(**inp).sample - y_dense).norm().item()
        load_lora(q, peft_state_dict(f), adapter_name="a")
        y_dense_lora = apply_dense(dense, f)(**inp).sample
        lora_err = (q(**inp).sample - y_dense_lora).norm().item()
    effect = (y_dense_lora - y_dense).norm().item()
    assert effect > 5 * quant_err  # the LoRA visibly changes the output
    assert lora_err <= quant_err, (lora_err, quant_err)


def test_per_layer_error_unchanged_by_lora(dense, q, qbase):
    f = random_factors(lora_targets(dense), rank=8, scale=0.05)
    load_lora(q, peft_state_dict(f), adapter_name="a")
    x = torch.randn(32, INNER)
    for name, layer in q.named_modules():
        if not isinstance(layer, SVDQLinear) or layer.in_features != INNER:
            continue
        lin, qb = dense.get_submodule(name), qbase.get_submodule(name)
        a, b = f[name]
        with torch.no_grad():
            ref = lin(x) + x @ a.T @ b.T
            err_lora = (layer(x) - ref).norm()
            err_base = (qb(x) - lin(x)).norm()
        assert abs(err_lora - err_base) <= 1e-4 * err_base + 1e-6, name


# --------------------------------------------------------------------------- strengths


def test_strength_zero_one_and_change(dense, q, qbase):
    f = random_factors(lora_targets(dense), rank=4)
    sd = peft_state_dict(f)
    inp = flux_inputs()
    with torch.no_grad():
        y_base = qbase(**inp).sample
    load_lora(q, sd, adapter_name="a", strength=0.0)
    with torch.no_grad():
        assert torch.equal(q(**inp).sample, y_base)
    downs = {n: m.lora_down for n, m in q.named_modules() if isinstance(m, SVDQLinear)}
    set_lora_strengths(q, {"a": 1.0})
    assert_deltas(q, qbase, factors_expected(f))
    set_lora_strengths(q, {"a": 0.35})
    assert_deltas(q, qbase, factors_expected(f, 0.35))
    # a strength change rewrites only lora_scales: the concatenated factors are the same objects
    assert all(m.lora_down is downs[n] for n, m in q.named_modules() if isinstance(m, SVDQLinear))
    base_rank = qbase.transformer_blocks[0].attn.to_q.rank
    scales = q.transformer_blocks[0].attn.to_q.lora_scales
    assert torch.equal(scales[:base_rank], torch.ones(base_rank))  # own SVD ranks keep scale 1
    assert list_loras(q) == {"a": 0.35}


def test_two_adapters_compose_and_unload_one(dense, q, qbase):
    f1 = random_factors(lora_targets(dense), rank=4, seed=11)
    f2 = random_factors({k: v for k, v in lora_targets(dense).items() if "single" in k}, rank=8, seed=12)
    snap = snapshot(qbase)
    load_lora(q, peft_state_dict(f1), adapter_name="one", strength=0.5)
    load_lora(q, peft_state_dict(f2), adapter_name="two", strength=2.0)
    both = factors_expected(f1, 0.5)
    for n, w in factors_expected(f2, 2.0).items():
        both[n] = both.get(n, 0) + w
    assert_deltas(q, qbase, both)
    set_lora_strengths(q, {"one": 0.0})
    assert_deltas(q, qbase, factors_expected(f2, 2.0))
    unload_lora(q, "two")
    set_lora_strengths(q, {"one": 1.0})
    assert_deltas(q, qbase, factors_expected(f1))
    unload_lora(q, "one")
    assert same_tensors(snapshot(q), snap)


def test_unload_all_restores_bit_identical_and_forward(dense, q, qbase):
    inp = flux_inputs()
    snap = snapshot(qbase)
    with torch.no_grad():
        y = qbase(**inp).sample
    sd, _ = kohya_lora(dense)
    load_lora(q, sd, adapter_name="a")
    load_lora(q, peft_state_dict(random_factors(lora_targets(dense))), adapter_name="b")
    unload_all(q)
    assert same_tensors(snapshot(q), snap)
    assert all(m.lora_scales is None for m in q.modules() if isinstance(m, SVDQLinear))
    assert not q.x_embedder._forward_hooks
    with torch.no_grad():
        assert torch.equal(q(**inp).sample, y)
    assert not list_loras(q)


def test_duplicate_adapter_name_refused(dense, q):
    sd = peft_state_dict(random_factors(lora_targets(dense)))
    load_lora(q, sd, adapter_name="a")
    with pytest.raises(LoRAError, match="already loaded"):
        load_lora(q, sd, adapter_name="a")


# --------------------------------------------------------------------------- strict report / bad input


def test_lora_for_another_model_raises_with_key_report(q, qbase):
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 320, generator=g),
          "transformer.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 4, generator=g)}
    with pytest.raises(LoRAError, match=r"no LoRA key matched.*down_blocks\.0\.attentions\.0\.proj_in"):
        load_lora(q, sd, strict=False)
    assert same_tensors(snapshot(q), snapshot(qbase))


def test_unmatched_keys_strict_and_non_strict(dense, q, qbase):
    f = random_factors(lora_targets(dense), rank=4)
    sd = peft_state_dict(f)
    sd["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, INNER)
    sd["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(INNER, 4)
    with pytest.raises(LoRAError, match=r"unmatched LoRA keys.*transformer_blocks\.7\.attn\.to_q"):
        load_lora(q, sd, adapter_name="a")
    assert same_tensors(snapshot(q), snapshot(qbase))
    report = load_lora(q, sd, adapter_name="a", strict=False)
    assert report.unmatched == ["transformer_blocks.7.attn.to_q"]
    assert_deltas(q, qbase, factors_expected(f))


def test_nonzero_full_diff_keys_are_reported_not_dropped(dense, q):
    sd, _ = kohya_lora(dense)
    sd["lora_unet_double_blocks_0_img_attn_norm_query_norm.diff"] = torch.ones(16)
    with pytest.raises(LoRAError, match=r"unmatched.*query_norm\.diff"):
        load_lora(q, sd)


def _bad_cases(dense, tmp_path):
    f = random_factors(lora_targets(dense), rank=4)
    good = peft_state_dict(f)
    name = "transformer.transformer_blocks.0.attn.to_k"
    cases = {}
    sd = dict(good)
    sd[f"{name}.lora_B.weight"] = torch.randn(INNER, 3)
    cases["rank mismatch"] = (sd, "rank mismatch")
    sd = dict(good)
    sd[f"{name}.lora_A.weight"] = torch.full((4, INNER), float("nan"))
    cases["nan"] = (sd, "NaN")
    sd = dict(good)
    sd[f"{name}.lora_A.weight"] = torch.ones(4, INNER, dtype=torch.int32)
    cases["int dtype"] = (sd, "not a float type")
    sd = dict(good)
    sd[f"{name}.lora_A.weight"] = torch.ones(4, INNER + 64)
    cases["wrong shape"] = (sd, "the layer is")
    path = tmp_path / "good.safetensors"
    save_file(good, str(path))
    data = path.read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    cases["truncated"] = (trunc, "cannot read safetensors")
    pkl = tmp_path / "lora.bin"
    pkl.write_bytes(b"\x80\x04junk")
    cases["pickle"] = (pkl, "pickle")
    cases["missing"] = (tmp_path / "nope.safetensors", "no such file")
    return cases


@pytest.mark.parametrize("case", ["rank mismatch", "nan", "int dtype", "wrong shape", "truncated", "pickle", "missing"])
def test_bad_input_one_line_error_model_unchanged(dense, q, qbase, tmp_path, case):
    load_lora(q, peft_state_dict(random_factors(lora_targets(dense), seed=5)), adapter_name="keep")
    before = snapshot(q)
    source, pattern = _bad_cases(dense, tmp_path)[case]
    with pytest.raises(LoRAError, match=pattern) as info:
        load_lora(q, source, adapter_name="bad")
    assert "\n" not in str(info.value)
    assert same_tensors(snapshot(q), before)
    assert list(list_loras(q)) == ["keep"]


def test_mixture_keys(dense, q, qbase):
    # civitai "mixture" naming: lora_transformer_<diffusers path with _>, alpha required
    # diffusers' mixture converter maps the attention linears of the blocks
    f = random_factors({k: v for k, v in lora_targets(dense).items() if "_blocks.0.attn." in k}, rank=4, seed=13)

    def mixture(factors):
        sd = {}
        for n, (a, b) in factors.items():
            key = "lora_transformer_" + n.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
            sd[f"{key}.alpha"] = torch.tensor(2.0)
        return sd

    report = load_lora(q, mixture(f), adapter_name="m")
    assert report.format == "mixture" and not report.unmatched and len(report.layers) == len(f)
    assert_deltas(q, qbase, factors_expected(f, 2.0 / 4))
    # ... and collapses ff keys onto the bare block name: reported, never silently merged
    ff = random_factors({"transformer_blocks.0.ff.net.2": (INNER, 4 * INNER)}, rank=4, seed=14)
    with pytest.raises(LoRAError, match=r"unmatched LoRA keys.*transformer_blocks\.0\b"):
        load_lora(q, mixture({**f, **ff}), adapter_name="m2")


def test_lora_bias_and_strength_on_svdq_and_16bit_layers(dense, q, qbase):
    f = random_factors({"transformer_blocks.0.attn.to_k": (INNER, INNER), "x_embedder": (INNER, 16)}, rank=4)
    sd = peft_state_dict(f)
    g = torch.Generator().manual_seed(3)
    biases = {n: torch.randn(o, generator=g) * 0.1 for n, (o, _) in
              {"transformer_blocks.0.attn.to_k": (INNER, INNER), "x_embedder": (INNER, 16)}.items()}
    for n, b in biases.items():
        sd[f"transformer.{n}.lora_B.bias"] = b
    load_lora(q, sd, adapter_name="b", strength=0.5)
    for n, (a, b) in f.items():
        mod, ref = q.get_submodule(n), qbase.get_submodule(n)
        x = torch.randn(3, mod.in_features)
        with torch.no_grad():
            got = mod(x) - ref(x)
        want = 0.5 * (x @ a.T @ b.T + biases[n])
        assert torch.allclose(got, want, atol=1e-5), n
    bias_obj = qbase.transformer_blocks[0].attn.to_k.bias
    unload_all(q)
    assert torch.equal(q.transformer_blocks[0].attn.to_k.bias, bias_obj)
    assert same_tensors(snapshot(q), snapshot(qbase))


def test_whole_parameter_swaps_restore_the_original_object(q, qbase):
    from svdq_format.lora import LoraAdapter, attach_lora, plan_lora

    norm = q.transformer_blocks[0].attn.norm_q
    original = norm.weight.data
    new = torch.full_like(original, 2.0)
    plan = plan_lora(q, LoraAdapter("ctl", {}, params={"transformer_blocks.0.attn.norm_q.weight": new}))
    assert plan.matched == {"transformer_blocks.0.attn.norm_q.weight": "transformer_blocks.0.attn.norm_q.weight"}
    attach_lora(q, plan)
    assert torch.equal(norm.weight, new)
    unload_all(q)
    assert norm.weight.data_ptr() == original.data_ptr() and torch.equal(norm.weight, original)


def test_hub_source_failure_is_one_line(q, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoRAError, match=r"^someone/not-a-cached-lora: cannot download from the Hub") as info:
        load_lora(q, "someone/not-a-cached-lora")
    assert "\n" not in str(info.value)


@pytest.mark.gpu
def test_lora_on_a_cuda_model_matches_cpu(dense, qbase):
    """Factors are validated and concatenated on the device; the result equals the CPU one (both
    in the exact mode: ``auto`` would pick an FP8 mode on a Hopper GPU)."""
    from svdq_format.model import set_mode

    factors = random_factors(lora_targets(dense), rank=4)
    sd = peft_state_dict(factors)
    cpu = copy.deepcopy(qbase)
    gpu = copy.deepcopy(qbase).to("cuda")
    set_mode(gpu, "exact")
    load_lora(cpu, sd, adapter_name="a", strength=0.7, cache=False)
    load_lora(gpu, sd, adapter_name="a", strength=0.7, cache=False)
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        assert torch.equal(a, b.cpu()), name
    inputs = flux_inputs()
    with torch.no_grad():
        y_cpu = cpu(**inputs).sample
        y_gpu = gpu(**{k: v.cuda() for k, v in inputs.items()}).sample.cpu()
    assert ((y_gpu - y_cpu).norm() / y_cpu.norm()) < 1e-3
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    before = snapshot(gpu)
    with pytest.raises(LoRAError, match="NaN"):
        load_lora(gpu, bad, adapter_name="b", cache=False)
    assert same_tensors(snapshot(gpu), before)


def test_batched_finite_check_names_the_bad_tensor_and_tolerates_huge_finite_values():
    from svdq_format.lora.checks import check_finite_batch

    huge = torch.full((64, 64), 1e30)  # 2-norm overflows fp32: must not be reported as inf
    good = torch.randn(8, 8, dtype=torch.bfloat16)
    check_finite_batch([("a", huge), ("b", good)])
    bad = good.clone()
    bad[3, 5] = float("inf")
    with pytest.raises(LoRAError, match=r"^t: layer\.x: lora_B contains NaN or inf$"):
        check_finite_batch([("a", huge), ("t: layer.x: lora_B", bad), ("b", good)])


@pytest.mark.gpu
def test_lora_file_and_cache_read_onto_the_gpu_match_cpu(dense, qbase, tmp_path, monkeypatch):
    """A file source is read straight onto the model's GPU; the cached delta comes back on the
    GPU too (ready-made branches, no copies) and both equal the CPU result."""
    monkeypatch.setenv("SVDQ_CACHE", str(tmp_path / "cache"))
    factors = random_factors(lora_targets(dense), rank=4)
    path = tmp_path / "lora.safetensors"
    save_file(peft_state_dict(factors), str(path))
    cpu = copy.deepcopy(qbase)
    gpu = copy.deepcopy(qbase).to("cuda")
    load_lora(cpu, path, adapter_name="a", strength=0.7)
    load_lora(gpu, path, adapter_name="a", strength=0.7)
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        assert torch.equal(a, b.cpu()), name
    unload_all(gpu)
    report = load_lora(gpu, path, adapter_name="a", strength=0.7)
    assert report.cached
    layer = next(m for m in gpu.modules() if isinstance(m, SVDQLinear) and m.lora_down.shape[0] > 16)
    assert layer.lora_down.is_cuda
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        assert torch.equal(a, b.cpu()), name
