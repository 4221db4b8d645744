"""diffusers integration and model directories: from_pretrained / save_pretrained / single file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

import svdq_format as sf
from svdq_format.errors import ManifestError, TensorError, UnsupportedError, VersionError
from svdq_format.model import INDEX_NAME, SINGLE_FILE_CONFIG_KEY, save_single_file, svdq_modules
from svdq_format.pretrained import load_pretrained
from svdq_format.spec import tensor_names
from tests.hub_helpers import run, tiny_flux, tiny_sd3

BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def quantized(request):
    model = BUILDERS[request.param]()
    return model, run(model)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("diffusion_pytorch_model*.safetensors"))


@pytest.mark.parametrize("max_shard_size", ["10GB", "30KB"], ids=["single", "sharded"])
def test_save_pretrained_from_pretrained_round_trip(quantized, tmp_path, max_shard_size):
    model, ref = quantized
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    files = shard_files(tmp_path)
    assert (len(files) > 1) == (max_shard_size == "30KB")
    assert (tmp_path / INDEX_NAME).is_file() == (len(files) > 1)
    meta = sf.validate(tmp_path)
    assert meta.layers == {n: m.spec for n, m in svdq_modules(model).items()}

    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.is_quantized and loaded.hf_quantizer.quantization_config.metadata.layers == meta.layers
    assert set(svdq_modules(loaded)) == set(meta.layers)
    assert_same_state(model, loaded)
    assert torch.equal(run(loaded), ref)


def test_shards_keep_layers_whole_and_carry_their_manifest(tmp_path):
    model = tiny_flux()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 5
    for name, layer in svdq_modules(model).items():
        keys = [k for role, k in tensor_names(name).items() if getattr(layer, role) is not None]
        assert len({weight_map[k] for k in keys}) == 1, name  # one layer, one shard
    for f in shard_files(tmp_path):
        meta = sf.read_metadata(f)
        with safe_open(f, "pt") as h:
            holders = {k.rpartition(".")[0] for k in h.keys() if k.endswith(".qweight")}
        assert set(meta.layers) == holders
        assert meta.extra["base_model"] == "tiny/base"


def test_single_file_round_trip(quantized, tmp_path):
    model, ref = quantized
    path = save_single_file(model, tmp_path / "model.safetensors")
    header = sf.io.read_header(path)
    assert json.loads(header.metadata[SINGLE_FILE_CONFIG_KEY])["_class_name"] == type(model).__name__
    sf.validate(path)
    loaded = load_pretrained(path)  # one call: config from the header
    assert type(loaded) is type(model)
    assert_same_state(model, loaded)
    assert torch.equal(run(loaded), ref)


def test_own_loader_and_resave(tmp_path):
    model = tiny_sd3()
    ref = run(model)
    model.save_pretrained(tmp_path / "a", max_shard_size="40KB")
    mine = load_pretrained(tmp_path / "a")
    assert_same_state(model, mine)
    assert torch.equal(run(mine), ref)
    mine.save_pretrained(tmp_path / "b", max_shard_size="40KB")  # the attached quantizer's save
    theirs = type(model).from_pretrained(tmp_path / "b")
    theirs.save_pretrained(tmp_path / "c", max_shard_size="40KB")
    for name in [p.name for p in shard_files(tmp_path / "a")]:
        assert st_load(tmp_path / "a" / name).keys() == st_load(tmp_path / "c" / name).keys()
    a, c = (json.loads((tmp_path / x / "config.json").read_text()) for x in "ac")
    assert a["quantization_config"]["layers"] == c["quantization_config"]["layers"]
    assert torch.equal(run(theirs), ref)


def test_resave_removes_stale_shards(tmp_path):
    model = tiny_flux()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert [p.name for p in shard_files(tmp_path)] == ["diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()
    sf.validate(tmp_path)


def _rewrite(path: Path, change) -> None:
    with safe_open(path, "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    change(tensors)
    st_save(tensors, path, metadata=meta)


def test_strict_missing_and_unexpected_tensors(tmp_path):
    model = tiny_flux()
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: t.pop("norm_out.linear.bias"))
    with pytest.raises(TensorError, match="norm_out.linear.bias: missing"):
        type(model).from_pretrained(tmp_path / "m")
    with pytest.raises(TensorError, match="norm_out.linear.bias: missing"):
        load_pretrained(tmp_path / "m")

    model.save_pretrained(tmp_path / "u")
    weights = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    _rewrite(weights, lambda t: t.__setitem__("extra.weight", torch.zeros(3)))
    with pytest.raises(TensorError, match="extra.weight: not a tensor of FluxTransformer2DModel"):
        type(model).from_pretrained(tmp_path / "u")
    with pytest.raises(TensorError, match="extra.weight"):
        load_pretrained(tmp_path / "u")


def test_manifest_disagreement_and_bad_dtype_raise(tmp_path):
    model = tiny_flux()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    dropped = sorted(cfg["quantization_config"]["layers"])[0]
    del cfg["quantization_config"]["layers"][dropped]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match=f"{dropped}: config.json manifest disagrees"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(ManifestError, match="disagrees"):
        load_pretrained(tmp_path)

    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VersionError, match="format_version 99"):
        type(model).from_pretrained(tmp_path)


def test_quantization_config_is_the_format_metadata(tmp_path):
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    from svdq_format.diffusers import SVDQuantConfig, SVDQuantizer

    model = tiny_flux()
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # a model without format-2 features is written as version 1, which every reader reads
    assert qc["quant_method"] == "svdquant" and qc["format_version"] == 1 and "features" not in qc
    config = DiffusersAutoQuantizer.from_dict(qc)
    assert isinstance(config, SVDQuantConfig) and config.to_dict() == qc
    assert isinstance(DiffusersAutoQuantizer.from_config(qc, pre_quantized=True), SVDQuantizer)
    assert SVDQuantConfig.from_dict(json.loads(config.to_json_string())) == config
    with pytest.raises(ManifestError, match="layout"):
        SVDQuantConfig(**{**qc, "layout": "tiled"})


def test_pipeline_takes_the_quantized_transformer(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    model = tiny_flux()
    ref = run(model)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.save_pretrained(tmp_path)
    sf.validate(tmp_path / "transformer")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    assert torch.equal(run(loaded), ref)


def test_whole_pipeline_saves_and_loads_with_its_quantized_transformer(tmp_path):
    """The publishing flow end to end: a text-to-image pipeline (tiny SD3, real tokenizers and text
    encoders) with its transformer quantized, ``pipe.save_pretrained``, ``DiffusionPipeline.from_pretrained``."""
    from diffusers import DiffusionPipeline

    from converters.quantize import capture_pipeline_inputs, quantize_model
    from converters.quantize.source import dtype_kwargs
    from tests.quantize_fixtures import tiny_sd3_pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path / "dense")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "dense")  # loaded, like the reloaded one below
    pipe.set_progress_bar_config(disable=True)
    calib = capture_pipeline_inputs(pipe, ["a red cat"], max_samples=2, num_inference_steps=2, output_type="latent")
    quantize_model(pipe.transformer, calib, rank=8, alphas=(0.5,))

    def latents(p):
        return p("a red cat", num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    ref = latents(pipe)
    pipe.save_pretrained(tmp_path / "quantized")
    sf.validate(tmp_path / "quantized" / "transformer")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "quantized")
    loaded.set_progress_bar_config(disable=True)
    assert set(svdq_modules(loaded.transformer)) == set(svdq_modules(pipe.transformer)) != set()
    assert torch.equal(latents(loaded), ref)  # the whole pipeline, bit for bit

    half = DiffusionPipeline.from_pretrained(tmp_path / "quantized", **dtype_kwargs(torch.bfloat16))
    half.set_progress_bar_config(disable=True)
    layer = half.transformer.transformer_blocks[0].attn.to_q
    assert layer.lora_up.dtype == torch.bfloat16 and layer.qweight.dtype == torch.uint8  # codes never cast
    assert bool(torch.isfinite(latents(half).float()).all())


def test_dequantize_gives_a_dense_model():
    model = tiny_flux()
    w_eff = {n: m.dequantize() for n, m in svdq_modules(model).items()}
    model.dequantize()
    assert not svdq_modules(model) and not getattr(model, "is_quantized", False)
    for name, w in w_eff.items():
        lin = model.get_submodule(name)
        assert isinstance(lin, torch.nn.Linear) and torch.equal(lin.weight, w)
    assert model.config.quantization_config is None


def test_explicit_torch_dtype_casts_compute_tensors_not_codes(tmp_path):
    from tests.hub_helpers import flux_inputs

    model = tiny_flux()  # float32 compute dtype, float16 int4 scales
    ref = run(model)
    model.save_pretrained(tmp_path / "a")
    loaded = type(model).from_pretrained(tmp_path / "a", torch_dtype=torch.bfloat16)
    assert loaded.x_embedder.weight.dtype == torch.bfloat16
    for name, layer in svdq_modules(loaded).items():
        src = svdq_modules(model)[name]
        assert layer.dtype == torch.bfloat16 and layer.smooth.dtype == torch.bfloat16
        assert torch.equal(layer.qweight, src.qweight) and torch.equal(layer.wscales, src.wscales)
        assert torch.equal(layer.lora_up, src.lora_up.to(torch.bfloat16))
    with torch.no_grad():
        out = loaded(**{k: v.to(torch.bfloat16) for k, v in flux_inputs().items()}).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.1
    loaded.save_pretrained(tmp_path / "b")
    assert {s.dtype for s in sf.validate(tmp_path / "b").layers.values()} == {"bfloat16"}
    with pytest.raises(UnsupportedError, match="torch_dtype torch.int8"):
        type(model).from_pretrained(tmp_path / "a", torch_dtype=torch.int8)


def test_load_pretrained_dtype_matches_diffusers_torch_dtype(tmp_path):
    model = tiny_sd3()
    model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16)
    theirs = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_state(ours, theirs)
    assert {m.dtype for m in svdq_modules(ours).values()} == {torch.bfloat16}
    with pytest.raises(UnsupportedError, match="dtype torch.int8"):
        load_pretrained(tmp_path, dtype=torch.int8)
