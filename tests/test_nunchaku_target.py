"""``svdq quantize --target nunchaku``: our quantizer's output exports to Nunchaku and comes back.

The whole-model round trip on a tiny FLUX (int4 and nvfp4): quantize --target nunchaku →
convert --to nunchaku → convert --from nunchaku → stock ``from_pretrained`` gives the quantized
model's outputs bit for bit. Without the preset, every export error it would have avoided names
the flag.
"""

from __future__ import annotations

import json

import pytest
import torch

import svdq_format  # noqa: F401  (registers the "svdquant" quantizer with diffusers)
from converters.quantize import QuantizeOptions, quantize_model
from quantize_fixtures import tiny_flux, tiny_flux_inputs
from svdq_format.cli import main
from svdq_format.errors import QuantizationError, UnsupportedError
from svdq_format.linear import SVDQLinear

SHIFT = 0.171875


def _quantize(tmp_path, capsys, name, *extra):
    src = tmp_path / "flux"
    if not src.exists():
        tiny_flux().save_pretrained(src)
    out = tmp_path / name
    assert main(["quantize", str(src), str(out), "--rank", "8", "--num-samples", "2", "--alphas", "0.5", "-q",
                 "--refine", "0", "--no-clip-search", *extra]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_target_nunchaku_round_trips_bit_for_bit(tmp_path, capsys, precision):
    from diffusers import FluxTransformer2DModel

    q = _quantize(tmp_path, capsys, "q", "--precision", precision, "--target", "nunchaku")
    nun, back = tmp_path / "n.safetensors", tmp_path / "back"
    assert main(["convert", "--to", "nunchaku", str(q), str(nun)]) == 0
    assert main(["convert", "--from", "nunchaku", str(nun), str(back)]) == 0
    quantized = FluxTransformer2DModel.from_pretrained(q)
    imported = FluxTransformer2DModel.from_pretrained(back)  # stock diffusers, after `import svdq_format`
    with torch.no_grad():
        assert torch.equal(imported(**tiny_flux_inputs(7)).sample, quantized(**tiny_flux_inputs(7)).sample)
    layers_q = json.loads((q / "config.json").read_text())["quantization_config"]["layers"]
    layers_b = json.loads((back / "config.json").read_text())["quantization_config"]["layers"]
    assert layers_q == layers_b

    # what the preset made of each layer
    assert "norm_out.linear" not in layers_q  # Nunchaku keeps it 16-bit
    awq = {n for n, e in layers_q.items() if e["kind"] == "w4a16"}
    assert awq == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                   "single_transformer_blocks.0.norm.linear"}
    for name in awq:
        layer = quantized.get_submodule(name)
        assert layer.precision == "int4" and layer.rank == 0 and bool((layer.smooth == 1).all()), name
    shifted = {n for n, e in layers_q.items() if e.get("act_shift") or e.get("k_segments")}
    proj_out = layers_q["single_transformer_blocks.0.proj_out"]
    if precision == "int4":
        assert shifted == {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
                           "single_transformer_blocks.0.proj_out"}
        assert layers_q["transformer_blocks.0.ff.net.2"]["act_shift"] == SHIFT
        assert proj_out["k_segments"] == [{"size": 64}, {"size": 256, "act_shift": SHIFT, "act_unsigned": True}]
    else:
        assert not shifted and "k_segments" not in proj_out
        attn = quantized.transformer_blocks[0].attn
        assert torch.equal(attn.to_q.wtscale, attn.to_k.wtscale) and torch.equal(attn.to_q.wtscale, attn.to_v.wtscale)


def test_without_the_preset_export_errors_name_the_flag(tmp_path, capsys):
    def export_error(q):
        assert main(["convert", "--to", "nunchaku", str(q), str(tmp_path / "n.safetensors")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--target nunchaku" in err
        return err

    default = _quantize(tmp_path, capsys, "default", "--no-smoothing")
    assert "layer norm_out.linear: Nunchaku runs only AdaLN modulation layers as AWQ W4A16" in export_error(default)
    no_norm_out = _quantize(tmp_path, capsys, "no-norm-out", "--no-smoothing", "--exclude", "norm_out.linear")
    assert "single_transformer_blocks.0.proj_out" in export_error(no_norm_out)
    assert not (tmp_path / "n.safetensors").exists()


def test_target_option_errors():
    with pytest.raises(UnsupportedError, match="unknown quantize target 'tensorrt'"):
        QuantizeOptions(target="tensorrt")
    with pytest.raises(UnsupportedError, match="drop --weight-only"):
        QuantizeOptions(target="nunchaku", weight_only=True)
    with pytest.raises(UnsupportedError, match="--w4a16-rank 8"):
        QuantizeOptions(target="nunchaku", w4a16_rank=8)
    with pytest.raises(QuantizationError, match="target nunchaku: Nunchaku runs bfloat16 or float16 models"):
        quantize_model(tiny_flux(), "synthetic", rank=4, target="nunchaku")  # float32


def test_target_nunchaku_in_the_python_api():
    model = tiny_flux().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="synthetic"):
        quantize_model(model, "synthetic", rank=4, alphas=(0.5,), refine_iters=0, clip_search=False,
                       target="nunchaku")
    proj_out = model.single_transformer_blocks[0].proj_out
    assert isinstance(proj_out, SVDQLinear) and [s.size for s in proj_out.k_segments] == [64, 256]
    assert not isinstance(model.norm_out.linear, SVDQLinear)
    assert model.config.quantization_config.to_dict()["quantizer"]["options"]["target"] == "nunchaku"


def test_nunchaku_flux_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The script of docs/interop.md's H100 section runs (CPU, tiny FLUX, one step): a random
    Nunchaku-layout int4 file, converted, loaded with stock from_pretrained, stepped."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("nunchaku_flux")
    out = tmp_path / "nf.json"
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out),
                       "--workdir", str(tmp_path / "work")]) == 0
    got = json.loads(out.read_text())
    assert got["k_segmented_layers"] == 2 and got["svdq_layers"] == got["random_file"]["layers"]
    assert got["output_finite"] and got["convert_s"] > 0 and got["step"]["eager"]["median_s"] > 0
    assert sum(got["layers_by_backend"].values()) == got["svdq_layers"]
