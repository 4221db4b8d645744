"""Tests written from docs/format.md, not from the module: bytes, code tables, activation rules.

The expected values below are copied from the spec text (worked examples, code tables) or
derived from its formulas in plain Python; the library must reproduce them.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from svdq_format import SVDQLinear, packing, save_file
from svdq_format.spec import LAYOUT, FormatMetadata

# docs/format.md §4, worked int4 example: qweight[0] of w[k] = 0.5 * ((k mod 15) - 7), K = 64.
SPEC_INT4_BYTES = bytes.fromhex(
    "A9CBED0F214365 97BADCFE10325476A9"
    "CBED0F21436597BADCFE10325476A9CB".replace(" ", "")
)
# docs/format.md §3, E2M1 table (index = nibble).
SPEC_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_worked_int4_example_bytes():
    k = torch.arange(64)
    w = 0.5 * ((k % 15) - 7).float()
    nib, scales = packing.quantize_int4(w[None], scale_dtype=torch.bfloat16)
    packed = packing.pack_nibbles(nib)
    assert bytes(packed[0].tolist()) == SPEC_INT4_BYTES
    # scale 0.5 is BF16 0x3F00, little-endian bytes 00 3F
    assert scales.view(torch.int16).item() == 0x3F00
    assert struct.pack("<H", scales.view(torch.int16).item() & 0xFFFF) == b"\x00\x3f"


def test_worked_int4_example_in_a_file(tmp_path):
    """The worked example, written by save_file, lands byte for byte in the file's buffer."""
    lin = torch.nn.Linear(64, 1, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(0.5 * ((torch.arange(64) % 15) - 7).to(torch.bfloat16)[None])
    layer = SVDQLinear.from_linear(lin, rank=0)
    path = tmp_path / "ex.safetensors"
    save_file({"proj": layer}, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header["proj.qweight"]["data_offsets"]
    assert header["proj.qweight"]["dtype"] == "U8" and header["proj.qweight"]["shape"] == [1, 32]
    assert raw[8 + n + begin : 8 + n + end] == SPEC_INT4_BYTES
    b0, b1 = header["proj.wscales"]["data_offsets"]
    assert raw[8 + n + b0 : 8 + n + b1] == b"\x00\x3f"
    meta = json.loads(header["__metadata__"]["svdquant"])
    assert meta["format_version"] == 1 and meta["layout"] == "rowmajor-nibble-lo-first"
    assert meta["layers"]["proj"]["precision"] == "int4" and meta["layers"]["proj"]["group_size"] == 64


def test_worked_e2m1_example_bytes():
    v = torch.tensor([1.5, -0.5, 6.0, 0.0, -6.0, 0.25, 0.75, -2.6])
    nib = packing.e2m1_encode(v)
    assert nib.tolist() == [0x3, 0x9, 0x7, 0x0, 0xF, 0x0, 0x2, 0xD]
    assert bytes(packing.pack_nibbles(nib).tolist()) == bytes.fromhex("93070FD2")


@pytest.mark.parametrize("code", range(-8, 8))
def test_all_16_int4_codes_round_trip(code):
    nib = packing.int4_to_nibbles(torch.tensor([code]))
    assert nib.item() == (code & 0xF)  # two's complement nibble, per spec §3
    assert packing.nibbles_to_int4(nib).item() == code
    # and through a byte, in both nibble positions
    other = 5
    for pair, pos in (([code, other], 0), ([other, code], 1)):
        byte = packing.pack_nibbles(packing.int4_to_nibbles(torch.tensor(pair)))
        expected = ((code & 0xF) << (4 * pos)) | ((other & 0xF) << (4 * (1 - pos)))
        assert byte.item() == expected
        assert packing.nibbles_to_int4(packing.unpack_nibbles(byte)).tolist() == pair


@pytest.mark.parametrize("nibble", range(16))
def test_all_16_e2m1_codes_round_trip(nibble):
    value = SPEC_E2M1[nibble]
    decoded = packing.e2m1_decode(torch.tensor([nibble], dtype=torch.uint8)).item()
    assert decoded == value and (str(decoded)[0] == "-") == (str(float(value))[0] == "-")
    # encoding the value gives the nibble back (negative zero encodes as +0, spec §5.2)
    expected = 0 if nibble == 8 else nibble
    assert packing.e2m1_encode(torch.tensor([value])).item() == expected


def test_e2m1_rounding_ties_and_saturation():
    # spec §5.2: ties to even mantissa; > 6 saturates; NaN-free inputs only here
    cases = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0,
             0.26: 0.5, 2.51: 3.0, 5.01: 6.0, 100.0: 6.0, float("inf"): 6.0, 0.1: 0.0}
    for x, expected in cases.items():
        for sign in (1.0, -1.0):
            got = packing.e2m1_decode(packing.e2m1_encode(torch.tensor([sign * x]))).item()
            assert got == sign * expected or (expected == 0 and got == 0), (sign * x, got)


def _spec_int4_act(row):
    """Spec §5.1 in plain Python for one token (list of floats, length 64k)."""
    codes, scales = [], []
    for j in range(0, len(row), 64):
        group = row[j : j + 64]
        a = torch.tensor(max(abs(v) for v in group), dtype=torch.float32) / 7
        scales.append(a.item())
        for v in group:
            if a.item() == 0:
                codes.append(0.0)
            else:
                q = torch.round(torch.tensor(v, dtype=torch.float32) / a).item()
                codes.append(min(max(q, -8.0), 7.0))
    return codes, scales


def test_int4_activation_quantizer_matches_spec():
    x = torch.randn(3, 128) * torch.tensor([0.01, 1, 10]).repeat_interleave(1).view(3, 1)
    x[1, 64:] = 0.0  # a zero group: scale 0, codes 0
    q, a = packing.quantize_activations(x, "int4")
    for m in range(3):
        codes, scales = _spec_int4_act(x[m].tolist())
        assert q[m].tolist() == codes
        assert a[m].tolist() == scales


def test_int4_unsigned_activation_quantizer_matches_spec():
    x = torch.randn(2, 64).abs() - 0.1  # some negatives: clamp to 0
    q, a = packing.quantize_activations(x, "int4", unsigned=True)
    for m in range(2):
        row = [max(v, 0.0) for v in x[m].tolist()]
        scale = torch.tensor(max(row), dtype=torch.float32) / 15
        assert a[m, 0].item() == scale.item()
        expected = [min(max(torch.round(torch.tensor(v, dtype=torch.float32) / scale).item(), 0), 15) for v in row]
        assert q[m].tolist() == expected


def test_nvfp4_activation_quantizer_matches_spec():
    x = torch.randn(2, 32) * 3
    v, a = packing.quantize_activations(x, "nvfp4")
    for m in range(2):
        for j in range(2):
            group = x[m, 16 * j : 16 * (j + 1)]
            scale = torch.tensor(min(group.abs().max().item() / 6, 448.0)).to(torch.float8_e4m3fn).float()
            assert a[m, j].item() == scale.item()
            for i, val in enumerate(group.tolist()):
                t = val / scale.item()
                # nearest E2M1 value, ties to even mantissa (spec table order is by nibble)
                mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
                mag = min(abs(t), 6.0)
                best = min(range(8), key=lambda c: (abs(mags[c] - mag), c % 2))
                assert v[m, 16 * j + i].item() == (mags[best] if t >= 0 else -mags[best])


def test_non_finite_input_poisons_only_its_token():
    layer = SVDQLinear.from_linear(torch.nn.Linear(128, 32), rank=4)
    x = torch.randn(3, 128)
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    y = layer(x)
    assert torch.isfinite(y[0]).all()
    assert torch.isnan(y[1]).all()
    assert torch.isnan(y[2]).all()


def test_the_quantizer_object_is_informative_and_read_leniently():
    from svdq_format.spec import QuantizerInfo

    info = QuantizerInfo(method="data-free", options={"rank": 32}, extra={"source": "x"})
    assert QuantizerInfo.from_json(info.to_json()) == info
    meta = FormatMetadata.from_json({"format_version": 1, "layout": LAYOUT, "layers": {}, "quantizer": info.to_json()})
    assert meta.quantizer == info and FormatMetadata.loads(meta.dumps()).quantizer == info
    # written before "method" existed (only the calibrated quantizer wrote the object): calibrated
    old = FormatMetadata.from_json({"format_version": 1, "layout": LAYOUT, "layers": {},
                                    "quantizer": {"options": {"rank": 8}, "calibration": {"source": "synthetic"}}})
    assert old.quantizer.method == "calibrated" and old.quantizer.calibration == {"source": "synthetic"}
    # never a reason to refuse a file: absent / not an object / odd fields
    for odd in (None, "int4", [1], {"method": 3, "options": "x"}):
        meta = FormatMetadata.from_json({"format_version": 1, "layout": LAYOUT, "layers": {}, "quantizer": odd})
        q = meta.quantizer
        assert q is None or (q.method == "calibrated" and q.options == {})
    assert FormatMetadata(layers={}).quantizer is None
