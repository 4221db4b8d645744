"""Every diffusers denoiser family (tiny random configs, CPU): ``svdq quantize`` with its synthetic
calibration → ``from_pretrained`` → a diffusers-format LoRA (where diffusers has a LoRA loader for
the family) → unload bit-identical → ``fuse_qkv_projections`` (where the family has it) →
``save_pretrained`` bit-identical."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from converters.quantize import families, select_layers
from converters.quantize.synthetic import synthetic_samples
from svdq_format.cli import main as svdq_main
from svdq_format.linear import SVDQLinear
from svdq_format.model import svdq_modules
from tests.family_fixtures import FAMILIES, build, lora_loader

pytestmark = [pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

#: Fast quantizer settings: the plumbing is under test here (benchmarks/families.py measures fidelity).
FAST = ["--rank", "8", "--num-samples", "2", "--alphas", "0.5", "--activation-alphas", "", "--no-clip-search",
        "--refine", "0", "--calib-rows", "64", "--dtype", "float32", "-q"]


def _output(out):
    o = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    return o[0] if isinstance(o, list) else o


def run(model: nn.Module, sample: dict) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**sample))


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".json")
            and f.name != "fidelity.json"}


def _lora_layers(model: nn.Module, *, rank: int = 4) -> tuple[dict[str, torch.Tensor], int]:
    """A rank-4 LoRA on a W4A4, a W4A16 (when there is one) and a 16-bit linear of ``model`` (module
    names, no prefix), and how many layers it targets."""
    gen = torch.Generator().manual_seed(7)
    chosen: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        kind = mod.kind if isinstance(mod, SVDQLinear) else ("dense" if type(mod) is nn.Linear else None)
        if kind is not None and kind not in chosen:
            chosen[kind] = (name, mod)
    layers = {}
    for name, mod in chosen.values():
        layers[f"{name}.lora_A.weight"] = 0.2 * torch.randn(rank, mod.in_features, generator=gen)
        layers[f"{name}.lora_B.weight"] = 0.2 * torch.randn(mod.out_features, rank, generator=gen)
    return layers, len(chosen)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quantize_load_lora_fuse_save(family, tmp_path):
    import diffusers

    cls_name, _ = FAMILIES[family]
    dense = build(family)
    _, (x,) = synthetic_samples(dense, 1, seed=123, image_tokens=16, text_tokens=8)
    ref = run(dense, x)
    dense.save_pretrained(tmp_path / "dense")
    want = select_layers(dense, warn_unknown=False).kinds

    # svdq quantize (synthetic calibration from the forward signature) -> from_pretrained
    out = tmp_path / "q"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert svdq_main(["quantize", str(tmp_path / "dense"), str(out), *FAST]) == 0
    assert not [w for w in caught if "not an architecture svdquant was tested on" in str(w.message)]
    model = getattr(diffusers, cls_name).from_pretrained(out)
    layers = svdq_modules(model)
    assert {n: m.kind for n, m in layers.items()} == want and "w4a4" in want.values()
    y = run(model, x)
    assert torch.isfinite(y).all() and y.shape == ref.shape
    assert float((y - ref).norm() / ref.norm()) < 0.5

    # a diffusers-format LoRA for the family, written by its own loader -> unload bit-identical
    loader = lora_loader(cls_name)
    if loader is not None:
        from diffusers.loaders import lora_pipeline

        from converters.lora import list_loras, load_lora, unload_all

        mixin = getattr(lora_pipeline, loader)
        component = "unet" if cls_name.startswith("UNet") else "transformer"
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lora, targets = _lora_layers(model)
        mixin.save_lora_weights(tmp_path / "lora", **{f"{component}_lora_layers": lora})
        report = load_lora(model, tmp_path / "lora", adapter_name="style", cache=False)
        assert len(report.layers) == targets and list_loras(model) == {"style": 1.0}
        assert not torch.equal(run(model, x), y)
        unload_all(model)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert torch.equal(run(model, x), y)

    # fuse_qkv_projections where the family has it: same output, unfused back bit for bit
    from svdq_format import fusion

    if hasattr(model, "fuse_qkv_projections") and fusion.install(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fuse_qkv_projections()
        # (attention blocks whose q/k/v were not one input group stay separate, and say so: LTX)
        assert all("their smoothing vectors differ" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert fusion.fused_modules(model)
        fused = run(model, x)
        assert float((fused - y).norm() / y.norm()) < 1e-5
        model.unfuse_qkv_projections()
        assert not fusion.fused_modules(model) and torch.equal(run(model, x), y)

    # save_pretrained writes the very files svdq quantize wrote
    model.save_pretrained(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)


def test_tested_families_list_is_what_the_tests_run():
    tested = {cls for cls, _ in FAMILIES.values()}
    transformers_encoders = {"BertModel", "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"}
    assert families.TESTED_FAMILIES == tested | transformers_encoders


class _Toy(nn.Module):
    """A denoiser-shaped toy: a config, a patch embedder, two identical blocks with attention."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_out = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.to_out(self.to_q(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ff = _Toy.Attention(), nn.Linear(64, 64)

        def forward(self, x):
            return self.ff(self.attn(x))

    def __init__(self):
        super().__init__()
        self.config = {"in_channels": 8}
        self.proj_in, self.proj_out = nn.Linear(8, 64), nn.Linear(64, 8)
        self.layers = nn.ModuleList([_Toy.Block(), _Toy.Block()])

    def embed(self, hidden_states):
        h = self.proj_in(hidden_states)
        for block in self.layers:
            h = block(h)
        return self.proj_out(h)


