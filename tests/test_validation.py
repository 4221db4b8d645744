"""Every corrupt-file case docs/format.md §9 rules out: `validate`, `load_file` and the CLI."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file as st_save

from svdq_format import SVDQLinear, load_file, save_file, validate
from svdq_format.cli import main
from svdq_format.errors import FormatError, HeaderError, ManifestError, TensorError, VersionError
from svdq_format.spec import FORMAT_VERSION


def make_layers():
    lin = torch.nn.Linear(128, 32)
    return {
        "blk.q": SVDQLinear.from_linear(lin, rank=8, dtype=torch.bfloat16),
        "blk.f": SVDQLinear.from_linear(lin, rank=0, precision="nvfp4", dtype=torch.bfloat16),
    }


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(make_layers(), path)
    return path


def split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path, header, data, *, header_text=None):
    text = header_text if header_text is not None else json.dumps(header)
    hb = text.encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def tensors_and_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def edit_meta(path, fn):
    header, data = split(path)
    meta = json.loads(header["__metadata__"]["svdquant"])
    fn(meta)
    header["__metadata__"]["svdquant"] = json.dumps(meta)
    join(path, header, data)


def resave(path, fn):
    tensors, meta = tensors_and_meta(path)
    fn(tensors)
    st_save(tensors, str(path), metadata=meta)


# each case: (name, corrupt(path), expected error type, substring of the key/reason)
CASES = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-100]), HeaderError, "truncated"),
    ("truncated-in-header", lambda p: p.write_bytes(p.read_bytes()[:40]), HeaderError, "exceeds the file size"),
    ("tiny-file", lambda p: p.write_bytes(b"\x01\x02"), HeaderError, "too short"),
    ("bad-header-json", lambda p: join(p, None, split(p)[1], header_text='{"a": [1, 2'), HeaderError, "not valid JSON"),
    ("header-not-object", lambda p: join(p, None, b"", header_text="[1, 2, 3]"), HeaderError, "not a JSON object"),
    ("absurd-header-length", lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:]),
     HeaderError, "not a safetensors file (its first 8 bytes give a header length of 1099511627776"),
    ("duplicate-key",
     lambda p: join(p, None, split(p)[1], header_text=json.dumps(split(p)[0])[:-1] + ', "__metadata__": {}}'),
     HeaderError, "duplicate key"),
    ("wrong-dtype", lambda p: (lambda h, d: (h["blk.q.qweight"].update(dtype="I8"), join(p, h, d)))(*split(p)),
     TensorError, "blk.q.qweight: dtype int8"),
    ("wrong-shape", lambda p: (lambda h, d: (h["blk.q.qweight"].update(shape=[16, 128]), join(p, h, d)))(*split(p)),
     TensorError, "blk.q.qweight: shape [16, 128]"),
    ("offsets-hole",
     lambda p: (lambda h, d: (h["blk.q.smooth"].update(data_offsets=[h["blk.q.smooth"]["data_offsets"][0] + 2,
                                                                     h["blk.q.smooth"]["data_offsets"][1] + 2]),
                              join(p, h, d)))(*split(p)),
     HeaderError, "blk.q.smooth"),
    ("missing-tensor", lambda p: resave(p, lambda t: t.pop("blk.q.lora_up")),
     TensorError, "blk.q.lora_up: missing tensor"),
    ("unexpected-tensor",
     lambda p: resave(p, lambda t: t.__setitem__("blk.f.lora_up", torch.zeros(32, 4, dtype=torch.bfloat16))),
     TensorError, "blk.f.lora_up: unexpected tensor"),
    ("non-finite-scale", lambda p: resave(p, lambda t: t["blk.q.wscales"].__setitem__((3, 1), float("inf"))),
     TensorError, "blk.q.wscales: non-finite"),
    ("nan-nvfp4-scale", lambda p: resave(p, lambda t: t["blk.f.wscales"].view(torch.uint8).__setitem__((0, 0), 0x7F)),
     TensorError, "blk.f.wscales: non-finite"),
    ("zero-smooth", lambda p: resave(p, lambda t: t["blk.q.smooth"].__setitem__(5, 0.0)), TensorError, "blk.q.smooth"),
    ("nan-lowrank", lambda p: resave(p, lambda t: t["blk.q.lora_down"].__setitem__((0, 0), float("nan"))),
     TensorError, "blk.q.lora_down: non-finite"),
    ("manifest-rank-mismatch", lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(rank=16)),
     TensorError, "blk.q.lora_down: shape"),
    ("manifest-bias-mismatch", lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(has_bias=False)),
     TensorError, "blk.q.bias: unexpected tensor"),
    ("manifest-missing-layer", lambda p: edit_meta(p, lambda m: m["layers"].pop("blk.f")),
     ManifestError, "blk.f.qweight"),
    ("manifest-bad-type", lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(rank="8")),
     ManifestError, "field 'rank' must be int"),
    ("manifest-bad-precision", lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(precision="int3")),
     ManifestError, "unknown precision"),
    ("manifest-k-not-multiple", lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(in_features=100)),
     ManifestError, "not a multiple"),
    ("future-format-version", lambda p: edit_meta(p, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
     VersionError, f"format_version {FORMAT_VERSION + 1}"),
    ("unknown-feature", lambda p: edit_meta(p, lambda m: m.update(features=["k_tiles"])),
     VersionError, "format feature 'k_tiles'"),
    ("segments-without-feature",
     lambda p: edit_meta(p, lambda m: m["layers"]["blk.q"].update(k_segments=[{"size": 64}, {"size": 64}])),
     ManifestError, "uses k_segments, which needs format_version >= 2"),
    ("unknown-layout", lambda p: edit_meta(p, lambda m: m.update(layout="tiled-mma")), ManifestError, "unknown layout"),
    ("metadata-not-json",
     lambda p: (lambda h, d: (h["__metadata__"].update(svdquant="{not json"), join(p, h, d)))(*split(p)),
     ManifestError, "not valid JSON"),
    ("no-svdquant-metadata", lambda p: (lambda h, d: (h["__metadata__"].pop("svdquant"), join(p, h, d)))(*split(p)),
     ManifestError, "not an SVDQuant checkpoint"),
]


@pytest.mark.parametrize("name,corrupt,error,needle", CASES, ids=[c[0] for c in CASES])
def test_corrupt_file_rejected(good, capsys, name, corrupt, error, needle):
    corrupt(good)
    with pytest.raises(error) as info:
        validate(good)
    msg = str(info.value)
    assert "\n" not in msg and str(good) in msg and needle in msg, msg
    with pytest.raises(FormatError):
        load_file(good)
    assert main(["validate", str(good)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {good}: ") and needle in err[0], err


def test_good_file_validates_and_unknown_fields_are_ignored(good, capsys):
    edit_meta(good, lambda m: (m.update(future_field={"x": 1}), m["layers"]["blk.q"].update(new_hint=True)))
    meta = validate(good)
    assert set(meta.layers) == {"blk.q", "blk.f"}
    assert main(["validate", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert set(load_file(good)) == {"blk.q", "blk.f"}


def test_cli_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    proc = subprocess.run(
        [sys.executable, "-m", "svdq_format.cli", "validate", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {bad}: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_path(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_errors_are_one_line_whatever_the_key_or_file_name():
    """A manifest's layer name is the file's text: one with a newline or other control character is
    shown escaped, so the error stays one line (found by tests/test_fuzz.py)."""
    from svdq_format.errors import ManifestError

    err = ManifestError("dir/\rm.safetensors", "a\nb", "missing field 'kind'\n")
    assert str(err) == "dir/\\rm.safetensors: a\\nb: missing field 'kind'"
    assert str(ManifestError("m.safetensors", "blocks.0.proj_out", "bad")) == "m.safetensors: blocks.0.proj_out: bad"
