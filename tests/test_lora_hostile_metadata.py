"""Hostile LoRA metadata (issue 19 §3): patterns are data, alphas are typed and bounded.

Every case is a real PEFT directory read and normalised by ``read_lora`` + ``normalize_lora``
(what ``load_lora`` and ``svdq lora`` run); a bad file is one ``LoRAError`` line, a good pattern
gives the scale Python's ``re`` (PEFT's matcher) gives.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import save_file

from converters.lora.formats import normalize_lora, read_lora
from converters.lora.patterns import compile_module_pattern
from svdq_format.errors import LoRAError
from tests.lora_fixtures import kohya_lora, tiny_flux

MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.12.proj_out")


def _peft_dir(tmp_path, config: dict, *, rank: int = 4):
    d = tmp_path / "peft"
    d.mkdir(exist_ok=True)
    sd = {}
    for m in MODULES:
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.full((rank, 8), 0.5)
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.full((8, rank), 0.25)
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, **config}))
    return d


def _scales(tmp_path, config: dict) -> dict[str, float]:
    norm = normalize_lora(read_lora(_peft_dir(tmp_path, config)), adapter_name="a")
    return {m: float(d.scales[0]) for m, d in norm.adapter.deltas.items()}


def _error(tmp_path, config: dict) -> str:
    with pytest.raises(LoRAError) as info:
        normalize_lora(read_lora(_peft_dir(tmp_path, config)), adapter_name="a")
    msg = str(info.value)
    assert "\n" not in msg and f"{tmp_path / 'peft'}/" in msg
    return msg


def test_redos_pattern_runs_in_linear_time(tmp_path):
    # Python's re takes exponential time on this pattern against a long dotted name.
    name = "transformer_blocks.0.attn." + "a" * 5000 + ".to_q"
    start = time.perf_counter()
    assert not compile_module_pattern(r"([\w.]+)+!", where="x").matches(name)
    assert not compile_module_pattern(r"(.*a){20}!", where="x").matches("a" * 3000)
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    scales = _scales(tmp_path, {"lora_alpha": 8, "alpha_pattern": {r"([\w.]+)+!": 2, r"(a*)*b": 3}})
    assert time.perf_counter() - start < 10
    assert scales == {m: 2.0 for m in MODULES}  # no pattern applies: lora_alpha 8 / r 4


def test_patterns_agree_with_python_re(tmp_path):
    patterns = [
        "to_q", r"attn\.to_q", r"transformer_blocks\.\d+\.attn\.to_[qk]", r"^single_.*proj_out$", r".*to_(q|k)",
        r"blocks\.[0-9]{1,2}\.attn\.to_k", r"(?:to_q|to_v)", r"[^.]+_out", r"transformer_blocks.0.attn.to_.?",
        r"x*", r"(?P<n>to)_k", "proj", r"\d", r"attn\.to_q+",
    ]
    names = list(MODULES) + ["a.b", "to_q", "attn.to_qq", "blocks.123.attn.to_k", "x.proj_out", "proj_outs"]
    for pat in patterns:
        compiled = compile_module_pattern(pat, where="x")
        py = pat.lstrip("^").removesuffix("$")
        for name in names:
            assert compiled.matches(name) == bool(re.fullmatch(rf"(.*\.)?(?:{py})", name)), (pat, name)


def test_pattern_scales_first_match_wins(tmp_path):
    scales = _scales(tmp_path, {"lora_alpha": 8, "alpha_pattern": {r"attn\.to_[qk]": 12, "to_q": 40,
                                                                     r"\d+\.proj_out": 2}})
    assert scales == {MODULES[0]: 3.0, MODULES[1]: 3.0, MODULES[2]: 0.5}


@pytest.mark.parametrize("pattern, reason", [
    ("(", "missing ')'"), (")", "unbalanced"), ("[a-", "unterminated"), (r"(a)\1", "unsupported escape"),
    ("(?=x)", "unsupported group"), ("a{1000}", "out of range"), ("*a", "nothing to repeat"), ("a**", "multiple"),
    ("a" * 1001, "at most 1000"),
])
def test_bad_patterns_are_one_line_errors(tmp_path, pattern, reason):
    msg = _error(tmp_path, {"lora_alpha": 8, "alpha_pattern": {pattern: 2}})
    assert "alpha_pattern" in msg and reason in msg


@pytest.mark.parametrize("config, reason", [
    ({"lora_alpha": "abc"}, "lora_alpha: must be a number, got str"),
    ({"lora_alpha": {}}, "lora_alpha: must be a number, got dict"),
    ({"lora_alpha": True}, "lora_alpha: must be a number, got bool"),
    ({"lora_alpha": 1e38}, "lora_alpha: 1e+38 is not finite or beyond"),
    ({"lora_alpha": 10 ** 400}, "is not finite or beyond"),
    ({"lora_alpha": float("nan")}, "adapter_config.json: not valid JSON (NaN is not JSON)"),
    ({"lora_alpha": 8, "alpha_pattern": {"to_q": 1e38}}, "alpha_pattern[transformer_blocks.0.attn.to_q]: 1e+38"),
    ({"lora_alpha": 8, "alpha_pattern": {"to_q": [2]}}, "must be a number, got list"),
    ({"lora_alpha": 8, "alpha_pattern": ["to_q"]}, "alpha_pattern: not an object of patterns (got list)"),
    ({"r": "4"}, "r: must be a number, got str"),
])
def test_bad_alphas_are_one_line_errors(tmp_path, config, reason):
    assert reason in _error(tmp_path, config)


def test_kohya_alpha_tensor_bounded():
    sd, _ = kohya_lora(tiny_flux())
    assert normalize_lora(read_lora(sd), adapter_name="k").adapter.deltas  # the fixture's alpha 2: fine
    sd["lora_unet_final_layer_linear.alpha"] = torch.tensor(3e38)
    with pytest.raises(LoRAError, match=r"lora_unet_final_layer_linear\.alpha: .* is not finite or beyond"):
        normalize_lora(read_lora(sd), adapter_name="k")