class _NeedsTokens(_Toy):
    def forward(self, hidden_states, timestep, prior_token_id):  # an argument no convention names
        return self.embed(hidden_states)


class _NoLatent(_Toy):
    def forward(self, input_ids, timestep):
        return input_ids


class _NothingFits(_Toy):
    def forward(self, hidden_states, timestep):
        raise ValueError("expects a 6-D latent")


@pytest.mark.parametrize("toy, reason", [
    (_NeedsTokens, "no rule for its required forward argument 'prior_token_id'"),
    (_NoLatent, "its forward has no latent argument"),
    (_NothingFits, "no latent layout fits its forward (tokens: ValueError: expects a 6-D latent"),
])
def test_a_family_that_cannot_work_says_why_in_one_line(toy, reason):
    from svdq_format.errors import QuantizationError

    with pytest.raises(QuantizationError) as info:
        synthetic_samples(toy(), 1)
    text = str(info.value)
    assert reason in text and "\n" not in text and text.startswith(f"{toy.__name__}: cannot synthesize")
    assert "--calibration FILE" in text  # and what to do instead


def test_an_unknown_architecture_gets_defaults_and_one_warning():
    class Known(_Toy):
        def forward(self, hidden_states, timestep):
            return self.embed(hidden_states)

    model = Known()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, samples = synthetic_samples(model, 2, image_tokens=16)
        from converters.quantize import quantize_model

        quantize_model(model, samples, rank=4, alphas=(0.5,))
    guessed = [w for w in caught if "not an architecture svdquant was tested on" in str(w.message)]
    assert len(guessed) == 1
    assert ("guessed blocks: layers (2); 6 linears W4A4, 0 W4A16 (AdaLN modulation / temporal), 2 kept 16-bit"
            in str(guessed[0].message))
    assert plan.layout == "tokens" and set(svdq_modules(model)) == {f"layers.{i}.{n}" for i in (0, 1)
                                                                    for n in ("attn.to_q", "attn.to_out", "ff")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_roles_match_the_data_flow(family):
    """The structural roles agree with what the layers see: a modulation linear (W4A16 by AdaLN)
    reads one conditioning row per sample, a W4A4 linear reads the tokens."""
    from converters.quantize import collect_stats
    from converters.quantize.families import linear_roles

    model = build(family)
    _, samples = synthetic_samples(model, 1, image_tokens=16, text_tokens=8)
    roles = linear_roles(model)
    quantized = {n: r for n, r in roles.items() if r.kind != "keep"}
    stats = collect_stats(model, {n: model.get_submodule(n) for n in quantized}, samples, max_rows=8)
    for name, role in quantized.items():
        if name not in stats.layers:  # (a branch the sample does not take)
            continue
        rows = stats.layers[name].count
        if role.why.startswith("AdaLN"):
            assert rows == 1, (name, rows)
        elif role.kind == "w4a4":
            assert rows > 1, (name, rows)
