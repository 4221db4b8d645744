"""Clear errors, and no damage, when writing is impossible: disk full, read-only, missing dir."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from svdq_format import SVDQLinear, WriteError, load_file, save_file


def layer():
    return SVDQLinear.from_linear(torch.nn.Linear(256, 256), rank=8)


@pytest.fixture
def small_tmpfs():
    """A real 256 KiB filesystem (needs root and mount; skipped where unavailable)."""
    mnt = Path("/tmp") / f"svdq-full-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)
    mnt.rmdir()


def test_disk_full_keeps_previous_file(small_tmpfs):
    path = small_tmpfs / "ckpt.safetensors"
    first = layer()
    save_file({"a": first}, path)
    before = path.read_bytes()
    with pytest.raises(WriteError, match="No space left on device") as info:
        save_file({"a": layer()}, path, extra_tensors={"big": torch.zeros(200_000)})
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(small_tmpfs) == ["ckpt.safetensors"]  # no temp file left
    x = torch.randn(2, 256)
    assert torch.equal(load_file(path)["a"](x), first(x))


def test_read_only_directory():
    target = Path("/sys/kernel/svdq-test.safetensors")  # read-only even for root
    if not target.parent.is_dir():
        pytest.skip("no /sys/kernel")
    with pytest.raises(WriteError, match="Permission denied|Read-only"):
        save_file({"a": layer()}, target)


def test_missing_directory(tmp_path):
    with pytest.raises(WriteError, match="No such file or directory"):
        save_file({"a": layer()}, tmp_path / "nope" / "x.safetensors")
