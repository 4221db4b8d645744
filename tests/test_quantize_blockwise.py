"""Block-by-block calibration and the checkpoint assembled from the per-block files: the same
statistics and the same checkpoint bytes as the whole-model paths."""

from __future__ import annotations

import copy

import pytest
import torch

from converters.quantize import QuantizeOptions
from converters.quantize.blockwise import blockwise_supported, collect_stats_blockwise
from converters.quantize.calibration import synthetic_calibration
from converters.quantize.selection import select_layers
from converters.quantize.stats import collect_stats

pytestmark = pytest.mark.filterwarnings("ignore:calibrating on synthetic:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_flux(dtype=torch.float32, double=2, single=2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).to(dtype).eval()


def _linears(model, **kw):
    sel = select_layers(model, **kw)
    return {n: model.get_submodule(n) for n in sel.kinds}


def _assert_same_stats(a, b):
    assert a.groups == b.groups and a.samples == b.samples
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert x.count == y.count and x.minval == y.minval, name
        for f in ("absmax", "rows", "keys"):
            tx, ty = getattr(x, f), getattr(y, f)
            assert tx.dtype == ty.dtype and torch.equal(tx.view(torch.uint8), ty.view(torch.uint8)), (name, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_blockwise_statistics_equal_the_whole_model_pass_bit_for_bit(dtype, shard):
    model = tiny_flux(dtype)
    samples = synthetic_calibration(model, 3, seed=1, image_tokens=16, text_tokens=8, warn=False).samples
    linears = _linears(model, include=("proj_out",))  # a layer after the blocks too
    assert blockwise_supported(model, samples)
    ref = collect_stats(model, linears, samples, max_rows=20, seed=3, device="cpu", shard=shard)
    offloaded = copy.deepcopy(model)  # blocks placed one at a time, counted
    placed = []
    got = collect_stats_blockwise(offloaded, _linears(offloaded, include=("proj_out",)), samples, max_rows=20, seed=3,
                                  device="cpu", load_block=lambda b, n: placed.append(n),
                                  drop_block=lambda b: None, shard=shard)
    assert placed == [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    _assert_same_stats(ref, got)
    assert "proj_out" in got.layers and "norm_out.linear" in got.layers


def test_unknown_wiring_falls_back():
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    assert not blockwise_supported(sd3, [{}])
    flux = tiny_flux()
    assert not blockwise_supported(flux, [{"controlnet_block_samples": [torch.zeros(1)]}])
