"""Whole-model quantizer on tiny random diffusers transformers: save/reload, resume, CLI, errors."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from converters.quantize import (
    QuantizeOptions,
    capture_inputs,
    collect_stats,
    load_calibration,
    quantize_model,
    run_quantization,
    save_calibration,
    select_layers,
    synthetic_calibration,
)
from svdq_format.checkpoint import validate
from svdq_format.cli import main as svdq_main
from svdq_format.errors import QuantizationError
from svdq_format.linear import SVDQLinear
from svdq_format.model import save_model_dir, svdq_modules
from svdq_format.pretrained import load_model_dir
from svdq_format.summary import format_size
from tests.quantize_fixtures import tiny_flux, tiny_sd3_pipeline

pytestmark = [pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                                 pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=64,
                                    caption_channels=64, norm_type="ada_norm_single",
                                    use_additional_conditions=False)


def tiny_sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                  cross_attention_dim=64, caption_channels=64, mlp_ratio=2.5, sample_size=8,
                                  patch_size=1)


BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart, "sana": tiny_sana}


def eval_input(model):
    return synthetic_calibration(model, 1, seed=123, image_tokens=16, text_tokens=8, warn=False).samples[0]


def run(model, sample):
    with torch.no_grad():
        return model(**sample).sample


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_quantize_save_reload_bit_identical(family, tmp_path):
    model = BUILDERS[family]()
    x = eval_input(model)
    ref = run(model, x)
    calib = synthetic_calibration(model, 2, image_tokens=16, text_tokens=8)
    quantize_model(model, calib, rank=8, alphas=(0.3, 0.6))
    layers = svdq_modules(model)
    assert layers, "nothing was quantized"
    kinds = {n: m.kind for n, m in layers.items()}
    # defaults: blocks quantized, AdaLN weight-only, embedders / final projection 16-bit
    assert all(n.split(".")[0].endswith("blocks") or n.startswith("norm_out") for n in kinds)
    assert all(k == "w4a16" for n, k in kinds.items() if n.endswith(("norm1.linear", "norm.linear", "norm_out.linear")))
    assert any(k == "w4a4" for k in kinds.values())
    assert type(model.proj_out) is nn.Linear
    # the fidelity report runs the reference backend; the quantized layers select theirs again
    assert {m.backend for m in layers.values()} == {"auto"}
    y = run(model, x)
    assert torch.isfinite(y).all()
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.5
    save_model_dir(model, tmp_path / "q")
    validate(tmp_path / "q")
    reloaded = load_model_dir(tmp_path / "q")
    assert torch.equal(run(reloaded, x), y)
    # the quantized model is a diffusers svdquant model: its own save_pretrained writes the
    # format (sharded here) and diffusers' from_pretrained loads it back, bit-identical
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    validate(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf")
    assert torch.equal(run(again, x), y)


def test_input_groups_share_smoothing_and_stats_are_bounded():
    model = tiny_flux()
    sel = select_layers(model)
    linears = {n: model.get_submodule(n) for n in sel.kinds}
    calib = synthetic_calibration(model, 3, image_tokens=64, text_tokens=8)
    stats = collect_stats(model, linears, calib, max_rows=40)
    qkv = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
    assert qkv in stats.groups
    st = stats.layers["transformer_blocks.0.attn.to_q"]
    assert st.rows.shape == (40, 64) and st.count == 3 * 64
    st_ff = stats.layers["transformer_blocks.0.ff.net.2"]
    assert torch.equal(st_ff.absmax, torch.maximum(st_ff.absmax, st_ff.rows.abs().amax(0)))
    with pytest.warns(UserWarning, match="ranks stay uniform"):  # statistics without sensitivities
        quantize_model(model, stats, rank=8, alphas=(0.5,))
    smooths = [model.get_submodule(n).smooth for n in qkv]
    assert torch.equal(smooths[0], smooths[1]) and torch.equal(smooths[0], smooths[2])


def test_calibration_file_roundtrip_capture_and_nan(tmp_path):
    model = tiny_flux()
    samples = synthetic_calibration(model, 2, image_tokens=16, text_tokens=8).samples
    with capture_inputs(model) as got:
        for s in samples:
            model(**s)
    assert len(got) == 2 and torch.equal(got[1]["hidden_states"], samples[1]["hidden_states"])
    path = save_calibration(got, tmp_path / "calib.safetensors")
    back = load_calibration(path)
    assert len(back) == 2
    assert torch.equal(back.samples[0]["encoder_hidden_states"], samples[0]["encoder_hidden_states"])
    assert back.samples[0].get("joint_attention_kwargs", None) is None
    # quantizing from the file equals quantizing from the samples
    a, b = tiny_flux(), tiny_flux()
    quantize_model(a, str(path), rank=4, alphas=(0.5,))
    quantize_model(b, samples, rank=4, alphas=(0.5,))
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    bad = dict(samples[0])
    bad["hidden_states"] = bad["hidden_states"].clone()
    bad["hidden_states"][0, 3, 2] = math.nan
    save_calibration([bad], tmp_path / "nan.safetensors")
    with pytest.raises(QuantizationError, match=r"nan\.safetensors: 00000::hidden_states: .*NaN"):
        load_calibration(tmp_path / "nan.safetensors")
    with pytest.raises(QuantizationError, match="NaN or inf activations"):
        quantize_model(tiny_flux(), [bad], rank=4)


def test_interrupted_run_resumes_bit_identical(tmp_path):
    opts = QuantizeOptions(rank=8, alphas=(0.4,))
    calib = synthetic_calibration(tiny_flux(), 2, image_tokens=16, text_tokens=8)
    full = run_quantization(tiny_flux(), calib, options=opts).model.state_dict()

    def stop(index, block):
        if index == 0:
            raise KeyboardInterrupt

    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        run_quantization(tiny_flux(), calib, options=opts, state_dir=state, on_block_done=stop)
    assert (state / "block-0000.safetensors").is_file() and not (state / "block-0001.safetensors").exists()
    seen = []
    res = run_quantization(tiny_flux(), calib, options=opts, state_dir=state, on_block_done=lambda i, b: seen.append(i))
    assert seen == [1, 2]  # block 0 came from the state dir
    assert res.complete
    resumed = res.model.state_dict()
    assert resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert len(res.report.layers) == len(svdq_modules(res.model))
    # other options against the same state: refused
    with pytest.raises(QuantizationError, match="another model or other options"):
        run_quantization(tiny_flux(), calib, options=QuantizeOptions(rank=4), state_dir=state)


def test_cli_quantize_directory_and_errors(tmp_path, capsys):
    src, out = tmp_path / "flux", tmp_path / "flux-svdq"
    tiny_flux().save_pretrained(src)
    code = svdq_main(["quantize", str(src), str(out), "--rank", "8", "--num-samples", "2", "--dtype", "float32",
                      "--alphas", "0.5", "--exclude", "*.ff_context.*", "--table-rows", "3"])
    assert code == 0
    printed = capsys.readouterr().out  # what a user reads at the end of a run (not -q)
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / ".svdq-state").exists()
    quantizer = json.loads((out / "config.json").read_text())["quantization_config"]["quantizer"]
    assert quantizer["method"] == "calibrated" and quantizer["options"]["rank"] == 8  # docs/format.md §7.2
    report = json.loads((out / "fidelity.json").read_text())
    names = [r["layer"] for r in report["layers"]]
    assert names and not any(".ff_context." in n for n in names)
    assert report["skipped"]["transformer_blocks.0.ff_context.net.2"] == "excluded by pattern"
    base = {"svdq", "naive_w4a4", "w4a16"}
    assert all(set(r["error"]) == (base | {"svdq_fast", "svdq_fast8"} if r["kind"] == "w4a4" else base)
               for r in report["layers"])
    fast8 = report["summary"]["fast8"]  # the Hopper modes vs exact W4A4, per run (issue 9's condition)
    assert (fast8["layers"] == sum(r["kind"] == "w4a4" for r in report["layers"])
            and 0 <= fast8["no_worse"] <= fast8["layers"])
    (mem,) = report["environment"]["memory_per_rank"]  # this run's own peak (VmHWM reset by the CLI)
    assert mem["rank"] == 0 and mem["peak_gpu_bytes"] == 0 and mem["peak_host_rss_bytes"] > 10 * 2**20
    # the printed table is fidelity.json's: its first rows, a count of the rest, the means
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    for line, row in zip(lines[head + 2:head + 5], report["layers"][:3]):
        name = row["layer"] if len(row["layer"]) <= 44 else "…" + row["layer"][-43:]
        assert line.split()[0] == name
        assert f"{row['error']['svdq']:.4f}" in line.split() and f"{row['error']['w4a16']:.4f}" in line.split()
    assert lines[head + 5] == f"... {len(report['layers']) - 3} more layers (see fidelity.json)"
    mean = sum(r["error"]["svdq"] for r in report["layers"]) / len(report["layers"])
    assert f"mean over {len(report['layers'])} layers: svdq {mean:.4f}" in printed
    assert f"fast8 mode on {fast8['layers']} W4A4 layers" in printed
    assert f"kept 16-bit: {len(report['skipped'])} candidate layers" in printed
    assert "time: " in printed and "peak memory: host " in printed
    size = format_size((out / "diffusion_pytorch_model.safetensors").stat().st_size)
    assert f"wrote {out} (config.json, diffusion_pytorch_model.safetensors: {size}, fidelity.json)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "svdquant"
    assert type(load_model_dir(out).transformer_blocks[0].attn.to_q) is SVDQLinear
    capsys.readouterr()

    def err(argv):
        assert svdq_main(argv) == 1
        e = capsys.readouterr().err
        assert e.startswith("error: ") and e.count("\n") == 1
        return e

    assert "no such directory" in err(["quantize", str(tmp_path / "missing"), str(out)])
    assert "not a diffusers model directory" in err(["quantize", str(tmp_path), str(tmp_path / "o")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "NoSuchModel"}')
    assert "not a diffusers model class" in err(["quantize", str(tmp_path / "bad"), str(tmp_path / "o")])
    assert "already quantized" in err(["quantize", str(out), str(tmp_path / "o")])
    assert "calibration file not found" in err(["quantize", str(src), str(tmp_path / "o"), "--calibration", "nope.st"])
    assert err(["quantize", str(src), str(tmp_path / "o"), "--gpus", "0"]) == "error: --gpus must be >= 1, got 0\n"
    with pytest.raises(SystemExit) as bad:  # argparse: usage and the reason on stderr, status 2
        svdq_main(["quantize", str(src), str(tmp_path / "o"), "--alphas", "0.5,x"])
    assert bad.value.code == 2 and "expected comma-separated numbers, got '0.5,x'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_quantize_with_prompts_runs_the_pipeline(tmp_path, capsys):
    """The README's ``svdq quantize PIPELINE OUT --prompts FILE``, on a whole (tiny) pipeline on disk."""
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n  blue sky  \n")
    out = tmp_path / "sd3-svdq"
    common = ["--rank", "8", "--num-samples", "4", "--dtype", "float32", "--alphas", "0.5", "-q"]
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)  # pyproject ignores diffusers' deprecations
        assert svdq_main(["quantize", str(tmp_path / "sd3"), str(out), "--prompts", str(prompts), "--steps", "3",
                          "--resolution", "16x16", "--guidance-scale", "2.5", *common]) == 0
    err = capsys.readouterr().err
    assert "Loading" not in err  # -q: diffusers' and transformers' loading bars too
    assert "deprecated" not in err  # the pipeline is loaded with the dtype keyword diffusers takes
    report = json.loads((out / "fidelity.json").read_text())
    assert report["calibration"] == {"source": "pipeline", "samples": 4}
    t = report["timings"]
    assert list(t)[:2] == ["load", "pipeline_capture"] and t["pipeline_capture"] > 0
    assert report["total_seconds"] == t["wall"] >= t["load"] + t["pipeline_capture"]  # wall spans every phase

    # the inputs were the saved pipeline's, run on the file's two prompts (blank line skipped, spaces
    # stripped): the same capture through the Python API quantizes to the same bytes
    from diffusers import DiffusionPipeline

    from converters.quantize import QuantizeOptions, capture_pipeline_inputs, run_quantization

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd3")
    pipe.set_progress_bar_config(disable=True)
    calib = capture_pipeline_inputs(pipe, ["a red cat", "blue sky"], max_samples=4, seed=0, output_type="latent",
                                    num_inference_steps=3, height=16, width=16, guidance_scale=2.5)
    assert len(calib) == 4 and calib.samples[0]["encoder_hidden_states"].shape[-1] == 64
    assert calib.samples[0]["hidden_states"].shape[-2:] == (16, 16)  # --resolution (the default is 8x8)
    opts = QuantizeOptions(rank=8, alphas=(0.5,))
    ours = run_quantization(pipe.transformer, calib, options=opts, device="cpu", offload=False).model.state_dict()
    cli = load_model_dir(out).state_dict()
    assert ours.keys() == cli.keys() and all(torch.equal(ours[k], cli[k]) for k in ours)

    # the quantized transformer drops into the pipeline
    pipe.transformer = load_model_dir(out)
    latents = pipe("a red cat", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and bool(torch.isfinite(latents).all())

    capsys.readouterr()
    transformer_only = ["quantize", str(tmp_path / "sd3" / "transformer"), str(tmp_path / "o"), "--prompts",
                        str(prompts), *common]
    assert svdq_main(transformer_only) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SRC must be a pipeline directory with model_index.json" in err
    assert f"its parent {(tmp_path / 'sd3').resolve()} is one" in err
    assert svdq_main(["quantize", str(tmp_path / "sd3"), str(tmp_path / "o"), "--prompts", "nope.txt", *common]) == 1
    assert "prompt file not found" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert svdq_main(["quantize", str(tmp_path / "sd3"), str(tmp_path / "o"), "--prompts", str(tmp_path / "blank.txt"),
                      *common]) == 1
    assert "the prompt file holds no prompt" in capsys.readouterr().err
    assert svdq_main(["quantize", str(tmp_path / "sd3"), str(tmp_path / "o"), "--steps", "3", *common]) == 1
    assert "apply only with --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        svdq_main(["quantize", str(tmp_path / "sd3"), str(tmp_path / "o"), "--resolution", "16", *common])
    assert "expected HEIGHTxWIDTH in pixels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unsupported_shapes_stay_16bit_or_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 48))])

        def forward(self, x):
            return self.blocks[0](x)

    with pytest.warns(UserWarning, match="Odd is not an architecture svdquant was tested on"):
        sel = select_layers(Odd())
    assert list(sel.kinds) == ["blocks.0.1"]
    assert "not a multiple of 64" in sel.skipped["blocks.0.0"]
    m = Odd()
    with pytest.warns(UserWarning, match="Odd is not an architecture svdquant was tested on"):
        quantize_model(m, [{"x": torch.randn(4, 48)}], rank=4)
    assert isinstance(m.blocks[0][1], SVDQLinear) and type(m.blocks[0][0]) is nn.Linear
    with pytest.raises(QuantizationError, match="no linear layer can be quantized"), \
            pytest.warns(UserWarning, match="Odd is not an architecture svdquant was tested on"):
        quantize_model(Odd(), [{"x": torch.randn(4, 48)}], exclude=["blocks.0.1"])


def test_out_of_memory_is_one_clear_error(monkeypatch):
    import converters.quantize.block_loop as block_loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(block_loop, "quantize_group", oom)
    with pytest.raises(QuantizationError, match=r"out of memory while quantizing block transformer_blocks\.0"):
        quantize_model(tiny_flux(), "synthetic", rank=4)


def test_block_streaming_gives_the_same_result():
    calib = synthetic_calibration(tiny_flux(), 2, image_tokens=16, text_tokens=8)
    opts = QuantizeOptions(rank=4, alphas=(0.5,))
    a = run_quantization(tiny_flux(), calib, options=opts, offload=False).model.state_dict()
    b = run_quantization(tiny_flux(), calib, options=opts, offload="blocks").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_calibration_capture_dit():
    """Calibrate from a real (tiny, random) diffusers pipeline: inputs captured across steps."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from converters.quantize import capture_pipeline_inputs

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16)
    pipe = DiTPipeline(transformer, vae, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    calib = capture_pipeline_inputs(pipe, calls=[{"class_labels": [1]}, {"class_labels": [7]}],
                                    num_inference_steps=4, max_samples=4, output_type="np")
    assert calib.source == "pipeline" and len(calib) == 4
    steps = [float(s["timestep"][0]) for s in calib.samples]
    assert len(set(steps[:2])) == 2  # spread over the denoising steps of one call
    assert {int(s["class_labels"][0]) for s in calib.samples} == {1, 7}
    sel = select_layers(transformer)
    assert sel.kinds["transformer_blocks.0.norm1.linear"] == "w4a16"
    assert sel.skipped["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] == "embedder: kept 16-bit"
    quantize_model(transformer, calib, rank=8, alphas=(0.5,))
    assert isinstance(transformer.transformer_blocks[0].attn1.to_q, SVDQLinear)
    image = pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 8, 8, 3) and bool(torch.isfinite(torch.as_tensor(image)).all())


def test_deterministic_for_a_seed_and_nan_weights_rejected():
    def state(seed):
        m = tiny_flux()
        run_quantization(m, "synthetic", options=QuantizeOptions(rank=4, alphas=(0.5,), seed=seed), num_samples=2)
        return m.state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    m = tiny_flux()
    with torch.no_grad():
        m.transformer_blocks[0].attn.to_k.weight[3, 5] = math.nan
    with pytest.raises(QuantizationError, match=r"transformer_blocks\.0\.attn\.to_k: weight contains NaN"):
        quantize_model(m, [eval_input(tiny_flux())], rank=4)
