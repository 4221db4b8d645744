"""``svdq lora`` delta files, the converted-LoRA cache, and ``svdq extract-lora``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converters.lora import delta as lora_delta
from converters.lora import load_lora, unload_all, unload_lora
from svdq_format.cli import main
from svdq_format.errors import LoRAError
from svdq_format.linear import SVDQLinear
from svdq_format.model import save_model_dir
from svdq_format.pretrained import load_model_dir
from tests import lora_fixtures
from tests.lora_fixtures import (
    apply_dense,
    assert_deltas,
    effective_deltas,
    factors_expected,
    lora_targets,
    peft_state_dict,
    quantize,
    random_factors,
    same_tensors,
    snapshot,
    tiny_flux,
)

# the LoRA tests' shared pytest fixtures (tests/lora_fixtures.py)
isolated_cache = lora_fixtures.isolated_cache
models = lora_fixtures.models


@pytest.fixture(scope="module")
def base_dir(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    save_model_dir(models[1], d)
    return d


def _lora_file(dense, path, *, seed=2, rank=4):
    f = random_factors(lora_targets(dense), rank=rank, seed=seed)
    save_file(peft_state_dict(f), str(path))
    return f


def test_svdq_lora_writes_delta_that_loads_identically(models, base_dir, tmp_path, capsys):
    dense, _ = models
    f = _lora_file(dense, tmp_path / "l.safetensors")
    delta = tmp_path / "delta.safetensors"
    assert main(["lora", str(base_dir), str(tmp_path / "l.safetensors"), "--out", str(delta), "--name", "style"]) == 0
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(delta), framework="pt") as h:
        meta = json.loads(h.metadata()[lora_delta.DELTA_METADATA_KEY])
    assert meta["format_version"] == lora_delta.DELTA_FORMAT_VERSION
    assert meta["adapter"] == "style" and meta["sources"][0]["sha256"]

    fresh = load_model_dir(base_dir)
    base = copy.deepcopy(fresh)
    report = load_lora(fresh, delta, adapter_name="style")
    assert report.format == "delta" and report.cached
    assert_deltas(fresh, base, factors_expected(f))
    # the same tensors as converting the LoRA file directly
    direct = load_model_dir(base_dir)
    load_lora(direct, tmp_path / "l.safetensors", adapter_name="style", cache=False)
    assert same_tensors(snapshot(fresh), snapshot(direct))


def test_svdq_lora_composes_several_with_strengths(models, base_dir, tmp_path):
    dense, _ = models
    f1 = _lora_file(dense, tmp_path / "a.safetensors", seed=3)
    f2 = _lora_file(dense, tmp_path / "b.safetensors", seed=4)
    delta = tmp_path / "ab.safetensors"
    rc = main(["lora", str(base_dir), f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:-1",
               "--out", str(delta)])
    assert rc == 0
    model = load_model_dir(base_dir)
    base = copy.deepcopy(model)
    load_lora(model, delta)
    want = factors_expected(f1, 0.5)
    for n, w in factors_expected(f2, -1.0).items():
        want[n] = want[n] + w
    assert_deltas(model, base, want)


def test_delta_for_another_base_is_refused(models, base_dir, tmp_path, capsys):
    dense, _ = models
    _lora_file(dense, tmp_path / "l.safetensors")
    delta = tmp_path / "delta.safetensors"
    assert main(["lora", str(base_dir), str(tmp_path / "l.safetensors"), "--out", str(delta)]) == 0
    other = quantize(tiny_flux(seed=5))
    before = snapshot(other)
    with pytest.raises(LoRAError, match="converted for another base model"):
        load_lora(other, delta)
    assert same_tensors(snapshot(other), before)


def test_delta_newer_format_version_refused(models, tmp_path):
    dense, q = models
    path = tmp_path / "d.safetensors"
    meta = {"format_version": lora_delta.DELTA_FORMAT_VERSION + 1, "layers": {}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={lora_delta.DELTA_METADATA_KEY: json.dumps(meta)})
    with pytest.raises(LoRAError, match="format_version 2 is not supported"):
        load_lora(copy.deepcopy(q), path)


@pytest.mark.parametrize("raw, reason", [("{broken", r"not valid JSON \(Expecting .*\)"),
                                         ("[1, 2]", "not a JSON object")])
def test_delta_metadata_that_is_not_a_json_object_is_one_clear_error(tmp_path, raw, reason):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={lora_delta.DELTA_METADATA_KEY: raw})
    with pytest.raises(LoRAError, match=f"d.safetensors: {lora_delta.DELTA_METADATA_KEY}: {reason}$"):
        lora_delta.is_delta_file(path)


def test_cli_error_is_one_line(base_dir, tmp_path, capsys):
    (tmp_path / "l.bin").write_bytes(b"junk")
    assert main(["lora", str(base_dir), str(tmp_path / "l.bin"), "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pickle" in err and err.count("\n") == 1


def test_second_load_comes_from_the_cache(models, tmp_path):
    dense, qbase = models
    q = copy.deepcopy(qbase)
    _lora_file(dense, tmp_path / "l.safetensors")
    first = load_lora(q, tmp_path / "l.safetensors", adapter_name="a")
    assert not first.cached
    after_first = snapshot(q)
    cached = sorted(lora_delta.cache_dir().glob("*.safetensors"))
    assert len(cached) == 1
    unload_all(q)
    second = load_lora(q, tmp_path / "l.safetensors", adapter_name="a")
    assert second.cached and sorted(second.matched) == sorted(first.matched)
    assert same_tensors(snapshot(q), after_first)
    # another base model gets its own cache entry
    other = quantize(tiny_flux(seed=6))
    assert not load_lora(other, tmp_path / "l.safetensors", adapter_name="a").cached
    assert len(list(lora_delta.cache_dir().glob("*.safetensors"))) == 2


def test_extract_lora_recovers_low_rank_difference(models, tmp_path, capsys):
    dense, _ = models
    targets = {k: v for k, v in lora_targets(dense).items() if "transformer_blocks.0" in k}
    f = random_factors(targets, rank=4, seed=8)
    tuned = apply_dense(dense, f)
    with torch.no_grad():
        tuned.transformer_blocks[0].attn.to_q.bias.add_(0.01)  # not expressible as a LoRA
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "extracted.safetensors"
    assert main(["extract-lora", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                 "--rank", "4", "--out", str(out), "--dtype", "float32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(rep["layers"]) == sorted(targets)
    assert min(rep["layers"].values()) > 1 - 1e-6
    assert rep["not_captured"] == ["transformer_blocks.0.attn.to_q.bias"]
    # the extracted LoRA, loaded onto the dense base, reproduces the tuned weights
    model = copy.deepcopy(dense)
    load_lora(model, out, adapter_name="x", cache=False)
    got = effective_deltas(model, dense)
    for n, w in factors_expected(f).items():
        assert (got[n] - w).abs().max() <= 1e-5 * w.abs().max()

    # a lower rank captures exactly the top singular values' share of the energy
    out2 = tmp_path / "r2.safetensors"
    assert main(["extract-lora", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                 "--rank", "2", "--out", str(out2), "--json", "--exact"]) == 0
    rep2 = json.loads(capsys.readouterr().out)
    name = "transformer_blocks.0.attn.to_k"
    s = torch.linalg.svdvals(f[name][1].double() @ f[name][0].double())
    assert rep2["layers"][name] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-4)


def test_svdq_lora_quantized_layers_only_change_low_rank_branch(models, base_dir, tmp_path):
    dense, _ = models
    _lora_file(dense, tmp_path / "l.safetensors")
    model = load_model_dir(base_dir)
    codes = {n: m.qweight for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    load_lora(model, tmp_path / "l.safetensors")
    assert all(m.qweight is codes[n] for n, m in model.named_modules() if isinstance(m, SVDQLinear))


def test_cached_reload_maps_ready_made_branches_and_mixes_correctly(models, tmp_path):
    dense, qbase = models
    q = copy.deepcopy(qbase)
    f1 = _lora_file(dense, tmp_path / "a.safetensors", seed=21)
    f2 = random_factors({k: v for k, v in lora_targets(dense).items() if "single" in k}, rank=4, seed=22)
    load_lora(q, tmp_path / "a.safetensors", adapter_name="a")
    unload_all(q)
    assert load_lora(q, tmp_path / "a.safetensors", adapter_name="a", strength=0.5).cached
    layer = q.single_transformer_blocks[0].attn.to_q
    # served straight from the cache file's mapping ([own branch ++ LoRA] stored ready-made)
    assert not layer.lora_down.untyped_storage().resizable()
    assert_deltas(q, qbase, factors_expected(f1, 0.5))
    load_lora(q, peft_state_dict(f2), adapter_name="b")  # now concatenated in memory
    assert layer.lora_down.untyped_storage().resizable()
    both = factors_expected(f1, 0.5)
    for n, w in factors_expected(f2).items():
        both[n] = both[n] + w
    assert_deltas(q, qbase, both)
    unload_lora(q, "b")
    assert_deltas(q, qbase, factors_expected(f1, 0.5))
    unload_all(q)
    assert same_tensors(snapshot(q), snapshot(qbase))


def test_damaged_cache_entry_is_a_miss(models, tmp_path):
    dense, qbase = models
    q = copy.deepcopy(qbase)
    f = _lora_file(dense, tmp_path / "l.safetensors", seed=31)
    load_lora(q, tmp_path / "l.safetensors", adapter_name="a")
    unload_all(q)
    (entry,) = lora_delta.cache_dir().glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    report = load_lora(q, tmp_path / "l.safetensors", adapter_name="a")
    assert not report.cached
    assert_deltas(q, qbase, factors_expected(f))
