"""Block-by-block calibration and the checkpoint assembled from the per-block files: the same
statistics and the same checkpoint bytes as the whole-model paths."""

from __future__ import annotations

import copy

import pytest
import torch

from converters.quantize import QuantizeOptions
from converters.quantize.blockwise import blockwise_supported, collect_stats_blockwise
from converters.quantize.calibration import synthetic_calibration
from converters.quantize.selection import select_layers
from converters.quantize.stats import collect_stats
from tests.quantize_fixtures import tiny_flux as shared_tiny_flux

pytestmark = [pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def tiny_flux(dtype=torch.float32, double=2, single=2):
    return shared_tiny_flux(double, single).to(dtype).eval()


def _linears(model, **kw):
    sel = select_layers(model, **kw)
    return {n: model.get_submodule(n) for n in sel.kinds}


def _assert_same_stats(a, b):
    assert a.groups == b.groups and a.samples == b.samples
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert x.count == y.count and x.minval == y.minval, name
        for f in ("absmax", "rows", "keys"):
            tx, ty = getattr(x, f), getattr(y, f)
            assert tx.dtype == ty.dtype and torch.equal(tx.view(torch.uint8), ty.view(torch.uint8)), (name, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_blockwise_statistics_equal_the_whole_model_pass_bit_for_bit(dtype, shard):
    model = tiny_flux(dtype)
    samples = synthetic_calibration(model, 3, seed=1, image_tokens=16, text_tokens=8, warn=False).samples
    linears = _linears(model, include=("proj_out",))  # a layer after the blocks too
    assert blockwise_supported(model, samples)
    ref = collect_stats(model, linears, samples, max_rows=20, seed=3, device="cpu", shard=shard)
    offloaded = copy.deepcopy(model)  # blocks placed one at a time, counted
    placed = []
    got = collect_stats_blockwise(offloaded, _linears(offloaded, include=("proj_out",)), samples, max_rows=20, seed=3,
                                  device="cpu", load_block=lambda b, n: placed.append(n),
                                  drop_block=lambda b: None, shard=shard)
    assert placed == ([f"transformer_blocks.{i}" for i in range(2)]
                      + [f"single_transformer_blocks.{i}" for i in range(2)])
    _assert_same_stats(ref, got)
    assert "proj_out" in got.layers and "norm_out.linear" in got.layers


def test_sd3_blockwise_statistics_are_identical_too():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()
    samples = synthetic_calibration(sd3, 2, seed=1, image_tokens=16, text_tokens=8, warn=False).samples
    assert blockwise_supported(sd3, samples)
    ref = collect_stats(sd3, _linears(sd3), samples, max_rows=20, seed=3, device="cpu")
    got = collect_stats_blockwise(sd3, _linears(sd3), samples, max_rows=20, seed=3, device="cpu",
                                  load_block=lambda b, n: None, drop_block=lambda b: None)
    _assert_same_stats(ref, got)
    assert not blockwise_supported(sd3, [{"skip_layers": [1]}])


def test_unknown_wiring_falls_back():
    from diffusers import PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                      num_layers=1, cross_attention_dim=64, sample_size=8, caption_channels=32)
    assert not blockwise_supported(pixart, [{}])
    flux = tiny_flux()
    assert not blockwise_supported(flux, [{"controlnet_block_samples": [torch.zeros(1)]}])
    assert not blockwise_supported(flux, [{"joint_attention_kwargs": {"scale": 1.0}}])


# --------------------------------------------------------------------------- streaming writer


def test_streaming_writer_gives_the_bytes_of_save_file(tmp_path):
    from svdq_format.io import save_file
    from svdq_format.linear import SVDQLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    layers = {"blk.0.q": SVDQLinear.from_linear(lin, rank=4), "a.é": SVDQLinear.from_linear(lin, rank=8,
                                                                                          precision="nvfp4")}
    extra = {"z.w": torch.randn(3, 5, generator=g).bfloat16(), "b.i": torch.arange(7), "c.e": torch.zeros(0, 2),
             "d.u": torch.randint(0, 255, (9,), dtype=torch.uint8), "e.h": torch.randn(4, generator=g).half()}
    meta = {"note": 'ü "quoted" \\ \n tab\t', "k": [1, 2]}
    save_file(layers, tmp_path / "ref.safetensors", metadata=meta, extra_tensors=extra,
              header_metadata={"config": '{"x": 1}'})
    from svdq_format.io import layer_state

    real = {k: t for n, lay in layers.items() for k, t in layer_state(n, lay).items()} | extra
    read: list[str] = []

    def reader(key):
        read.append(key)
        return real[key].clone()

    meta_layers = {n: SVDQLinear.from_spec(lay.spec, device="meta") for n, lay in layers.items()}
    meta_extra = {k: (t.to("meta") if k != "b.i" else t) for k, t in extra.items()}
    save_file(meta_layers, tmp_path / "stream.safetensors", metadata=meta, extra_tensors=meta_extra,
              header_metadata={"config": '{"x": 1}'}, read_tensor=reader)
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(read) == sorted(k for k in real if k != "b.i")  # every meta tensor read once
    save_file(layers, tmp_path / "s2.safetensors", metadata=meta, extra_tensors=extra,
              header_metadata={"config": '{"x": 1}'}, streaming=True)  # all at hand, written one by one
    assert (tmp_path / "s2.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    from svdq_format.errors import TensorError

    with pytest.raises(TensorError, match="z.w: read float32"):
        save_file(meta_layers, tmp_path / "bad.safetensors", extra_tensors=meta_extra,
                  read_tensor=lambda k: real[k].float() if k == "z.w" else real[k])
    assert not (tmp_path / "bad.safetensors").exists()  # atomic: nothing left behind
    with pytest.raises(TensorError, match="meta device"):
        save_file(meta_layers, tmp_path / "bad.safetensors")


def test_save_pretrained_from_meta_layers_and_a_reader_is_byte_identical(tmp_path):
    from svdq_format.io import layer_state
    from svdq_format.linear import SVDQLinear
    from svdq_format.model import save_pretrained, svdq_modules

    model = tiny_flux(double=1, single=1)
    sel = select_layers(model)
    for name in list(sel.kinds)[:6]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SVDQLinear.from_linear(model.get_submodule(name), rank=4))
    save_pretrained(model, tmp_path / "ref", max_shard_size="40KB")
    real = {k: t for n, lay in svdq_modules(model).items() for k, t in layer_state(n, lay).items()}
    for name, lay in svdq_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SVDQLinear.from_spec(lay.spec, device="meta"))
    save_pretrained(model, tmp_path / "stream", max_shard_size="40KB", read_tensor=lambda k: real[k])
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len(ref) > 4 and ref == sorted(p.name for p in (tmp_path / "stream").iterdir())
    for name in ref:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name


