"""diffusers' LoRA API on a pipeline whose transformer is an SVDQuant one: a FluxPipeline built
from the tiny random transformer (no VAE / text encoders: the LoRA API does not need them)."""

from __future__ import annotations

import copy

import pytest
from safetensors.torch import save_file

from converters.lora import enable_diffusers_lora, list_loras
from svdq_format.errors import LoRAError
from tests import lora_fixtures
from tests.lora_fixtures import (
    assert_deltas,
    factors_expected,
    kohya_lora,
    lora_targets,
    peft_state_dict,
    random_factors,
    same_tensors,
    snapshot,
)

# the LoRA tests' shared pytest fixtures (tests/lora_fixtures.py)
isolated_cache = lora_fixtures.isolated_cache
models = lora_fixtures.models


def _pipe(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return enable_diffusers_lora(pipe)


def test_pipeline_load_set_adapters_delete_unload(models, tmp_path):
    dense, qbase = models
    q = copy.deepcopy(qbase)
    pipe = _pipe(q)
    f = random_factors(lora_targets(dense), rank=4)
    save_file(peft_state_dict(f), str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe.load_lora_weights(str(tmp_path), adapter_name="style")
    sd, kohya_expected = kohya_lora(dense)
    sd = {k: v for k, v in sd.items() if "final_layer" not in k}  # see docs/lora.md (diffusers alpha slip)
    pipe.load_lora_weights(sd, adapter_name="kohya")
    assert pipe.get_list_adapters() == {"transformer": ["style", "kohya"]}

    pipe.set_adapters(["style", "kohya"], adapter_weights=[0.5, 2.0])
    want = factors_expected(f, 0.5)
    for n, w in kohya_expected.items():
        if n not in ("proj_out", "norm_out.linear"):
            want[n] = want.get(n, 0) + 2.0 * w
    assert_deltas(q, qbase, want)
    assert list_loras(q) == {"style": 0.5, "kohya": 2.0}

    pipe.set_adapters("style")  # diffusers semantics: the others are disabled
    assert_deltas(q, qbase, factors_expected(f))
    pipe.delete_adapters("kohya")
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    with pytest.raises(LoRAError, match="fuse_lora is not available"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not list_loras(q) and not hasattr(q, "peft_config")
    assert same_tensors(snapshot(q), snapshot(qbase))


def test_transformer_level_load_lora_adapter(models, tmp_path):
    dense, qbase = models
    q = enable_diffusers_lora(copy.deepcopy(qbase))
    f = random_factors(lora_targets(dense), rank=4, seed=7)
    path = tmp_path / "l.safetensors"
    save_file(peft_state_dict(f), str(path))
    q.load_lora_adapter(str(path), adapter_name="x")
    q.set_adapters(["x"], weights=[0.25])
    assert_deltas(q, qbase, factors_expected(f, 0.25))
    q.disable_lora()
    assert list_loras(q) == {"x": 0.0}
    q.enable_lora()
    assert list_loras(q) == {"x": 1.0}
    q.unload_lora()
    assert same_tensors(snapshot(q), snapshot(qbase))
