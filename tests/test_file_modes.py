"""Files and directories svdquant writes get what a plain ``open(path, "w")`` / ``mkdir`` gives:
``0o666 & ~umask`` and ``0o777 & ~umask`` (issue 26: the atomic writer's ``mkstemp`` made every
checkpoint 0600, unreadable to a server running as another user).

Each writer runs under umask 022 (the usual one), 077 (private) and 002 (group-writable, shared
machines); every path it leaves behind is checked.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

import svdq_format as sf
from svdq_format.cli import main as svdq_main
from svdq_format.io import atomic_write
from svdq_format.model import save_model_dir, save_model_file, save_pretrained, save_single_file
from tests.hub_helpers import tiny_flux

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def wrong_modes(root: Path, umask: int) -> dict[str, str]:
    """Paths under ``root`` (itself included) whose mode is not what open()/mkdir() would give."""
    bad = {}
    for p in [root, *sorted(root.rglob("*"))]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode != want:
            bad[str(p.relative_to(root))] = f"{mode:03o} (want {want:03o})"
    return bad


@pytest.fixture(scope="module")
def model():
    return tiny_flux(rank=4)


def test_atomic_write_gives_the_umask_mode_also_over_an_older_file(umask, tmp_path):
    target = tmp_path / "out" / "f.json"
    target.parent.mkdir()
    atomic_write(target, lambda tmp: Path(tmp).write_text("one"))
    assert wrong_modes(tmp_path / "out", umask) == {}
    target.chmod(0o600)  # e.g. written by an older version
    atomic_write(target, lambda tmp: Path(tmp).write_text("two"), durable=False)
    assert target.read_text() == "two" and wrong_modes(tmp_path / "out", umask) == {}


def test_checkpoint_writers_follow_the_umask(umask, model, tmp_path):
    from converters.quantize.report import FidelityReport

    out = tmp_path / "out"
    save_pretrained(model, out / "sharded", max_shard_size="200KB")  # shards + index + config
    assert (out / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    save_pretrained(model, out / "single")
    save_model_dir(model, out / "nested" / "dir")
    save_single_file(model, out / "model.safetensors")
    save_model_file(model, out / "model-file.safetensors")
    layer = next(m for m in model.modules() if isinstance(m, sf.SVDQLinear))
    sf.save_file({"l": layer}, out / "layer.safetensors")
    FidelityReport(layers=[], skipped={}, options={}, timings={}, calibration={}, environment={}).save(
        out / "single" / "fidelity.json")
    assert wrong_modes(out, umask) == {}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=lambda m: f"umask{m:03o}", indirect=True)
def test_svdq_quantize_output_and_state_follow_the_umask(umask, tmp_path):
    from tests.quantize_fixtures import tiny_flux as dense_flux

    src, out = tmp_path / "flux", tmp_path / "out" / "flux-svdq"
    dense_flux().save_pretrained(src)
    assert svdq_main(["quantize", str(src), str(out), "--rank", "4", "--num-samples", "1", "--dtype", "float32",
                      "--alphas", "0.5", "--no-clip-search", "--keep-state", "-q"]) == 0
    assert (out / "fidelity.json").is_file() and any((out / ".svdq-state").iterdir())
    assert wrong_modes(tmp_path / "out", umask) == {}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=lambda m: f"umask{m:03o}", indirect=True)
def test_lora_delta_and_cache_follow_the_umask(umask, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from converters.lora import load_lora
    from tests.lora_fixtures import lora_targets, peft_state_dict, quantize, random_factors
    from tests.lora_fixtures import tiny_flux as dense_flux

    monkeypatch.setenv("SVDQ_CACHE", str(tmp_path / "out" / "cache"))
    dense = dense_flux()
    base = quantize(dense, rank=4)
    save_model_dir(base, tmp_path / "base")
    save_file(peft_state_dict(random_factors(lora_targets(dense), rank=2)), str(tmp_path / "lora.safetensors"))
    assert svdq_main(["lora", str(tmp_path / "base"), str(tmp_path / "lora.safetensors"),
                      "--out", str(tmp_path / "out" / "delta.safetensors")]) == 0
    load_lora(base, tmp_path / "lora.safetensors", adapter_name="a", cache=True)  # cache entry + hash memo
    cache = tmp_path / "out" / "cache" / "lora"
    assert any(cache.glob("*.safetensors")) and any((cache / "hashes").iterdir())
    assert wrong_modes(tmp_path / "out", umask) == {}


def test_kernel_build_cache_follows_the_umask(umask, tmp_path, monkeypatch):
    pytest.importorskip("cutlass_library")
    from svdq_kernels import build
    from svdq_kernels.configs import CutlassGemmConfig

    def fake_nvcc(cmd, log: Path) -> None:
        Path(cmd[-1]).write_bytes(b"\x7fELF fake library")
        log.write_text("ok")

    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(tmp_path / "out" / "kernels"))
    toolchain = build.Toolchain(
        nvcc="/opt/cuda/bin/nvcc", nvcc_version="13.0.88", cutlass_version="4.2.0.0",
        cutlass_dir=str(build.cutlass_source_dir()), arch="sm_90a", torch_version="2.11.0+cuda13.0",
        svdquant_version="0.1.0")
    result = build.build_kernel(CutlassGemmConfig(), toolchain=toolchain, compiler=fake_nvcc)
    assert result.path.is_file() and not result.cached
    assert {p.suffix for p in result.path.parent.iterdir()} == {".so", ".cu", ".json", ".lock"}
    assert wrong_modes(tmp_path / "out", umask) == {}


def test_the_library_never_creates_files_with_mkstemp():
    """``tempfile.mkstemp`` makes a 0600 file whatever the umask: writers go through ``atomic_write``."""
    found = []
    for package in ("svdq_format", "svdq_kernels", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("mkstemp", "NamedTemporaryFile"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []



def test_a_durable_write_syncs_the_file_then_its_directory(tmp_path, monkeypatch):
    """``atomic_write`` fsyncs the new file and, after the rename, the directory that holds it
    (``io.fsync_dir``, which the directory commit uses too); ``durable=False`` syncs neither."""
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(tmp_path / "a.txt", lambda p: Path(p).write_text("x"))
    assert synced == ["file", "dir"] and (tmp_path / "a.txt").read_text() == "x"
    synced.clear()
    atomic_write(tmp_path / "b.txt", lambda p: Path(p).write_text("y"), durable=False)
    assert synced == []


def test_write_tensors_sorts_the_metadata_so_equal_files_are_equal_bytes(tmp_path):
    """safetensors writes ``__metadata__`` from a hash map (its order changes from process to
    process); ``write_tensors`` leaves the entries sorted, so a file's bytes depend only on its
    content — what makes ``svdq extract-lora`` / LoRA deltas / calibration sets / Nunchaku exports
    reproducible."""
    import json
    import struct

    import torch

    from svdq_format.io import write_tensors

    keys = [f"key{i}" for i in (7, 3, 9, 1, 5, 0, 8, 2)]  # 8 entries: hash order ≠ sorted order, except by 1/8! luck
    write_tensors(tmp_path / "a.safetensors", {"x": torch.arange(4.0)}, metadata={k: k for k in keys})
    write_tensors(tmp_path / "b.safetensors", {"x": torch.arange(4.0)}, metadata={k: k for k in reversed(keys)})
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert list(json.loads(raw[8:8 + n])["__metadata__"]) == sorted(keys)
    assert raw == (tmp_path / "b.safetensors").read_bytes()


def test_plain_tensor_files_are_written_through_write_tensors():
    """No module calls safetensors' ``save_file`` itself except ``svdq_format.io`` (one writer:
    atomic, metadata sorted)."""
    found = []
    for package in ("svdq_format", "svdq_kernels", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() == "svdq_format/io.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "safetensors.torch" and any(
                        a.name == "save_file" for a in node.names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
