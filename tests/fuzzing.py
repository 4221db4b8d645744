"""Mutation fuzzer for SVDQuant files (used by tests/test_fuzz.py and its --soak mode).

Every mutant of a valid file must either load and validate as a consistent file (and its
layers run), or be rejected with our typed :class:`~svdq_format.errors.FormatError` with a
one-line message. Anything else — another exception, a hang, a large allocation — is a bug.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import struct
import time
from pathlib import Path

import torch

from svdq_format import SVDQLinear, load_file, save_file, validate
from svdq_format.errors import FormatError
from svdq_format.spec import KSegment

JSON_VALUES = [
    None, True, False, 0, 1, -1, 7, 64, 2**31, 2**63 - 1, 2**64, -(2**62), 1.5, float("1e308"),
    "", "x", "U8", "F16", "BF16", "F8_E4M3", "I64", "int4", "nvfp4", "w4a4", "w4a16",
    "bfloat16", [], [1], [0, 0], [-1, 2], [2**62, 2**62], [1, 2, 3], {}, {"a": 1}, [[1]],
    ["k_segments"], [{"size": 64}], [{"size": 64}, {"size": "x"}], [{"size": 2**62}, {"size": -2**62 + 128}],
]
HUGE_HEADER = [0, 1, 7, 8, 2**20, 2**32, 2**63, 2**64 - 1]


def base_files(directory: Path) -> list[Path]:
    """A few small valid files covering every tensor role."""
    torch.manual_seed(1234)
    lin = torch.nn.Linear(128, 16)
    lin_nb = torch.nn.Linear(64, 8, bias=False)
    sets = {
        "int4": {"a.b": SVDQLinear.from_linear(lin, rank=4, dtype=torch.bfloat16, smooth=torch.rand(128) + 0.5)},
        "nvfp4": {"x": SVDQLinear.from_linear(lin, rank=0, precision="nvfp4", dtype=torch.float16),
                  "y": SVDQLinear.from_linear(lin_nb, rank=2, precision="nvfp4", dtype=torch.float32)},
        "mixed": {"p": SVDQLinear.from_linear(lin_nb, rank=0, kind="w4a16", dtype=torch.bfloat16)},
        "segments": {"s": _segmented(lin)},  # format 2: k_segments, per-segment nvfp4 tensor scales
    }
    paths = []
    for name, layers in sets.items():
        path = directory / f"base-{name}.safetensors"
        extra = {"norm.weight": torch.ones(16)} if name == "mixed" else None
        save_file(layers, path, extra_tensors=extra)
        paths.append(path)
    return paths


def _segmented(lin: torch.nn.Linear) -> SVDQLinear:
    seg = (KSegment(64), KSegment(64, 0.171875))
    layer = SVDQLinear(128, 16, rank=2, precision="nvfp4", dtype=torch.bfloat16, k_segments=seg)
    plain = SVDQLinear.from_linear(lin, rank=2, precision="nvfp4", dtype=torch.bfloat16)
    for role in ("smooth", "lora_down", "lora_up", "bias"):
        getattr(layer, role).copy_(getattr(plain, role))
    layer.set_residual(lin.weight.detach().float())
    return layer


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header_text: str, data: bytes) -> bytes:
    hb = header_text.encode()
    return struct.pack("<Q", len(hb)) + hb + data


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a valid file; returns (kind, mutant bytes)."""
    header, data = _split(raw)
    kind = rng.choice(
        ["flip", "flip-header", "truncate", "append", "header-length", "entry", "duplicate-key",
         "manifest", "manifest-layer", "metadata-text", "swap-offsets", "data-values"]
    )
    if kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "flip-header":
        b = bytearray(raw)
        n = struct.unpack("<Q", raw[:8])[0]
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, raw[: rng.randrange(len(raw))]
    if kind == "append":
        return kind, raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "header-length":
        n = struct.unpack("<Q", raw[:8])[0]
        new = rng.choice(HUGE_HEADER + [n + rng.randint(-16, 16), len(raw)])
        return kind, struct.pack("<Q", max(0, min(new, 2**64 - 1))) + raw[8:]
    if kind == "entry":
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets", "__whole__", "__delete__"])
        if field == "__whole__":
            header[name] = rng.choice(JSON_VALUES)
        elif field == "__delete__":
            header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        else:
            header[name][field] = rng.choice(JSON_VALUES)
        return kind, _join(json.dumps(header), data)
    if kind == "duplicate-key":
        name = rng.choice(list(header))
        text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
        return kind, _join(text, data)
    meta_text = header.get("__metadata__", {}).get("svdquant", "{}")
    meta = json.loads(meta_text)
    if kind == "manifest":
        key = rng.choice(["format_version", "layout", "layers", "producer", "quant_method", "extra", "features"])
        if rng.random() < 0.2:
            meta.pop(key, None)
        else:
            meta[key] = rng.choice(JSON_VALUES + [2, 1, "rowmajor-nibble-lo-first"])
    elif kind == "manifest-layer":
        layers = meta.get("layers", {})
        if layers:
            lname = rng.choice(list(layers))
            field = rng.choice(["kind", "precision", "in_features", "out_features", "rank", "dtype",
                                "has_bias", "group_size", "fused_from", "split_sizes", "act_shift",
                                "act_unsigned", "k_segments", "__rename__", "__delete__"])
            if field == "__rename__":
                layers[lname + rng.choice([".x", "", "z"])] = layers.pop(lname)
            elif field == "__delete__":
                layers.pop(lname)
            else:
                layers[lname][field] = rng.choice(JSON_VALUES)
    elif kind == "metadata-text":
        cut = rng.randrange(len(meta_text) + 1)
        header["__metadata__"]["svdquant"] = meta_text[:cut] + rng.choice(["", "}", "NaN", "\x00", "[", "]]"])
        return kind, _join(json.dumps(header), data)
    elif kind == "swap-offsets":
        names = [k for k in header if k != "__metadata__"]
        if len(names) >= 2:
            a, b = rng.sample(names, 2)
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return kind, _join(json.dumps(header), data)
    elif kind == "data-values":
        b = bytearray(data)
        special = rng.choice([b"\x00\x7f\xc0\x7f", b"\x00\x00\x80\x7f", b"\x7f\x7f\x7f\x7f", b"\xff\xff\xff\xff",
                              b"\x00\x00\x00\x00"])
        if len(b) >= 4:
            pos = rng.randrange(len(b) - 3)
            b[pos : pos + 4] = special
        return kind, _join(json.dumps(header), bytes(b))
    header.setdefault("__metadata__", {})["svdquant"] = json.dumps(meta)
    return kind, _join(json.dumps(header), data)


