"""SVDQLinear: an independent implementation of the spec's forward, round trips, fidelity."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from svdq_format import SVDQLinear, load_file, save_file

E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
ST = {"U8": (torch.uint8, 1), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2),
      "F32": (torch.float32, 4), "F8_E4M3": (torch.float8_e4m3fn, 1)}


def read_raw(path):
    """Parse a safetensors file by hand (spec §1): returns ({name: tensor}, metadata)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["svdquant"])
    out = {}
    for name, e in header.items():
        dtype, size = ST[e["dtype"]]
        b, end = e["data_offsets"]
        buf = bytearray(raw[8 + n + b : 8 + n + end])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(e["shape"])
    return out, meta


def spec_forward(tensors, prefix, entry, x):
    """docs/format.md §5–§6 written out with explicit per-nibble decoding, in float64 sums.

    Group products are integer (int4) or quarter-integer (E2M1) sums, exact in any float
    format; only the final scaling and sums round, so float64 here vs fp32 in the library
    must agree to ~1e-6 relative.
    """
    k, n, r = entry["in_features"], entry["out_features"], entry["rank"]
    prec = entry["precision"]
    g = 64 if prec == "int4" else 16
    qw = tensors[f"{prefix}.qweight"].to(torch.int64)
    lo, hi = qw & 0xF, qw >> 4
    nib = torch.stack([lo, hi], -1).reshape(n, k)  # element 2j = low nibble
    if prec == "int4":
        codes = ((nib ^ 8) - 8).double()
    else:
        codes = torch.tensor(E2M1, dtype=torch.float64)[nib]
    ws = tensors[f"{prefix}.wscales"].double()
    ts = tensors[f"{prefix}.wtscale"].double() if prec == "nvfp4" else torch.tensor(1.0, dtype=torch.float64)
    s = tensors[f"{prefix}.smooth"].float()
    xf = x.float()
    xs = xf / s  # fp32 as the spec says
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(k // g):
            grp = xs[m, j * g : (j + 1) * g]
            amax = grp.abs().max()
            if prec == "int4":
                a = amax / 7
                q = torch.round(grp / a).clamp(-8, 7) if a > 0 else torch.zeros(g)
            else:
                a = torch.clamp(amax / 6, max=448.0).to(torch.float8_e4m3fn).float()
                if a > 0:
                    t = (grp / a).tolist()
                    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
                    q = torch.tensor([
                        math.copysign(mags[min(range(8), key=lambda c: (abs(mags[c] - min(abs(v), 6)), c % 2))], v)
                        for v in t
                    ])
                else:
                    q = torch.zeros(g)
            p = codes[:, j * g : (j + 1) * g] @ q.double()  # exact
            y[m] += p * (a.double() * ws[:, j])
    y = y * ts
    if r:
        down = tensors[f"{prefix}.lora_down"].double()
        up = tensors[f"{prefix}.lora_up"].double()
        y += (xf.double() @ down.T) @ up.T
    if entry["has_bias"]:
        y += tensors[f"{prefix}.bias"].double()
    return y


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("rank", [0, 8])
def test_forward_matches_independent_spec_implementation(tmp_path, precision, rank):
    lin = torch.nn.Linear(128, 24)
    smooth = torch.rand(128) + 0.5
    layer = SVDQLinear.from_linear(lin, rank=rank, precision=precision, smooth=smooth, dtype=torch.float32)
    path = tmp_path / "l.safetensors"
    save_file({"blk.proj": layer}, path)
    tensors, meta = read_raw(path)
    x = torch.randn(5, 128) * 2
    expected = spec_forward(tensors, "blk.proj", meta["layers"]["blk.proj"], x)
    got = layer(x).double()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_save_load_forward_bit_identical(tmp_path, precision, dtype):
    lin = torch.nn.Linear(192, 40).to(dtype)
    layer = SVDQLinear.from_linear(lin, rank=16, precision=precision, smooth=torch.rand(192) + 0.1)
    path = tmp_path / "layer.safetensors"
    save_file({"a": layer, "b": SVDQLinear.from_linear(lin, rank=0, kind="w4a16")}, path)
    loaded = load_file(path)
    x = torch.randn(2, 7, 192).to(dtype)
    assert torch.equal(loaded["a"](x), layer(x))
    for name, t in layer.state_dict().items():
        assert torch.equal(loaded["a"].state_dict()[name].reshape(-1).view(torch.uint8),
                           t.reshape(-1).view(torch.uint8)), name
    assert loaded["b"].kind == "w4a16" and loaded["b"].rank == 0


def test_dequantize_is_the_w4a16_function():
    lin = torch.nn.Linear(128, 32)
    layer = SVDQLinear.from_linear(lin, rank=8, kind="w4a16", smooth=torch.rand(128) + 0.5, dtype=torch.float32)
    x = torch.randn(4, 128)
    dense = x @ layer.dequantize().T + layer.bias
    assert torch.allclose(layer(x), dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.to_linear()(x), dense, rtol=1e-5, atol=1e-5)


def test_lowrank_branch_acts_on_raw_input():
    """lora_down has 1/s folded in: with a zero residual the layer is exactly x·L2ᵀ·L1ᵀ."""
    lin = torch.nn.Linear(64, 16, bias=False)
    s = torch.rand(64) * 4 + 0.25
    layer = SVDQLinear.from_linear(lin, rank=16, smooth=s, dtype=torch.float32)  # full rank
    x = torch.randn(3, 64)
    branch = (x @ layer.lora_down.T) @ layer.lora_up.T
    # full-rank SVD reproduces W, so the branch alone ≈ x Wᵀ (no smoothing correction needed)
    assert torch.allclose(branch, lin(x), atol=1e-4)


def test_fast_mode_is_more_precise_than_exact():
    lin = torch.nn.Linear(256, 64)
    layer = SVDQLinear.from_linear(lin, rank=16)
    x = torch.randn(32, 256)
    ref = lin(x)
    exact = (layer(x) - ref).norm() / ref.norm()
    layer.mode = "fast"
    fast = (layer(x) - ref).norm() / ref.norm()
    assert fast < exact


def outlier_case(k=512, n=256, rows=256, channels=8, magnitude=60.0):
    w = torch.randn(n, k) / math.sqrt(k)
    x = torch.randn(rows, k)
    idx = torch.randperm(k)[:channels]
    x[:, idx] *= magnitude
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin, x


def rel_err(layer, lin, x):
    ref = lin(x)
    return ((layer(x) - ref).norm() / ref.norm()).item()


def test_svdq_beats_naive_w4a4_on_outlier_channels(capsys):
    lin, x = outlier_case()
    alpha = 0.5
    s = (x.abs().amax(0) ** alpha / lin.weight.abs().amax(0) ** (1 - alpha)).clamp(min=1e-4)
    rows = {}
    rows["naive W4A4 (r=0, no smoothing)"] = rel_err(SVDQLinear.from_linear(lin, rank=0, dtype=torch.float32), lin, x)
    rows["smoothing only (r=0)"] = rel_err(SVDQLinear.from_linear(lin, rank=0, smooth=s, dtype=torch.float32), lin, x)
    rows["SVDQ r=32 + smoothing"] = rel_err(SVDQLinear.from_linear(lin, rank=32, smooth=s, dtype=torch.float32), lin, x)
    rows["W4A16 (weights only, r=0)"] = rel_err(
        SVDQLinear.from_linear(lin, rank=0, kind="w4a16", dtype=torch.float32), lin, x)
    with capsys.disabled():
        print("\n  layer 256x512, 8 outlier channels x60 — relative output error")
        for name, err in rows.items():
            print(f"  {name:34s} {err:.4f}")
    assert rows["SVDQ r=32 + smoothing"] < 0.5 * rows["naive W4A4 (r=0, no smoothing)"]
