"""Memory bounds, test size: peak RSS of streaming operations on a sharded 174 MB model (2 shards;
marked ``slow``: ``python -m pytest -m slow``).

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
    d = save_pretrained(model, tmp / "model", max_shard_size="90MB")
    del model
    return d, mb.warmup_model(tmp / "warmup")


@pytest.mark.slow  # a fresh interpreter per operation on a 174 MB model: `python -m pytest -m slow`
@pytest.mark.parametrize("op", mb.STREAMING)
def test_streaming_peak_rss_within_bound_of_largest_shard(sharded, op):
    d, warmup = sharded
    r = mb.measure(op, d, warmup)
    print(f"\n{op}: largest shard {r['largest_shard_mb']} MB of {r['shards']} ({r['model_mb']} MB), "
          f"peak RSS +{r['increment_mb']} MB = {r['ratio']} x largest shard")
    assert r["shards"] >= 2 and r["largest_shard_mb"] > 60
    assert r["ratio"] <= mb.BOUND, r
    if op == "load_file shard":  # it keeps that shard's layers: the bound is not vacuous
        assert r["increment_mb"] >= r["kept_mb"] > 0.5 * r["largest_shard_mb"]


def test_streaming_load_matches_host_load_in_shapes_and_dtypes(tmp_path):
    """Onto another device (meta here) tensors go through one staging buffer; the result has the
    host load's keys, shapes and dtypes, with and without a dtype cast."""
    import torch

    from svdq_format.pretrained import load_pretrained
    from tests.hub_helpers import tiny_flux

    tiny_flux().save_pretrained(tmp_path, max_shard_size="120KB")
    for dtype in (None, torch.bfloat16):
        host = load_pretrained(tmp_path, dtype=dtype).state_dict()
        meta = load_pretrained(tmp_path, device="meta", dtype=dtype).state_dict()
        assert set(meta) == set(host)
        for k, v in host.items():
            assert meta[k].device.type == "meta" and meta[k].shape == v.shape and meta[k].dtype == v.dtype, k


def test_tensor_reader_staging_buffer_gives_the_same_bytes(tmp_path):
    import torch

    from svdq_format.io import TensorReader, read_header
    from svdq_format.model import save_pretrained

    d = save_pretrained(mb.build(dim=256, layers=1, single_layers=1, rank=8), tmp_path / "m")
    header = read_header(d / "diffusion_pytorch_model.safetensors")
    staging = torch.empty(max(e.end - e.begin for e in header.tensors.values()), dtype=torch.uint8)
    with TensorReader(header) as r:
        for key in header.tensors:
            fresh = r.get_tensor(key)
            staged = r.get_tensor(key, out=staging)
            assert staged.data_ptr() == staging.data_ptr() or staged.numel() == 0
            assert staged.dtype == fresh.dtype and staged.shape == fresh.shape
            assert torch.equal(staged.view(torch.uint8) if staged.dim() else staged,
                               fresh.view(torch.uint8) if fresh.dim() else fresh), key


@pytest.mark.gpu
def test_streaming_load_to_cuda_is_bit_identical_to_host_load(tmp_path):
    import torch

    from svdq_format.pretrained import load_pretrained
    from tests.hub_helpers import tiny_flux

    tiny_flux().save_pretrained(tmp_path, max_shard_size="120KB")
    for dtype in (None, torch.bfloat16):
        host = load_pretrained(tmp_path, dtype=dtype).state_dict()
        gpu = load_pretrained(tmp_path, device="cuda", dtype=dtype).state_dict()
        assert set(gpu) == set(host)
        for k, v in host.items():
            g = gpu[k]
            assert g.device.type == "cuda" and g.dtype == v.dtype, k
            assert torch.equal(g.cpu().view(torch.uint8) if v.dim() else g.cpu(),
                               v.view(torch.uint8) if v.dim() else v), k