@dataclasses.dataclass
class FuzzStats:
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    crashes: list = dataclasses.field(default_factory=list)
    hangs: list = dataclasses.field(default_factory=list)
    slowest_s: float = 0.0
    max_rss_growth_mib: float = 0.0
    by_kind: dict = dataclasses.field(default_factory=dict)


def check_case(path: Path) -> str:
    """The oracle: 'accepted' or 'rejected'; raises on anything else."""
    try:
        meta = validate(path)
    except FormatError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"multi-line error: {exc!r}") from None
        try:  # the loader must agree with the validator
            load_file(path)
        except FormatError:
            return "rejected"
        raise AssertionError("validate rejected a file that load_file accepted")
    layers = load_file(path)
    assert set(layers) == set(meta.layers)
    for layer in layers.values():
        x = torch.randn(2, layer.in_features, dtype=layer.dtype)
        y = layer(x)
        assert y.shape == (2, layer.out_features)
    return "accepted"


def run(cases: int, seed: int, workdir: Path, *, hang_seconds: float = 10.0) -> FuzzStats:
    """Run ``cases`` mutants; returns the statistics (crashes/hangs listed, never raised)."""
    rng = random.Random(seed)
    paths = base_files(workdir)
    for p in paths:  # warm up (first op call, imports) so timings measure the cases
        assert check_case(p) == "accepted"
    bases = [p.read_bytes() for p in paths]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = FuzzStats()
    target = workdir / "mutant.safetensors"
    for i in range(cases):
        kind, mutant = mutate(rng.choice(bases), rng)
        target.write_bytes(mutant)
        t0 = time.perf_counter()
        try:
            outcome = check_case(target)
        except Exception as exc:  # noqa: BLE001 - the fuzzer records every unexpected failure
            stats.crashes.append((i, kind, f"{type(exc).__name__}: {exc}"[:300]))
            outcome = "crash"
        dt = time.perf_counter() - t0
        stats.slowest_s = max(stats.slowest_s, dt)
        if dt > hang_seconds:
            stats.hangs.append((i, kind, dt))
        stats.cases += 1
        stats.accepted += outcome == "accepted"
        stats.rejected += outcome == "rejected"
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
    stats.max_rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return stats
