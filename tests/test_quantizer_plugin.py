"""The parts the diffusers and transformers quantizer plug-ins share (svdq_format.quantizer_plugin):
both ``quantization_config`` classes and both quantizers behave alike where they should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from svdq_format.diffusers import SVDQuantConfig, SVDQuantizer, _save_pretrained
from svdq_format.errors import UnsupportedError
from svdq_format.transformers import SVDQuantHfConfig, SVDQuantHfQuantizer
from svdq_format.transformers import save_pretrained as hf_save_pretrained

PLUGINS = [(SVDQuantConfig, SVDQuantizer), (SVDQuantHfConfig, SVDQuantHfQuantizer)]


@pytest.mark.parametrize("config_cls, quantizer_cls", PLUGINS)
def test_config_is_its_metadata_json(config_cls, quantizer_cls):
    config = config_cls(layers={}, producer={"name": "tests"}, base_model="tiny/model")
    obj = config.to_dict()
    assert obj == config.metadata.to_json() and obj["base_model"] == "tiny/model"
    assert obj["quant_method"] == "svdquant" and obj["producer"] == {"name": "tests"}
    assert dict(config) == obj and config.to_diff_dict() == obj
    again = config_cls.from_metadata(config.metadata)
    assert type(again) is config_cls and again == config and again.to_dict() == obj
    assert config != config_cls(layers={}, producer={"name": "other"})
    assert repr(config) == f"{config_cls.__name__}(format_version={config.metadata.format_version}, layers=0)"
    with pytest.raises(TypeError):
        hash(config)


def test_configs_of_the_two_libraries_are_not_equal():
    diffusers_config, hf_config = SVDQuantConfig(layers={}), SVDQuantHfConfig(layers={})
    assert diffusers_config.to_dict() == hf_config.to_dict()
    assert diffusers_config != hf_config and hf_config != diffusers_config


@pytest.mark.parametrize("config_cls, quantizer_cls", PLUGINS)
def test_quantizers_share_their_properties_and_refuse_a_dense_load(config_cls, quantizer_cls):
    quantizer = quantizer_cls(config_cls(layers={}), pre_quantized=True)
    assert quantizer.is_trainable is False and quantizer.is_compileable is True
    with pytest.raises(UnsupportedError, match="quantize"):
        quantizer_cls(config_cls(layers={}), pre_quantized=False)


@pytest.mark.parametrize("save", [_save_pretrained, hf_save_pretrained])
def test_save_pretrained_refuses_pickles_and_variants(save, tmp_path):
    with pytest.raises(UnsupportedError, match="safetensors only"):
        save(nn.Linear(2, 2), tmp_path, safe_serialization=False)
    with pytest.raises(UnsupportedError, match="variant='fp16' is not supported"):
        save(nn.Linear(2, 2), tmp_path, variant="fp16")
    assert not any(tmp_path.iterdir())


def test_registration_is_lazy():
    """``import svdq_format`` imports neither library; each registers the moment its quantizer
    registry is imported (one fresh interpreter for both: each import costs seconds; transformers'
    registry first, while diffusers is not imported yet, then diffusers')."""
    code = (
        "import sys, svdq_format\n"
        "for lib in ('diffusers', 'transformers'):\n"
        "    assert lib not in sys.modules, f'import svdq_format pulled in {lib}'\n"
        "from transformers.quantizers import auto\n"
        "assert 'diffusers' not in sys.modules\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['svdquant'].__name__ == 'SVDQuantHfQuantizer'\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['svdquant'].__name__ == 'SVDQuantHfConfig'\n"
        "from diffusers.quantizers import auto\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['svdquant'].__name__ == 'SVDQuantizer'\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['svdquant'].__name__ == 'SVDQuantConfig'\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stderr[-2000:]