# --------------------------------------------------------------------------- --offload disk end to end


def test_disk_run_releases_layers_and_writes_the_same_shards_and_resumes(tmp_path):
    from converters.quantize.directory import quantize_directory
    from svdq_format.linear import SVDQLinear
    from svdq_format.model import svdq_modules

    tiny_flux(double=2, single=2).save_pretrained(tmp_path / "src", max_shard_size="50KB")
    opts = QuantizeOptions(rank=8, alphas=(0.5,))
    kw = dict(num_samples=2, options=opts, dtype="float32", device="cpu", progress=False, max_shard_size="60KB")
    ref = quantize_directory(tmp_path / "src", tmp_path / "full", offload="none", **kw)
    assert not any(p.is_meta for p in ref.model.parameters())

    class Stop(Exception):
        pass

    import converters.quantize.directory as directory

    real_run = directory.run_quantization

    def interrupted(*a, **k):  # stop after two blocks: the state dir then has 2 block files
        def stop(index, block):
            if index == 1:
                raise Stop

        return real_run(*a, **k, on_block_done=stop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(directory, "run_quantization", interrupted)
        with pytest.raises(Stop):
            quantize_directory(tmp_path / "src", tmp_path / "disk", offload="disk", **kw)
    assert len(list((tmp_path / "disk" / ".svdq-state").glob("block-*.safetensors"))) == 2
    res = quantize_directory(tmp_path / "src", tmp_path / "disk", offload="disk", **kw)
    layers = svdq_modules(res.model)
    assert layers and all(isinstance(m, SVDQLinear) and m.qweight.is_meta for m in layers.values())
    names = sorted(p.name for p in (tmp_path / "full").iterdir() if p.name != "fidelity.json")
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "disk").iterdir()
                                              if p.name != "fidelity.json")
    for name in names:
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert not (tmp_path / "disk" / ".svdq-state").exists()


def test_two_ranks_from_disk_write_the_one_process_checkpoint(tmp_path):
    from svdq_format.cli import main as svdq_main

    tiny_flux(double=2, single=2).save_pretrained(tmp_path / "src", max_shard_size="50KB")
    common = ["--rank", "8", "--num-samples", "3", "--dtype", "float32", "--alphas", "0.5", "--device", "cpu",
              "--offload", "disk", "--max-shard-size", "60KB", "--dist-timeout", "60", "-q"]
    assert svdq_main(["quantize", str(tmp_path / "src"), str(tmp_path / "one"), *common]) == 0
    assert svdq_main(["quantize", str(tmp_path / "src"), str(tmp_path / "two"), *common, "--gpus", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if p.name != "fidelity.json")
    assert len(names) > 3
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_the_32b_benchmark_source_is_a_diffusers_model_and_its_sizes_are_right(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from diffusers import FluxTransformer2DModel

    from quantize_32b import block_bytes, flux_config, meta_model, random_tensor, write_source

    cfg = flux_config(128, 1, 2)
    info = write_source(cfg, tmp_path / "src", shard_bytes=2_000_000)
    assert info["shards"] > 1
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "src", torch_dtype=torch.bfloat16)
    state = model.state_dict()
    for key in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.proj_out.bias",
                "x_embedder.weight"):
        assert torch.equal(state[key], random_tensor(key, state[key], 0)), key
    total, largest, name = block_bytes(meta_model(cfg))
    assert total == sum(t.numel() * 2 for t in state.values())
    assert name == "transformer_blocks.0"
    assert largest == sum(t.numel() * 2 for k, t in state.items() if k.startswith("transformer_blocks.0."))


def test_sd3_from_disk_is_byte_identical(tmp_path):
    from diffusers import SD3Transformer2DModel

    from converters.quantize.directory import quantize_directory

    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                          pooled_projection_dim=32, out_channels=4,
                          pos_embed_max_size=16).save_pretrained(tmp_path / "src")
    kw = dict(num_samples=2, options=QuantizeOptions(rank=8, alphas=(0.5,)), dtype="float32", device="cpu",
              progress=False)
    quantize_directory(tmp_path / "src", tmp_path / "full", offload="none", **kw)
    quantize_directory(tmp_path / "src", tmp_path / "disk", offload="disk", **kw)
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
