"""Output paths that destroy data are refused before anything is written (issue 19 §4).

Every case runs the real ``svdq`` command (or the function behind it) and checks the refusal is
one ``error:`` line and that the inputs and the existing output are byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from converters.lora.formats import read_lora
from svdq_format.cli import main
from svdq_format.errors import LoRAError, OutputError
from svdq_format.outputs import check_output
from tests.test_nunchaku import build_file, tiny_flux


def _tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` → its sha256 (the bytes a refusal must leave alone)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def nunchaku_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nunchaku") / "flux.safetensors"
    build_file(path, precision="int4", dialect="flux-cpp", dtype=torch.bfloat16)
    return path


def test_convert_refuses_non_empty_and_file_outputs(tmp_path, capsys, nunchaku_file):
    ours = tmp_path / "ours"
    assert main(["convert", "--from", "nunchaku", str(nunchaku_file), str(ours)]) == 0
    capsys.readouterr()
    before = _tree(ours)
    # an existing model (ours or anyone's) is not replaced without --overwrite
    err = _fails(capsys, ["convert", "--from", "nunchaku", str(nunchaku_file), str(ours)])
    assert f"{ours}: directory is not empty (config.json, diffusion_pytorch_model.safetensors); pass --overwrite" in err
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert "directory is not empty (notes.txt)" in _fails(capsys, ["convert", "--from", "nunchaku",
                                                                   str(nunchaku_file), str(user)])
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    # an existing file where a directory goes: one line, no traceback
    (tmp_path / "afile").write_text("keep")
    assert "afile: exists and is not a directory" in _fails(
        capsys, ["convert", "--from", "nunchaku", str(nunchaku_file), str(tmp_path / "afile")])
    assert (tmp_path / "afile").read_text() == "keep"
    assert "afile: exists and is not a directory" in _fails(
        capsys, ["convert", "--to", "nunchaku-lite", str(ours), str(tmp_path / "afile")])
    # the export must not write into the model it reads
    target = ours / "diffusion_pytorch_model.safetensors"
    err = _fails(capsys, ["convert", "--to", "nunchaku", str(ours), str(target)])
    assert f"{target}: lies inside the input {ours}" in err
    assert "is the input" in _fails(capsys, ["convert", "--to", "nunchaku-lite", str(ours), str(ours)])
    assert "lies inside the input" in _fails(capsys, ["convert", "--to", "nunchaku-lite", str(ours),
                                                      str(ours / "lite")])
    assert "contains the input" in _fails(capsys, ["convert", "--to", "nunchaku-lite", str(ours), str(tmp_path)])
    assert _tree(ours) == before
    # --overwrite replaces the model
    assert main(["convert", "--from", "nunchaku", str(nunchaku_file), str(ours), "--overwrite"]) == 0


def test_quantize_refuses_its_source_and_foreign_directories(tmp_path, capsys):
    src = tmp_path / "flux"
    tiny_flux(64).save_pretrained(src)
    before = _tree(src)
    assert "is the input" in _fails(capsys, ["quantize", str(src), str(src)])
    assert "lies inside the input" in _fails(capsys, ["quantize", str(src), str(src / "q")])
    assert "is the input" in _fails(capsys, ["quantize", str(src), str(tmp_path / "." / "flux" / ".." / "flux")])
    assert _tree(src) == before and not (src / "q").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.bin").write_bytes(b"x")
    assert "directory is not empty (x.bin)" in _fails(capsys, ["quantize", str(src), str(tmp_path / "out")])
    (tmp_path / "f").write_text("keep")
    assert "f: exists and is not a directory" in _fails(capsys, ["quantize", str(src), str(tmp_path / "f")])


def test_resume_state_is_ours(tmp_path):
    out = tmp_path / "out"
    (out / ".svdq-state").mkdir(parents=True)
    (out / ".config.json.abc.tmp").write_text("")
    assert check_output(out, [], directory=True) == out  # an interrupted run of ours: resumable
    (out / "README.md").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        check_output(out, [], directory=True)
    assert check_output(out, [], directory=True, overwrite=True) == out
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        check_output(out, [], directory=False)


def test_lora_outputs_and_weight_name(tmp_path, capsys):
    d = tmp_path / "loras"
    d.mkdir()
    sd = {"transformer.x.lora_A.weight": torch.ones(2, 8), "transformer.x.lora_B.weight": torch.ones(8, 2)}
    save_file(sd, str(d / "a.safetensors"))
    save_file(sd, str(tmp_path / "outside.safetensors"))
    with pytest.raises(LoRAError, match=r"weight_name '\.\./outside\.safetensors' leaves the LoRA directory"):
        read_lora(d, weight_name="../outside.safetensors")
    with pytest.raises(LoRAError, match="leaves the LoRA directory"):
        read_lora(d, weight_name=str(tmp_path / "outside.safetensors"))
    (d / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(LoRAError, match="leaves the LoRA directory"):
        read_lora(d, weight_name="link.safetensors")
    assert set(read_lora(d, weight_name="a.safetensors").state_dict) == set(sd)
    # svdq lora / extract-lora never write over their inputs
    lora = d / "a.safetensors"
    before = lora.read_bytes()
    assert "is the input" in _fails(capsys, ["lora", str(tmp_path / "base"), str(lora), "--out", str(lora)])
    assert "is the input" in _fails(capsys, ["extract-lora", str(lora), str(tmp_path / "outside.safetensors"),
                                             "--rank", "1", "--out", str(lora)])
    assert lora.read_bytes() == before
    (tmp_path / "empty").mkdir()
    assert "is a directory" in _fails(capsys, ["extract-lora", str(lora), str(tmp_path / "outside.safetensors"),
                                               "--rank", "1", "--out", str(tmp_path / "empty")])
