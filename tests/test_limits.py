"""Limits and clear errors: pickle checkpoints refused everywhere, unusable cache directories.

Tests run as root, so ``chmod`` does not deny anything: unwritable places are a path under
``/proc`` (nothing can be created there, even by root), a read-only sysfs directory, and a
regular file where a directory is expected.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import huggingface_hub.hf_api  # noqa: F401  (the hub fixture patches its module-level HfApi)
import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from svdq_format import hub as svdq_hub  # noqa: E402
from svdq_format.checkpoint import load_file, validate  # noqa: E402
from svdq_format.cli import main as cli_main  # noqa: E402
from svdq_format.errors import BackendError, FormatError, HeaderError, HubError, QuantizationError  # noqa: E402
from svdq_format.io import read_header, refuse_pickle  # noqa: E402
from svdq_format.pretrained import load_pretrained  # noqa: E402
from tests.test_hub import hub_fixture  # noqa: E402,F401  (the ``hub`` fixture)

PICKLE_REASON = "never loads pickles"


class _Payload:
    """Unpickling this creates a directory: proof that nobody unpickled the file."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(params=["zip", "legacy"])
def pickle_file(request, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "unpickled"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / ("model.pt" if request.param == "zip" else "pytorch_model.bin")
    torch.save({"weight": torch.ones(2), "x": payload}, path,
               _use_new_zipfile_serialization=request.param == "zip")
    return path, marker


def test_pickle_checkpoints_refused_with_explanation(pickle_file, capsys):
    path, marker = pickle_file
    for fn in (read_header, validate, load_file, load_pretrained, refuse_pickle):
        with pytest.raises(HeaderError, match=PICKLE_REASON) as info:
            fn(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert cli_main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and PICKLE_REASON in err and "\n" not in err
    assert not marker.exists()  # nothing was unpickled


def test_converters_refuse_pickle_inputs(pickle_file):
    from converters.nunchaku.importer import read_nunchaku
    from converters.quantize.calibration import load_calibration

    path, marker = pickle_file
    with pytest.raises(FormatError, match=PICKLE_REASON):
        read_nunchaku(path)
    with pytest.raises(QuantizationError, match=f"{path}: .*{PICKLE_REASON}"):
        load_calibration(path)
    assert not marker.exists()


def test_safetensors_starting_like_a_pickle_is_not_refused(tmp_path):
    """A header of length 0x280 makes a valid file start with the bytes 80 02 (pickle protocol 2)."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (0x280 - len(header))
    path = tmp_path / "odd.bin"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    refuse_pickle(path)  # no error
    assert read_header(path).tensors["t"].shape == (2,)


# --------------------------------------------------------------------------- caches


UNWRITABLE = {
    "under /proc": lambda tmp: Path("/proc/svdq-no-such-cache/cache"),
    "read-only sysfs": lambda tmp: Path("/sys/kernel"),
    "file in the way": lambda tmp: _file(tmp / "a-file") / "cache",
}


def _file(p: Path) -> Path:
    p.write_text("not a directory")
    return p


@pytest.mark.parametrize("where", list(UNWRITABLE))
def test_hub_cache_unwritable_is_a_clear_error(hub, tmp_path, where):
    from tests.hub_helpers import tiny_flux

    tiny_flux().save_pretrained(tmp_path / "m")
    svdq_hub.push_to_hub(tmp_path / "m", "tester/cache", token="t", endpoint=hub.url, retry_wait=0.01)
    cache = UNWRITABLE[where](tmp_path)
    hub.requests.clear()
    with pytest.raises(HubError, match=rf"^pull tester/cache@main: cannot write to the Hub cache "
                                       rf"{cache}/models--tester--cache "
                                       r"\(.+\); pass cache_dir= or set HF_HUB_CACHE") as info:
        svdq_hub.pull("tester/cache", endpoint=hub.url, cache_dir=cache, retry_wait=0.01)
    assert "\n" not in str(info.value)
    assert hub.requests == []  # refused before any download
    # reading an existing read-only cache offline stays possible (only writing needs the check)
    with pytest.raises(HubError, match="pull tester/cache@main: .*cache"):
        svdq_hub.pull("tester/cache", endpoint=hub.url, cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("where", list(UNWRITABLE))
def test_kernel_cache_unwritable_is_a_clear_error(tmp_path, monkeypatch, where):
    pytest.importorskip("cutlass_library")
    from svdq_kernels import build
    from svdq_kernels.configs import CutlassGemmConfig

    cache = UNWRITABLE[where](tmp_path)
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(cache))
    tc = build.Toolchain(nvcc="/opt/cuda/bin/nvcc", nvcc_version="13.0.88", cutlass_version="4.2.0.0",
                         cutlass_dir=str(build.cutlass_source_dir()), arch="sm_90a", torch_version="2.11.0+cuda13.0",
                         svdquant_version="0.1.0")

    def never(cmd, log):  # pragma: no cover - must not be reached
        raise AssertionError("compiler called although the cache is unusable")

    with pytest.raises(BackendError,
                       match=rf"^{cache}: cannot write to the kernel cache directory \(.+\); set SVDQ_KERNEL_CACHE"):
        build.build_kernel(CutlassGemmConfig(), toolchain=tc, compiler=never)


def test_read_only_hub_cache_still_serves_what_it_holds(hub, tmp_path):
    """A complete snapshot in a read-only cache (a real read-only tmpfs) is served online too."""
    import subprocess
    import uuid

    from tests.hub_helpers import tiny_flux

    tiny_flux().save_pretrained(tmp_path / "m")
    svdq_hub.push_to_hub(tmp_path / "m", "tester/ro", token="t", endpoint=hub.url, retry_wait=0.01)
    mnt = Path("/tmp") / f"svdq-ro-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        first = svdq_hub.pull("tester/ro", endpoint=hub.url, cache_dir=mnt, retry_wait=0.01)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        hub.requests.clear()
        again = svdq_hub.pull("tester/ro", endpoint=hub.url, cache_dir=mnt, retry_wait=0.01)
        assert again == first and hub.requests == []
        assert torch.equal(load_pretrained(again).state_dict()["proj_out.qweight"],
                           load_pretrained(tmp_path / "m").state_dict()["proj_out.qweight"])
        with pytest.raises(HubError, match=r"cannot write to the Hub cache .*Read-only file system"):
            svdq_hub.pull("tester/cache-missing", endpoint=hub.url, cache_dir=mnt, retry_wait=0.01)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    from svdq_format.model import save_pretrained
    from tests.lora_fixtures import quantize, tiny_flux

    d = tmp_path_factory.mktemp("q") / "model"
    save_pretrained(quantize(tiny_flux()), d)
    return d


def _as_pickle(src: Path, dst: Path, *, sharded: bool) -> Path:
    """A copy of the quantized directory whose weights are a ``torch.save`` pickle (with a payload)."""
    from safetensors.torch import load_file as st_load

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = st_load(str(src / "diffusion_pytorch_model.safetensors"))
    payload = _Payload()
    payload.marker = str(dst / "unpickled")
    if sharded:  # an index naming .bin shards
        keys = sorted(sd)
        half = len(keys) // 2
        names = ["diffusion_pytorch_model-00001-of-00002.bin", "diffusion_pytorch_model-00002-of-00002.bin"]
        for name, part in zip(names, (keys[:half], keys[half:])):
            torch.save({k: sd[k] for k in part}, dst / name)
        index = {"metadata": {}, "weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}
        (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        return dst / names[0]
    torch.save(sd, dst / "diffusion_pytorch_model.bin")
    return dst / "diffusion_pytorch_model.bin"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diffusers_from_pretrained_refuses_pickle_weights(quantized_dir, tmp_path, sharded):
    from diffusers import FluxTransformer2DModel

    bad = _as_pickle(quantized_dir, tmp_path / "pickled", sharded=sharded)
    with pytest.raises(HeaderError, match=PICKLE_REASON) as info:
        FluxTransformer2DModel.from_pretrained(bad.parent)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    # the safetensors original still loads through the same guarded loader
    assert FluxTransformer2DModel.from_pretrained(quantized_dir).config.num_layers == 1


def test_quantize_refuses_a_pickle_source(tmp_path, capsys):
    from safetensors.torch import load_file as st_load

    from tests.lora_fixtures import tiny_flux

    src = tmp_path / "dense"
    tiny_flux().save_pretrained(src)
    weights = src / "diffusion_pytorch_model.safetensors"
    torch.save(st_load(str(weights)), src / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert cli_main(["quantize", str(src), str(tmp_path / "out"), "--num-samples", "1"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {src / 'diffusion_pytorch_model.bin'}: weights are not safetensors: svdquant never loads "
                   "pickles (unpickling can run arbitrary code); convert them to .safetensors with a tool you trust\n")
    assert not (tmp_path / "out").exists()
