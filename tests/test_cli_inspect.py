"""`svdq inspect` / `svdq --version` and model-directory validation."""

from __future__ import annotations

import json
import os

import pytest
import torch

import svdq_format
from svdq_format import SVDQLinear, save_file, validate
from svdq_format.cli import main
from svdq_format.errors import FormatError, ManifestError
from svdq_format.io import atomic_write


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"svdquant {svdq_format.__version__}"


def test_inspect_reports_counts_bits_and_compression(tmp_path, capsys):
    lin = torch.nn.Linear(256, 128).to(torch.bfloat16)
    layers = {
        "a": SVDQLinear.from_linear(lin, rank=32),
        "b": SVDQLinear.from_linear(lin, rank=16, precision="nvfp4"),
        "c": SVDQLinear.from_linear(lin, rank=0, kind="w4a16"),
    }
    norm = torch.ones(256, dtype=torch.bfloat16)
    path = tmp_path / "m.safetensors"
    save_file(layers, path, extra_tensors={"norm.weight": norm})
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format_version"] == 1 and s["layers"] == 3
    assert s["by_kind"] == {"w4a4/int4": 1, "w4a4/nvfp4": 1, "w4a16/int4": 1}
    assert s["ranks"] == {"0": 1, "16": 1, "32": 1}
    assert s["group_sizes"] == [16, 64]
    assert s["quantized_params"] == 3 * 256 * 128
    # bytes computed independently from the spec's shapes
    n, k = 128, 256
    per = {
        "a": n * k // 2 + n * (k // 64) * 2 + k * 2 + (32 * k + n * 32) * 2 + n * 2,
        "b": n * k // 2 + n * (k // 16) + 4 + k * 2 + (16 * k + n * 16) * 2 + n * 2,
        "c": n * k // 2 + n * (k // 64) * 2 + k * 2 + n * 2,
    }
    assert s["quantized_bytes"] == sum(per.values())
    assert s["other_tensors"] == 1 and s["other_bytes"] == 512
    assert s["bits_per_param"] == pytest.approx(8 * sum(per.values()) / (3 * n * k))
    assert s["compression_vs_bf16"] == pytest.approx((3 * (n * k + n) * 2 + 512) / (sum(per.values()) + 512))
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "w4a4/int4 x1" in text and "bits/param" in text and "smaller than bf16" in text


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp file left behind


def test_save_file_failure_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    lin = torch.nn.Linear(64, 8)
    save_file({"a": SVDQLinear.from_linear(lin, rank=4)}, path)
    before = path.read_bytes()
    with pytest.raises(FormatError):  # name collision is detected before anything is written
        save_file({"a": SVDQLinear.from_linear(lin, rank=4)}, path, extra_tensors={"a.qweight": torch.zeros(1)})
    assert path.read_bytes() == before


def test_directory_validation(tmp_path):
    from svdq_format.model import save_model_dir

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    model[0] = SVDQLinear.from_linear(model[0], rank=8)
    save_model_dir(model, tmp_path / "m", config={"_class_name": "Sequential"})
    meta = validate(tmp_path / "m")
    assert list(meta.layers) == ["0"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "svdquant"
    # config.json that disagrees with the weights is caught
    cfg["quantization_config"]["layers"]["0"]["rank"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="disagrees"):
        validate(tmp_path / "m")


def test_saving_with_runtime_lora_attached_is_refused(tmp_path):
    from svdq_format.lora import LoraAdapter, LoraDelta, attach_lora, plan_lora, unload_all

    model = torch.nn.Sequential(SVDQLinear.from_linear(torch.nn.Linear(128, 64), rank=8))
    delta = LoraDelta(down=torch.randn(4, 128), up=torch.randn(64, 4), scales=torch.ones(4))
    attach_lora(model, plan_lora(model, LoraAdapter("style", {"0": delta})))
    path = tmp_path / "m.safetensors"
    with pytest.raises(FormatError, match="runtime LoRA ranks are attached"):
        save_file({"0": model[0]}, path)
    assert not path.exists()
    unload_all(model)
    save_file({"0": model[0]}, path)
    validate(path)


def test_inspect_and_validate_word_a_bad_path_the_same(tmp_path, capsys):
    """Missing path, empty directory, a text file: one identical line from both commands."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello world, not tensors\n")
    expected = {
        "nope": "no such file or directory",
        "nope.safetensors": "no such file or directory",
        "empty": "directory holds no .safetensors files",
        "notes.txt": "not a safetensors file (it starts with text 'hello wo')",
    }
    for name, reason in expected.items():
        lines = []
        for command in ("inspect", "validate"):
            assert main([command, str(tmp_path / name)]) == 1
            lines.append(capsys.readouterr().err)
        assert lines[0] == lines[1] == f"error: {tmp_path / name}: {reason}\n"


def test_every_command_has_a_summary_and_every_option_a_help_text():
    import argparse

    from svdq_format.cli import build_parser

    def subcommands(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    yield name, sub, helps.get(name)

    missing = []
    todo = [("svdq", build_parser())]
    while todo:
        path, parser = todo.pop()
        for name, sub, listed in subcommands(parser):
            todo.append((f"{path} {name}", sub))
            if not listed or not sub.description:  # `svdq --help` line, `svdq NAME --help` summary
                missing.append(f"{path} {name}")
        missing += [f"{path} {a.option_strings or a.dest}" for a in parser._actions
                    if a.help is None and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
