"""A pipeline's text encoders in the SVDQuant format: quantized (W4A16, W4A4 where measured as faithful),
saved, loaded by transformers' own ``from_pretrained`` (our quantizer plug-in), and a whole tiny
pipeline with its transformer and text encoders quantized in one ``svdq quantize --components`` run
that ``DiffusionPipeline.from_pretrained`` loads, giving the same latents bit for bit after a reload."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from converters.quantize.families import block_lists
from converters.text_encoders import AUTO_TOLERANCE, quantize_text_encoder, text_encoder_calibration
from svdq_format.checkpoint import checkpoint_files, validate
from svdq_format.cli import main as svdq_main
from svdq_format.errors import ManifestError, QuantizationError, TensorError
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


def tiny_gemma2():  # Lumina2's / SANA's text encoder
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    return Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    max_position_embeddings=64, sliding_window=16)).eval()


def tiny_qwen25_vl():  # Qwen-Image's text encoder (a vision-language model; the pipelines give it text)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=1, window_size=8, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def _ids(seed: int = 5):
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))}


def _out(model, x):
    with torch.no_grad():
        return model(**x, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("build, mode", [
    (tiny_t5, "w4a16"), (tiny_t5, "w4a4"), (tiny_t5, "auto"), (tiny_clip, "w4a16"), (tiny_clip, "w4a4"),
    (tiny_clip, "auto"), (tiny_gemma2, "auto"), (tiny_qwen25_vl, "auto")],
    ids=["t5-w4a16", "t5-w4a4", "t5-auto", "clip-w4a16", "clip-w4a4", "clip-auto", "gemma2-auto", "qwen2.5-vl-auto"])
@pytest.mark.filterwarnings("ignore:.*no tokenizer:UserWarning")
def test_text_encoder_round_trip_through_transformers_from_pretrained(build, mode, tmp_path):
    model = build()
    x = _ids()
    ref = _out(model, x)
    blocks = [n for n, _ in block_lists(model)]
    with pytest.warns(UserWarning, match="no tokenizer: calibrating on random token ids"):
        calib = text_encoder_calibration(model, None, num_samples=2, max_length=12)
    # (Qwen2.5-VL's vision tower is quantized too, for the edit pipelines; a text prompt does not run it)
    with (pytest.warns(UserWarning, match=r"selected layers never ran during calibration \(e.g. model.visual")
          if build is tiny_qwen25_vl else contextlib.nullcontext()):
        result = quantize_text_encoder(model, calib, mode=mode, options=None)
    layers = svdq_modules(model)
    assert layers and {m.kind for m in layers.values()} <= ({mode} if mode != "auto" else {"w4a4", "w4a16"})
    # every linear of the repeated blocks, nothing else (embeddings, CLIP's text_projection stay 16-bit)
    assert blocks and all(any(n.startswith(f"{b}.") for b in blocks) for n in layers)
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


def test_auto_mode_takes_w4a4_exactly_where_its_measured_error_is_within_the_tolerance():
    import copy

    base = tiny_t5()
    with pytest.warns(UserWarning, match="no tokenizer: calibrating on random token ids"):
        calib = text_encoder_calibration(base, None, num_samples=2, max_length=12)
    single = {}
    for mode in ("w4a16", "w4a4"):
        model = copy.deepcopy(base)
        quantize_text_encoder(model, calib, mode=mode)
        single[mode] = svdq_modules(model)

    def auto(**kw):
        model = copy.deepcopy(base)
        result = quantize_text_encoder(model, calib, **kw)  # mode="auto" is the default
        return svdq_modules(model), {entry["layer"]: entry for entry in result.report.layers}

    layers, report = auto()
    assert set(layers) == set(single["w4a16"]) == set(report)
    for name, layer in layers.items():
        measured = report[name]["auto"]
        want = "w4a4" if measured["w4a4_error"] <= (1 + AUTO_TOLERANCE) * measured["w4a16_error"] else "w4a16"
        assert layer.kind == want == measured["chosen"] == report[name]["kind"], name
        # the layer is the one that mode gives on its own, bit for bit, and the errors are its own
        twin = single[want][name]
        assert layer.spec == twin.spec
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), twin.state_dict().values()))
        assert measured[f"{want}_error"] == report[name]["error"]["svdq"]
    # the tolerance moves the line: none -> fewer W4A4 layers, a huge one -> all of them
    strict, _ = auto(tolerance=0.0)
    loose, _ = auto(tolerance=100.0)
    w4a4 = {n for n, m in layers.items() if m.kind == "w4a4"}
    assert {n for n, m in strict.items() if m.kind == "w4a4"} <= w4a4 <= set(loose)
    assert {m.kind for m in loose.values()} == {"w4a4"}
    with pytest.raises(QuantizationError, match="tolerance must be >= 0"):
        quantize_text_encoder(copy.deepcopy(base), calib, tolerance=-0.1)
    with pytest.raises(QuantizationError, match="not one of auto, w4a16, w4a4"):
        quantize_text_encoder(copy.deepcopy(base), calib, mode="w8a8")


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
    assert f"wrote pipeline {out}" in printed
    assert {p.name for p in out.iterdir()} == {p.name for p in (tmp_path / "dense").iterdir()}
    for name in ("transformer", "text_encoder", "text_encoder_3"):
        validate(out / name)
        assert json.loads((out / name / "fidelity.json").read_text())["layers"]
    # the encoders' default (auto): W4A16, W4A4 where measured as faithful; what ran is what was written
    t5 = json.loads((out / "text_encoder_3" / "fidelity.json").read_text())["layers"]
    chosen = [entry["auto"]["chosen"] for entry in t5]
    assert [entry["kind"] for entry in t5] == chosen
    assert f"text_encoder_3: {chosen.count('w4a4')} W4A4 + {chosen.count('w4a16')} W4A16 layers" in printed

    def latents(p):
        p.set_progress_bar_config(disable=True)
        return p("a red cat", num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images

    dense = DiffusionPipeline.from_pretrained(tmp_path / "dense")
    pipe = DiffusionPipeline.from_pretrained(out)
    for name in ("transformer", "text_encoder", "text_encoder_3"):
        assert svdq_modules(getattr(pipe, name)), name
    assert not svdq_modules(pipe.text_encoder_2)  # not listed: copied as it was
    assert {n: m.kind for n, m in svdq_modules(pipe.text_encoder_3).items()} == {e["layer"]: e["kind"] for e in t5}
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


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_meta_device_memory_accounting_is_what_save_and_load_give(mode, tmp_path):
    """benchmarks/text_encoders.py reports FLUX's T5-XXL bytes on disk and loaded from a meta-device model
    (no memory spent): the same accounting of a tiny T5 equals what the quantizer, ``save_pretrained`` and
    transformers' ``from_pretrained`` really give."""
    import importlib.util
    import struct

    from transformers import T5Config, T5EncoderModel

    from converters.quantize import QuantizeOptions

    spec = importlib.util.spec_from_file_location("bench_text_encoders",
                                                  Path(__file__).resolve().parents[1] / "benchmarks/text_encoders.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = dict(bench.T5_XXL, vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    meta, counts = bench.quantized(mode, 8, cfg)
    est = bench.sizes(meta, quantized=True)

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**cfg)).to(torch.bfloat16).eval()
    with pytest.warns(UserWarning, match="no tokenizer"):
        calib = text_encoder_calibration(model, None, num_samples=2, max_length=8)
    quantize_text_encoder(model, calib, mode=mode, options=QuantizeOptions(rank=8))
    assert {n: m.spec for n, m in svdq_modules(model).items()} == {n: m.spec for n, m in svdq_modules(meta).items()}
    assert counts["layers"] == len(svdq_modules(model))
    model.save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    tied = set(getattr(meta, "all_tied_weights_keys", {}) or {})
    stored = {k: v for k, v in meta.state_dict().items() if k not in tied}
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == {k: list(v.shape)
                                                                                  for k, v in stored.items()}
    data = sum(v.numel() * v.element_size() for v in stored.values())
    assert data == len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]  # the tensor bytes: exact
    assert abs(est["disk"] - len(raw)) < 0.01 * len(raw)  # + the header, estimated within 1 %
    loaded = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert sum(t.numel() * t.element_size() for t in bench._unique(loaded)) == est["loaded"]  # exact


def test_a_model_index_with_a_duplicate_key_is_refused_in_one_line(tmp_path):
    """``model_index.json`` is parsed like every JSON we did not write (svdq_format.jsonsafe: issue 19):
    a key given twice is refused, not silently the last one."""
    from converters.quantize.components import pipeline_components
    from svdq_format.errors import QuantizationError

    (tmp_path / "model_index.json").write_text(
        '{"transformer": ["diffusers", "FluxTransformer2DModel"], "transformer": ["transformers", "T5EncoderModel"]}')
    with pytest.raises(QuantizationError, match=r"model_index\.json: not valid JSON \(duplicate key 'transformer'\)"):
        pipeline_components(tmp_path)
