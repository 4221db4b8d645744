"""The loaders check what ``validate`` checks, in the one loading core (issue 19 §2).

Each hostile edit is made to a real model directory (a tiny quantized FLUX written by
``save_pretrained``); then ``validate``, ``load_pretrained`` and diffusers' ``from_pretrained``
(and the CLI, where it reads the file) must all refuse it with one typed line.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svdq_format.checkpoint import open_checkpoint, validate
from svdq_format.cli import main
from svdq_format.errors import FormatError, HeaderError, LoRAError, ManifestError, TensorError
from svdq_format.io import read_header
from svdq_format.model import save_pretrained
from svdq_format.pretrained import load_pretrained
from tests.lora_fixtures import quantize, tiny_flux

WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYER = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("m") / "model"
    save_pretrained(quantize(tiny_flux()), d)
    return d


@pytest.fixture
def copy(model_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    return d


def _rewrite(path: Path, *, tensors=None, metadata=None) -> None:
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if tensors:
        tensors(sd)
    if metadata:
        metadata(meta)
    save_file(sd, str(path), metadata=meta)


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _all_refuse(d: Path, error: type[Exception], needle: str) -> None:
    from diffusers import FluxTransformer2DModel

    for load in (validate, load_pretrained, FluxTransformer2DModel.from_pretrained):
        with pytest.raises(error) as info:
            load(d)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, (load, msg)


def _set(key: str, index, value: float):
    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[index] = value
        sd[key] = t
    return fn


@pytest.mark.parametrize("role, value, needle", [
    ("wscales", float("nan"), "wscales: non-finite or negative scale at index 5"),
    ("smooth", 0.0, "smooth: smoothing factor not finite and positive at index 5"),
    ("lora_up", 3e38, "lora_up: value 3e+38 at index 5 is absurd"),
    ("lora_down", float("inf"), "lora_down: non-finite value at index 5"),
])
def test_bad_values_refused_by_every_loader(copy, role, value, needle):
    _rewrite(copy / WEIGHTS, tensors=_set(f"{LAYER}.{role}", 5, value))
    _all_refuse(copy, TensorError, f"{LAYER}.{needle}")


def test_absurd_act_shift_refused(copy):
    def shift(meta):
        obj = json.loads(meta["svdquant"])
        obj["layers"][LAYER]["act_shift"] = 1e308
        meta["svdquant"] = json.dumps(obj)
    _rewrite(copy / WEIGHTS, metadata=shift)
    _edit_config(copy, lambda cfg: cfg["quantization_config"]["layers"][LAYER].__setitem__("act_shift", 1e308))
    _all_refuse(copy, ManifestError, "act_shift 1e+308 is absurd")


def test_duplicate_keys_in_file_metadata(copy):
    def dup(meta):  # "format_version": 99, "format_version": 1 — the last one would win
        meta["svdquant"] = '{"format_version":99,' + meta["svdquant"].lstrip("{")
    _rewrite(copy / WEIGHTS, metadata=dup)
    with pytest.raises(ManifestError, match="duplicate key 'format_version'"):
        validate(copy)
    with pytest.raises(ManifestError, match="duplicate key 'format_version'"):
        load_pretrained(copy)


def test_duplicate_layer_in_config_refused(copy):
    text = (copy / "config.json").read_text()
    entry = json.dumps(json.loads(text)["quantization_config"]["layers"][LAYER])
    nvfp4 = entry.replace('"int4"', '"nvfp4"')
    text = text.replace(f'"{LAYER}":', f'"{LAYER}": {nvfp4}, "{LAYER}":', 1)
    (copy / "config.json").write_text(text)
    _all_refuse(copy, ManifestError, f"duplicate key '{LAYER}'")


def test_lora_config_duplicate_keys(tmp_path):
    from converters.lora.formats import read_lora

    d = tmp_path / "peft"
    d.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 8),
               "base_model.model.x.lora_B.weight": torch.ones(8, 2)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 1, "lora_alpha": 1e30}')
    with pytest.raises(LoRAError, match="adapter_config.json: not valid JSON \\(duplicate key 'lora_alpha'\\)"):
        read_lora(d)


def test_absurd_shape_refused(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [2**61, 2**61, 0], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(HeaderError, match=r"x: absurd shape \[2305843009213693952, 2305843009213693952, 0\]"):
        read_header(path)


@pytest.mark.parametrize("key, value, needle", [
    ("num_layers", 20000, "num_layers: 20000 blocks, but the tensors hold 3 numbered blocks"),
    ("joint_attention_dim", 2**40, "joint_attention_dim: absurd value 1099511627776"),
    ("joint_attention_dim", 2**20, "joint_attention_dim: 1048576 is absurd"),
    ("_class_name", "AutoModel", "_class_name: 'AutoModel' is not a diffusers model class"),
    ("num_attention_heads", "x", "cannot build FluxTransformer2DModel from this config"),
])
def test_config_sanity_before_anything_is_built(copy, key, value, needle):
    _edit_config(copy, lambda cfg: cfg.__setitem__(key, value))
    start = time.perf_counter()
    with pytest.raises(ManifestError) as info:
        load_pretrained(copy)
    assert time.perf_counter() - start < 20
    assert needle in str(info.value) and "\n" not in str(info.value)
    if key != "_class_name" and not isinstance(value, str):
        with pytest.raises(ManifestError, match=key):
            validate(copy)


def test_deeply_nested_json_is_one_line(copy, capsys):
    (copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    index = copy / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{" + '"a":{' * 100_000 + "}" * 100_001)
    for argv in (["validate", str(copy)], ["inspect", str(copy)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "not valid JSON" in err, err
    index.unlink()
    deep = '{"a":' * 200 + "1" + "}" * 200  # within Python's recursion limit, beyond ours
    (copy / "config.json").write_text(deep)
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        open_checkpoint(copy)


def test_hostile_nunchaku_header_config(tmp_path, capsys):
    from tests.test_nunchaku import build_file

    src = tmp_path / "n.safetensors"
    build_file(src, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    with safe_open(str(src), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    good = json.loads(meta["config"])
    cases = [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (json.dumps({**good, "_class_name": "AutoModel"}), "is not a diffusers model class"),
        (json.dumps({**good, "num_attention_heads": "x"}), "cannot build FluxTransformer2DModel"),
        (json.dumps({**good, "num_layers": 10**6}), "num_layers: 1000000 blocks"),
        (json.dumps([1, 2]), "not a JSON object"),
    ]
    for i, (text, needle) in enumerate(cases):
        bad = tmp_path / f"bad{i}.safetensors"
        save_file(sd, str(bad), metadata={**meta, "config": text})
        assert main(["convert", "--from", "nunchaku", str(bad), str(tmp_path / f"out{i}")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (needle, err)
    with pytest.raises(FormatError):
        from converters.nunchaku.importer import read_nunchaku
        read_nunchaku(tmp_path / "bad0.safetensors")
