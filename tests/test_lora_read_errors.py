"""What a user sees when a LoRA cannot be read: one ``LoRAError`` line naming the file and the reason."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from converters.lora.formats import read_lora
from svdq_format.errors import LoRAError

A, B = "transformer.x.lora_A.weight", "transformer.x.lora_B.weight"


def _lora(path, scale: float = 1.0) -> None:
    save_file({A: torch.full((4, 64), scale), B: torch.ones(64, 4)}, str(path))


def _error(source, **kw) -> str:
    with pytest.raises(LoRAError) as info:
        read_lora(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_directory_file_choice(tmp_path):
    (tmp_path / "one").mkdir()
    _lora(tmp_path / "one" / "style.safetensors")
    raw = read_lora(tmp_path / "one")  # the only .safetensors file
    assert raw.path.endswith("style.safetensors") and set(raw.state_dict) == {A, B}

    (tmp_path / "two").mkdir()
    _lora(tmp_path / "two" / "a.safetensors", 1.0)
    _lora(tmp_path / "two" / "b.safetensors", 2.0)
    msg = _error(tmp_path / "two")
    assert msg == f"{tmp_path / 'two'}: several .safetensors files (a.safetensors, b.safetensors); pass weight_name"
    raw = read_lora(tmp_path / "two", weight_name="b.safetensors")
    assert float(raw.state_dict[A][0, 0]) == 2.0
    assert _error(tmp_path / "two", weight_name="c.safetensors") == f"{tmp_path / 'two'}: no file 'c.safetensors'"

    _lora(tmp_path / "two" / "pytorch_lora_weights.safetensors", 3.0)  # diffusers' name wins over the others
    assert float(read_lora(tmp_path / "two").state_dict[A][0, 0]) == 3.0


def test_pickles_are_refused_never_loaded(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lora.bin").write_bytes(b"not read")
    (tmp_path / "old" / "lora.ckpt").write_bytes(b"not read")
    assert _error(tmp_path / "old") == f"{tmp_path / 'old'}: no .safetensors LoRA file (only pickles: " \
        "lora.bin, lora.ckpt; refused)"
    assert "pickled checkpoints are refused" in _error(tmp_path / "old" / "lora.bin")
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty") == f"{tmp_path / 'empty'}: no .safetensors LoRA file"


def test_broken_files_and_configs(tmp_path):
    good = tmp_path / "good.safetensors"
    _lora(good)
    blob = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    assert _error(tmp_path / "cut.safetensors").startswith(f"{tmp_path / 'cut.safetensors'}: cannot read safetensors")
    (tmp_path / "lora.txt").write_bytes(blob)
    assert _error(tmp_path / "lora.txt") == f"{tmp_path / 'lora.txt'}: not a .safetensors file"
    save_file({}, str(tmp_path / "none.safetensors"))
    assert _error(tmp_path / "none.safetensors") == f"{tmp_path / 'none.safetensors'}: the file holds no tensors"
    assert _error(tmp_path / "missing.safetensors") == f"{tmp_path / 'missing.safetensors'}: no such file or directory"

    peft = tmp_path / "peft"
    peft.mkdir()
    _lora(peft / "adapter_model.safetensors")
    (peft / "adapter_config.json").write_text("{not json")
    assert _error(peft).startswith(f"{peft / 'adapter_config.json'}: not valid JSON (Expecting")
    assert _error(peft / "adapter_model.safetensors").startswith(f"{peft / 'adapter_config.json'}: not valid JSON")
    (peft / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    raw = read_lora(peft)
    assert raw.peft_dir and raw.config == {"r": 4, "lora_alpha": 8}

    assert _error({A: torch.ones(1), B: [1.0]}) == "<dict>: every value must be a tensor"
