"""Reading a safetensors file straight onto a CUDA device (svdq_format.device_read)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from svdq_format import device_read
from svdq_format.io import read_header


def test_cpu_device_is_refused(tmp_path):
    save_file({"a": torch.zeros(4)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        device_read.read_to_device(read_header(tmp_path / "f.safetensors"), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [4096, 8 << 20])
def test_device_read_is_bit_identical_to_the_cpu_read(tmp_path, monkeypatch, chunk):
    """Mixed dtypes, an empty tensor, and (with a 4 KiB chunk) many more chunks than staging
    buffers."""
    monkeypatch.setattr(device_read, "_CHUNK", chunk)
    monkeypatch.setattr(device_read, "_staging", [])
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a_odd": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),
        "b_bf16": torch.randn(300, 77, generator=g).bfloat16(),
        "c_empty": torch.zeros(0, 5),
        "d_f32": torch.randn(1000, 33, generator=g),
        "e_f8": torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    got = device_read.read_to_device(read_header(path), "cuda")
    assert list(got) == list(read_header(path).tensors)
    for name, t in tensors.items():
        assert got[name].is_cuda and got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].cpu().view(torch.uint8), t.view(torch.uint8)), name


def _write_in_order(path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the tensors in the given order (the safetensors writer sorts by
    alignment, so it never puts a 2-byte tensor at an odd offset; other writers may)."""
    names = {torch.uint8: "U8", torch.bfloat16: "BF16"}
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.gpu
def test_a_tensor_at_an_odd_offset_gets_its_own_aligned_copy(tmp_path):
    tensors = {"odd": torch.arange(7, dtype=torch.uint8), "w": torch.randn(5, 3).bfloat16()}
    path = tmp_path / "odd.safetensors"
    _write_in_order(path, tensors)
    assert read_header(path).tensors["w"].begin == 7
    got = device_read.read_to_device(read_header(path), "cuda")
    assert torch.equal(got["odd"].cpu(), tensors["odd"])
    assert torch.equal(got["w"].cpu(), tensors["w"])


@pytest.mark.gpu
def test_a_subset_reads_only_those_tensors_bit_identically(tmp_path, monkeypatch):
    """``names=``: given order, each packed at a 256-byte aligned offset, many chunks per tensor."""
    monkeypatch.setattr(device_read, "_CHUNK", 4096)
    monkeypatch.setattr(device_read, "_staging", [])
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(37 * (i + 1), 29, generator=g).bfloat16() for i in range(6)}
    tensors["odd"] = torch.arange(7, dtype=torch.uint8)
    path = tmp_path / "s.safetensors"
    _write_in_order(path, tensors)
    want = ["t4", "odd", "t1"]
    got = device_read.read_to_device(read_header(path), "cuda", names=want)
    assert list(got) == want
    for name in want:
        assert torch.equal(got[name].cpu().view(torch.uint8), tensors[name].view(torch.uint8)), name
        assert got[name].data_ptr() % 256 == 0, name
    with pytest.raises(KeyError, match="nope"):
        device_read.read_to_device(read_header(path), "cuda", names=["nope"])
