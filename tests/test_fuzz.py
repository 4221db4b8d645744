"""Fuzzed loader (docs/reliability.md): mutants load consistently or raise our typed error."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import JSON_VALUES, base_files, check_case, run


def test_mutation_fuzz(tmp_path, request, capsys):
    cases = 200_000 if request.config.getoption("--soak") else 2000
    stats = run(cases, seed=20261127, workdir=tmp_path)
    with capsys.disabled():
        print(
            f"\n  fuzz: {stats.cases} cases, {stats.accepted} accepted, {stats.rejected} rejected, "
            f"{len(stats.crashes)} crashes, {len(stats.hangs)} hangs, slowest {stats.slowest_s:.3f} s, "
            f"RSS growth {stats.max_rss_growth_mib:.1f} MiB"
        )
    assert stats.crashes == []
    assert stats.hangs == []
    assert stats.rejected > stats.cases // 2  # the mutations really break files
    assert stats.max_rss_growth_mib < 256  # no allocation driven by header numbers


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from([v for v in JSON_VALUES if isinstance(v, str)]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return [p.read_bytes() for p in base_files(tmp_path_factory.mktemp("bases"))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=json_values)
def test_structured_header_and_manifest_edits(bases, tmp_path, data, value):
    raw = data.draw(st.sampled_from(bases))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["svdquant"])
    where = data.draw(st.sampled_from(["tensor", "manifest", "layer"]))
    if where == "tensor":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = value
    elif where == "manifest":
        meta[data.draw(st.sampled_from(["format_version", "layout", "layers", "producer", "features", "new"]))] = value
    else:
        lname = data.draw(st.sampled_from(sorted(meta["layers"])))
        field = data.draw(st.sampled_from(["kind", "precision", "in_features", "out_features", "rank",
                                           "dtype", "has_bias", "fused_from", "split_sizes", "act_shift",
                                           "k_segments"]))
        meta["layers"][lname][field] = value
    header["__metadata__"]["svdquant"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    assert check_case(path) in ("accepted", "rejected")
