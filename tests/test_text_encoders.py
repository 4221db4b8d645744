"""A pipeline's text encoders in the SVDQuant format: quantized (W4A16 by default, W4A4 on request),
saved, loaded by transformers' own ``from_pretrained`` (our quantizer plug-in), and a whole tiny
pipeline with its transformer and text encoders quantized in one ``svdq quantize --components`` run
that ``DiffusionPipeline.from_pretrained`` loads, giving the same latents bit for bit after a reload."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converters.text_encoders import quantize_text_encoder, text_encoder_calibration
from svdq_format.checkpoint import checkpoint_files, validate
from svdq_format.cli import main as svdq_main
from svdq_format.errors import ManifestError, TensorError
from svdq_format.io import read_header
from svdq_format.linear import SVDQLinear
from svdq_format.model import svdq_modules
from tests.quantize_fixtures import tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu")).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32)).eval()


def _ids(seed: int = 5):
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))}


def _out(model, x):
    with torch.no_grad():
        return model(**x)[0]


@pytest.mark.parametrize("build", [tiny_t5, tiny_clip], ids=["t5", "clip"])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_text_encoder_round_trip_through_transformers_from_pretrained(build, mode, tmp_path):
    model = build()
    x = _ids()
    ref = _out(model, x)
    with pytest.warns(UserWarning, match="no tokenizer: calibrating on random token ids"):
        calib = text_encoder_calibration(model, None, num_samples=2, max_length=12)
    result = quantize_text_encoder(model, calib, mode=mode, options=None)
    layers = svdq_modules(model)
    assert layers and {m.kind for m in layers.values()} == {mode}
    # every linear of the repeated blocks, nothing else (embeddings, CLIP's text_projection stay 16-bit)
    assert all(".layer" in n or ".block." in n for n in layers)
    y = _out(model, x)
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.5
    assert result.report.calibration["source"] == "random ids"

    model.save_pretrained(tmp_path / "a")  # the svdquant writer, installed on the instance
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    validate(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "svdquant" and cfg["architectures"] == [type(model).__name__]
    loaded = type(model).from_pretrained(tmp_path / "a")  # transformers' own loader, our plug-in
    assert {n: m.spec for n, m in svdq_modules(loaded).items()} == {n: m.spec for n, m in layers.items()}
    assert torch.equal(_out(loaded, x), y)
    loaded.save_pretrained(tmp_path / "b", max_shard_size="20KB")  # sharded: model-0000i-of-0000n + index
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 1
    again = type(model).from_pretrained(tmp_path / "b")
    assert torch.equal(_out(again, x), y)

    half = type(model).from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    layer = next(iter(svdq_modules(half).values()))
    src = layers[next(iter(svdq_modules(half)))]
    assert layer.dtype == torch.bfloat16 and torch.equal(layer.qweight, src.qweight)
    assert layer.wscales.dtype == src.wscales.dtype and torch.equal(layer.wscales, src.wscales)  # codes, scales uncast
    assert torch.isfinite(_out(half, x).float()).all()


def test_damaged_text_encoder_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_t5()
    with pytest.warns(UserWarning, match="no tokenizer: calibrating on random token ids"):
        calib = text_encoder_calibration(model, None, num_samples=1, max_length=8)
    quantize_text_encoder(model, calib)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"

    meta = read_header(path).metadata
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith(".wscales"))
    del tensors[name]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(Exception, match="wscales"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(TensorError):
        validate(tmp_path)


def test_transformers_loader_makes_the_loading_core_checks(tmp_path):
    """transformers' ``from_pretrained`` of a text encoder runs the checks of svdq_format.checkpoint,
    with their words: the manifests must agree and the key sets match (a tied copy, which
    transformers does not store, is no missing tensor); the core finds ``model.safetensors``."""
    from safetensors.torch import load_file, save_file

    model = tiny_t5()
    with pytest.warns(UserWarning, match="no tokenizer: calibrating on random token ids"):
        calib = text_encoder_calibration(model, None, num_samples=1, max_length=8)
    quantize_text_encoder(model, calib)
    model.save_pretrained(tmp_path / "ok")
    assert "shared.weight" in load_file(tmp_path / "ok" / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in load_file(tmp_path / "ok" / "model.safetensors")  # tied: not stored
    assert checkpoint_files(tmp_path / "ok") == [tmp_path / "ok" / "model.safetensors"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = checkpoint_files(tmp_path / "sharded")
    assert len(shards) > 1 and all(p.name.startswith("model-0") for p in shards)

    extra = tmp_path / "extra"
    shutil.copytree(tmp_path / "ok", extra)
    path = extra / "model.safetensors"
    meta = read_header(path).metadata
    save_file({**load_file(path), "encoder.stray": torch.zeros(3)}, path, metadata=meta)
    with pytest.raises(TensorError, match=r"encoder\.stray: not a tensor of T5EncoderModel \(1 unexpected\)"):
        type(model).from_pretrained(extra)

    disagree = tmp_path / "disagree"
    shutil.copytree(tmp_path / "ok", disagree)
    cfg = json.loads((disagree / "config.json").read_text())
    dropped = sorted(cfg["quantization_config"]["layers"])[0]
    del cfg["quantization_config"]["layers"][dropped]
    (disagree / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match=f"{dropped}: config.json manifest disagrees with the safetensors files"):
        type(model).from_pretrained(disagree)


def test_registration_with_transformers_is_lazy():
    code = (
        "import sys, svdq_format\n"
        "assert 'transformers' not in sys.modules, 'import svdq_format pulled in transformers'\n"
        "from transformers.quantizers import auto\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['svdquant'].__name__ == 'SVDQuantHfQuantizer'\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['svdquant'].__name__ == 'SVDQuantHfConfig'\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_whole_pipeline_transformer_and_text_encoders_quantized_in_one_run(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    tiny_sd3_pipeline(wide_text_encoders=True).save_pretrained(tmp_path / "dense")
    out = tmp_path / "quantized"
    (tmp_path / "prompts.txt").write_text("a red cat\nblue sky over the sea\n")
    argv = ["quantize", str(tmp_path / "dense"), str(out), "--components", "transformer,text_encoder,text_encoder_3",
            "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--num-samples", "2", "--rank", "8",
            "--alphas", "0.5", "--dtype", "float32"]
    assert svdq_main(argv) == 0
    printed = capsys.readouterr().out
    assert "text_encoder_3: 0 W4A4 + " in printed and f"wrote pipeline {out}" in printed
    assert {p.name for p in out.iterdir()} == {p.name for p in (tmp_path / "dense").iterdir()}
    for name in ("transformer", "text_encoder", "text_encoder_3"):
        validate(out / name)
        assert json.loads((out / name / "fidelity.json").read_text())["layers"]

    def latents(p):
        p.set_progress_bar_config(disable=True)
        return p("a red cat", num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    dense = DiffusionPipeline.from_pretrained(tmp_path / "dense")
    pipe = DiffusionPipeline.from_pretrained(out)
    for name in ("transformer", "text_encoder", "text_encoder_3"):
        assert svdq_modules(getattr(pipe, name)), name
    assert not svdq_modules(pipe.text_encoder_2)  # not listed: copied as it was
    assert {m.kind for m in svdq_modules(pipe.text_encoder_3).values()} == {"w4a16"}
    ref, got = latents(dense), latents(pipe)
    assert float((got - ref).norm() / ref.norm()) < 0.5
    pipe.save_pretrained(tmp_path / "again")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "again")
    assert isinstance(reloaded.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q, SVDQLinear)
    assert torch.equal(latents(reloaded), got)  # the whole pipeline, bit for bit

    def err(args):
        assert svdq_main(["quantize", str(tmp_path / "dense"), str(tmp_path / "o"), *args]) == 1
        e = capsys.readouterr().err
        assert e.startswith("error: ") and e.count("\n") == 1
        return e

    capsys.readouterr()
    assert "has no component 'text_encoder_9'" in err(["--components", "text_encoder_9"])
    assert "'vae' (diffusers AutoencoderKL) is neither a denoiser nor a transformers text encoder" in err(
        ["--components", "vae"])
    assert svdq_main(["quantize", str(tmp_path / "dense" / "transformer"), str(tmp_path / "o"), "--components",
                      "all"]) == 1
    assert "--components needs a pipeline directory" in capsys.readouterr().err
