"""``torch.compile`` of whole quantized diffusers models: the ``svdquant::linear`` op traces as one
node (its fake implementation gives shapes), so dynamo sees no graph break (``fullgraph=True``)
and the compiled model gives the eager outputs. ``aot_eager`` runs dynamo and AOTAutograd (the
fake implementation is exercised) without needing a C++ compiler for inductor."""

from __future__ import annotations

import pytest
import torch

from converters.quantize import quantize_model, synthetic_calibration
from svdq_format.model import svdq_modules
from tests.test_quantize_models import BUILDERS, eval_input, run

pytestmark = pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_whole_quantized_model_compiles_without_graph_breaks(family):
    """Every execution mode in one graph (the W4A4 layers take exact, fast and fast8 in turn):
    one compilation per model family instead of one per mode; ``fullgraph=True`` raises, with
    the reason, at the first graph break."""
    torch._dynamo.reset()
    model = BUILDERS[family]()
    calib = synthetic_calibration(model, 2, image_tokens=16, text_tokens=8)
    quantize_model(model, calib, rank=8, alphas=(0.5,))
    layers = svdq_modules(model)
    assert {m.kind for m in layers.values()} == {"w4a4", "w4a16"}
    w4a4 = [m for m in layers.values() if m.kind == "w4a4"]
    for i, m in enumerate(w4a4):
        m.mode = ("exact", "fast", "fast8")[i % 3]
    assert len(w4a4) >= 3
    x = eval_input(model)
    eager = run(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(**x).sample
    assert torch.equal(got, eager)


def test_model_with_a_lora_compiles_and_follows_a_strength_change():
    """LoRA ranks live in buffers (concatenated branch, per-rank scales) and 16-bit targets in
    forward hooks: both trace without a graph break, and the compiled model follows a strength
    change (new scale buffers; the hooks' strength is guarded on, so it may re-trace)."""
    from converters.lora import load_lora, set_lora_strengths
    from tests.lora_fixtures import flux_inputs, lora_targets, peft_state_dict, quantize, random_factors, tiny_flux

    torch._dynamo.reset()
    dense = tiny_flux()
    model = quantize(tiny_flux())
    load_lora(model, peft_state_dict(random_factors(lora_targets(dense), rank=4)), adapter_name="a", cache=False)
    x = flux_inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(**x).sample, model(**x).sample)
        set_lora_strengths(model, {"a": 0.3})
        assert torch.equal(compiled(**x).sample, model(**x).sample)


def test_flux_step_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The script of issue 10's end-to-end measurement runs (CPU, tiny config, one step)."""
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    flux_step = importlib.import_module("flux_step")

    out = tmp_path / "step.json"
    assert flux_step.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--fast",
                           "--mode", "auto", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["svdq_layers"] > 0 and got["svdq"]["weights_bytes"] > 0 and got["mode"] == "auto"
    assert 0 < got["svdq_output_rel_err_vs_bf16"] < 0.5
    # with fused q/k/v projections in both models: the same output, no more weight bytes
    from svdq_format import ops

    setting = ops.FAST8_PROLOGUE
    fused = tmp_path / "fused.json"
    assert flux_step.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--fast",
                           "--mode", "auto", "--fuse-qkv", "--convert", "both", "--prologue", "both",
                           "--out", str(fused)]) == 0
    got2 = json.loads(fused.read_text())
    assert got2["fuse_qkv"] and got2["svdq_fused_layers"] > 0
    # --convert / --prologue both: the model timed once per setting, each entry saying which; the
    # process's settings are left as they were
    assert (got2["svdq"]["convert"], got2["svdq_producer"]["convert"]) == ("consumer", "producer")
    assert (got2["svdq"]["prologue"], got2["svdq_inductor"]["prologue"]) == ("fused", "inductor")
    assert ops.FAST8_PROLOGUE == setting
    # more bytes only for the zeros of the block-diagonal lora_up (large here: rank 32 of 64 features)
    assert got2["svdq"]["weights_bytes"] <= got["svdq"]["weights_bytes"] * 1.25
    assert abs(got2["svdq_output_rel_err_vs_bf16"] - got["svdq_output_rel_err_vs_bf16"]) < 1e-3
    with pytest.raises(SystemExit):  # timing nothing is refused up front
        flux_step.main(["--tiny", "--device", "cpu", "--no-svdq-eager", "--out", str(out)])
