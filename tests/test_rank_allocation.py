"""Rank allocation under the --rank budget (converters/quantize/rank_allocation.py, sensitivity.py):
the greedy is optimal on convex curves and keeps to the budget, the sensitivities are the
Jacobian norms they claim to be, and a checkpoint with per-layer ranks is recorded, inspected,
resumed, fused and LoRA-adapted correctly (the Nunchaku export of per-layer ranks:
tests/test_nunchaku.py)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from converters.quantize import QuantizeOptions, run_quantization, synthetic_calibration
from converters.quantize.rank_allocation import LayerCurve, RankPlan, allocate, make_plan
from converters.quantize.sensitivity import layer_sensitivity
from quantize_fixtures import tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _curve(unit, errors, weight=1.0):
    return LayerCurve(unit, [16 * i for i in range(len(errors))], list(errors), weight)


def test_greedy_allocation_is_optimal_on_convex_curves_and_keeps_the_budget():
    g = torch.Generator().manual_seed(0)
    curves = {}
    for i in range(4):  # convex decreasing curves of different slopes and costs
        decay = 0.3 + 0.6 * float(torch.rand(1, generator=g))
        curves[f"l{i}"] = _curve(int(100 + 300 * float(torch.rand(1, generator=g))),
                                 [float(decay ** j) for j in range(6)], weight=1 + i)
    for budget in (0, 8000, 24000, 48000, 96000, 10**9):  # unit_bytes: one rank; a step is 16 ranks
        ranks = allocate(curves, budget)
        assert all(r % 16 == 0 for r in ranks.values())
        assert sum(ranks[n] * c.unit_bytes for n, c in curves.items()) <= budget
        best = min(
            (sum(c.weight * c.errors[j] for c, j in zip(curves.values(), combo)), combo)
            for combo in itertools.product(range(6), repeat=4)
            if sum(16 * c.unit_bytes * j for c, j in zip(curves.values(), combo)) <= budget
        )
        got = sum(c.weight * c.errors[ranks[n] // 16] for n, c in curves.items())
        # greedy on the hull is optimal up to the last step that did not fit (one step of one layer)
        slack = max(c.weight * (c.errors[0] - c.errors[1]) for c in curves.values())
        assert got <= best[0] + slack
        if budget in (0, 10**9):
            assert got == pytest.approx(best[0])


def test_non_convex_curves_use_their_hull_and_flat_steps_are_not_bought():
    c = {"a": _curve(10, [1.0, 0.99, 0.2, 0.2, 0.2]), "b": _curve(10, [1.0, 0.5, 0.45, 0.44, 0.44])}
    ranks = allocate(c, 480)  # 10 bytes a rank: a 0 → 32 costs 320, b 0 → 16 costs 160
    assert ranks == {"a": 32, "b": 16}  # "a" jumps 0 → 32 (hull), "b" takes its best step
    assert allocate(c, 10**6) == {"a": 32, "b": 48}  # no byte for steps that gain nothing


def test_without_sensitivities_the_ranks_stay_uniform_with_a_warning():
    curves = {"a": _curve(10, [1.0, 0.1, 0.05]), "b": _curve(10, [1.0, 0.9, 0.8])}
    with pytest.warns(UserWarning, match="ranks stay uniform"):
        plan = make_plan({}, curves, QuantizeOptions(rank=16), {"a": (64, 64), "b": (64, 64)}, weighted=False)
    assert plan.ranks == {"a": 16, "b": 16} and plan.used_bytes == plan.budget_bytes
    assert RankPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_hutchinson_sensitivity_is_the_jacobians_frobenius_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    est = layer_sensitivity(model, {"0": model[0], "2": model[2]}, [{"input": x}], device="cpu", draws=4000)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        # d out / d (layer-0 output) for one row: W2 · diag(1 − tanh²); for the last layer: identity
        jac0 = [(model[2].weight * (1 - h[i] ** 2)).square().sum() / 16 for i in range(3)]
    assert est["0"] == pytest.approx(float(sum(jac0) / 3), rel=0.05)
    assert est["2"] == pytest.approx(4 / 4, rel=1e-6)  # ±1 vectors: exactly ‖I‖²_F / N
    assert all(p.requires_grad for p in model.parameters())  # frozen only for the measurement


#: The default recipe at the rank-16 budget.
BUDGET_OPTIONS = QuantizeOptions(rank=16)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """The tiny FLUX quantized with the default recipe: per-layer ranks under the rank-16 budget."""
    model = tiny_flux(num_layers=2, num_single_layers=2)
    calib = synthetic_calibration(model, 4, image_tokens=16, text_tokens=8, warn=False)
    state = tmp_path_factory.mktemp("state")
    result = run_quantization(model, calib, options=BUDGET_OPTIONS, state_dir=state)
    return result, calib, state


def test_budget_ranks_are_multiples_of_16_within_the_budget_and_recorded(budget_run, tmp_path):
    from svdq_format.model import save_model_dir
    from svdq_format.pretrained import load_model_dir
    from svdq_format.summary import format_summary, summarize

    result, _, _ = budget_run
    w4a4 = [r for r in result.report.layers if r["kind"] == "w4a4"]
    ranks = {r["layer"]: r["rank"] for r in w4a4}
    assert all(r % 16 == 0 and r <= 64 for r in ranks.values()) and len(set(ranks.values())) > 1
    lowrank = sum(r["rank"] * sum(r["shape"]) for r in w4a4)
    assert lowrank <= sum(16 * sum(r["shape"]) for r in w4a4)  # the uniform rank-16 bytes
    alloc = result.report.rank_allocation
    assert alloc["weighted"] and alloc["used_bytes"] <= alloc["budget_bytes"]
    assert alloc["predicted_sq_error_allocated"] < alloc["predicted_sq_error_uniform"]
    table = result.report.table()
    assert f"rank allocation over {len(w4a4)} W4A4 layers" in table
    q = [ranks[f"transformer_blocks.{i}.attn.to_q"] for i in range(2)]
    assert f"transformer_blocks.*.attn.to_q {sum(q) / 2:.0f}" in table.split("mean rank by layer:")[1]
    out = save_model_dir(result.model, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {n: cfg[n]["rank"] for n in ranks} == ranks  # the manifest keeps every layer's rank
    back = load_model_dir(out)
    assert all(back.get_submodule(n).rank == r for n, r in ranks.items())
    s = summarize(out)
    text = format_summary(s)
    assert "ranks" in text and "mean rank" in text and "W4A4 ranks by layer" in text
    assert s["ranks_by_role"]["transformer_blocks.*.attn.to_q"] == {"min": min(q), "mean": sum(q) / 2, "max": max(q),
                                                                     "layers": 2}
    assert s["mean_rank"] == pytest.approx(lowrank / sum(sum(r["shape"]) for r in w4a4), rel=1e-6)


def test_an_interrupted_budget_run_resumes_bit_identical(budget_run):
    result, calib, state = budget_run
    assert (state / "rank-plan.json").is_file()
    for f in sorted(state.glob("block-*.safetensors"))[2:]:
        f.unlink()  # as if stopped after two blocks
    again = run_quantization(tiny_flux(num_layers=2, num_single_layers=2), calib, options=BUDGET_OPTIONS,
                             state_dir=state)
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flux_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def test_fused_qkv_with_unequal_ranks_gives_the_same_output(budget_run):
    from svdq_format import fusion

    model = copy.deepcopy(budget_run[0].model)
    attn = model.transformer_blocks[0].attn
    fusion.install(model)
    with torch.no_grad():
        before = model(**_flux_inputs()).sample
        model.fuse_qkv_projections()
        assert fusion.fused_modules(model)
        ranks = [getattr(attn, n).rank for n in ("to_q", "to_k", "to_v")]
        assert attn.to_qkv.rank == sum(ranks)
        after = model(**_flux_inputs()).sample
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    model.unfuse_qkv_projections()
    assert [getattr(attn, n).rank for n in ("to_q", "to_k", "to_v")] == ranks


def test_lora_on_per_layer_ranks_adds_exactly_its_delta(budget_run):
    from converters.lora import load_lora, unload_all
    from svdq_format.linear import SVDQLinear

    base = budget_run[0].model
    model = copy.deepcopy(base)
    targets = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    assert any(model.get_submodule(n).rank == 0 for n in targets)  # layers without a branch get one too
    g = torch.Generator().manual_seed(2)
    factors = {n: (torch.randn(4, k, generator=g) * 0.05, torch.randn(o, 4, generator=g) * 0.05)
               for n, (o, k) in targets.items()}
    sd = {}
    for n, (a, b) in factors.items():
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = a, b
    load_lora(model, sd, adapter_name="a")
    for n, (a, b) in factors.items():
        got = model.get_submodule(n).dequantize().double() - base.get_submodule(n).dequantize().double()
        want = b.double() @ a.double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7, n
    unload_all(model)
    assert all(torch.equal(t, base.state_dict()[k]) for k, t in model.state_dict().items())


def test_model_output_of_every_output_kind():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from converters.quantize.sensitivity import model_output

    a, b = torch.ones(2, 3), torch.zeros(4)
    assert model_output(Transformer2DModelOutput(sample=a)) is a
    got = model_output(Transformer2DModelOutput(sample=[a, b]))  # Z-Image: a latent per sample
    assert torch.equal(got, torch.cat([a.reshape(-1), b]))
    assert model_output((a, 1)) is a and model_output({"x": a, "y": b}) is a
    with pytest.raises(TypeError, match="cannot find the output tensor of a int"):
        model_output(3)


def test_sensitivity_backward_passes_keep_cudnn_attention_off_on_cuda():
    """The sensitivity pass's SDPA backends (converters/quantize/sensitivity.py): on CUDA every
    backend but cuDNN's while it runs, the user's settings back after; on the CPU nothing changes."""
    import torch

    from converters.quantize.sensitivity import _attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _attention_backends("cuda"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with _attention_backends("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
