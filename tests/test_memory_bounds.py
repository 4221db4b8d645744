"""Memory bounds, CI size: peak RSS of streaming operations on a sharded ~190 MB model.

Each operation runs in a fresh interpreter (benchmarks/memory_bounds.py ``measure``): peak RSS
(VmHWM) minus the baseline after imports and a warm-up run on a tiny model must stay within
1.2 × the largest shard. The multi-GB run is ``python benchmarks/memory_bounds.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_bounds as mb  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from svdq_format.model import save_pretrained

    tmp = tmp_path_factory.mktemp("membound")
    model = mb.build(dim=2048, layers=1, single_layers=2, rank=32)
    d = save_pretrained(model, tmp / "model", max_shard_size="70MB")
    del model
    return d, mb.warmup_model(tmp / "warmup")


@pytest.mark.parametrize("op", mb.STREAMING)
def test_streaming_peak_rss_within_bound_of_largest_shard(sharded, op):
    d, warmup = sharded
    r = mb.measure(op, d, warmup)
    print(f"\n{op}: largest shard {r['largest_shard_mb']} MB of {r['shards']} ({r['model_mb']} MB), "
          f"peak RSS +{r['increment_mb']} MB = {r['ratio']} x largest shard")
    assert r["shards"] >= 3 and r["largest_shard_mb"] > 40
    assert r["ratio"] <= mb.BOUND, r
    if op == "load_file shard":  # it keeps that shard's layers: the bound is not vacuous
        assert r["increment_mb"] >= r["kept_mb"] > 0.5 * r["largest_shard_mb"]
