"""The ``fast8`` mode on the CPU: its weight math (packing), its reference, the layer mode, and
the group-64 kernel's configuration, source generation and dispatch (no GPU needed)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import svdq_format as sf
from svdq_format import ops, packing
from svdq_format.errors import BackendError, UnsupportedError


def _codes_scales(n=48, k=256, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g).float()
    scales = (torch.rand(n, k // 64, generator=g) * torch.logspace(-6, 2, n).unsqueeze(1)).to(dtype)
    return codes, scales


def test_row_scales_put_every_row_into_128_256():
    codes, scales = _codes_scales()
    pw = packing.fp8_weight_row_scales(codes, scales)
    assert torch.equal(pw, torch.exp2(torch.log2(pw).round()))  # powers of two
    rmax = (packing.group_view(codes, 64) * scales.float().unsqueeze(-1)).abs().amax(dim=(1, 2))
    assert ((rmax * pw >= 128) & (rmax * pw < 256)).all()


def test_row_scales_of_zero_and_non_finite_rows_are_one():
    codes, scales = _codes_scales(n=3)
    scales[0] = 0
    scales[1, 0] = float("inf")
    pw = packing.fp8_weight_row_scales(codes, scales)
    assert pw[0] == 1 and pw[1] == 1 and pw[2] != 1


def test_fp8_weights_equal_a_direct_e4m3_rounding_for_bf16_scales():
    """A bf16 scale times a power of two times a 3-bit code is exact in fp16, so the kernel's
    fp16 product rounds to e4m3 exactly like ``code × scale × 2^e`` in float32."""
    codes, scales = _codes_scales()
    pw = packing.fp8_weight_row_scales(codes, scales)
    s16 = packing.fp8_weight_scales(scales, pw)
    assert torch.equal(s16.float(), scales.float() * pw.unsqueeze(1))
    w = (packing.group_view(codes, 64) * (scales.float() * pw.unsqueeze(1)).unsqueeze(-1)).reshape(codes.shape)
    assert torch.equal(packing.fp8_weight_values(codes, s16), w.to(torch.float8_e4m3fn).float())


def test_fp8_weights_are_close_to_the_exact_weights():
    codes, scales = _codes_scales()
    pw = packing.fp8_weight_row_scales(codes, scales)
    w8 = packing.fp8_weight_values(codes, packing.fp8_weight_scales(scales, pw)) / pw.unsqueeze(1)
    w = (packing.group_view(codes, 64) * scales.float().unsqueeze(-1)).reshape(codes.shape)
    big = w.abs() >= 2.0**-6 * 128 / pw.unsqueeze(1) * 2  # e4m3 normals after the row scaling
    rel = ((w8 - w).abs() / w.abs())[big & (w != 0)]
    assert rel.max() <= 2.0**-4 + 1e-7  # half an e4m3 ulp (3 mantissa bits)


def _layer_args(m=5, k=256, n=48, r=8, act="fp8w", precision="int4"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    down = (torch.randn(r, k, generator=g) / 16).to(torch.bfloat16)
    up = (torch.randn(n, r, generator=g) / 4).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    return (x, qweight, wscales, None, smooth, down, up, bias, None, precision, act)


def test_reference_fp8w_is_fp8_activations_times_e4m3_weights():
    args = _layer_args()
    x, qweight, wscales, _, smooth, down, up, bias = args[:8]
    out = ops.reference_linear(*args).float()
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight)).float()
    pw = packing.fp8_weight_row_scales(codes, wscales)
    w8 = packing.fp8_weight_values(codes, packing.fp8_weight_scales(wscales, pw)) / pw.unsqueeze(1)
    xs = x.float() * (1 / smooth.float())  # the FP8 modes multiply by reciprocals
    a = xs.abs().amax(dim=1, keepdim=True) / 448
    q = (xs * (1 / a)).to(torch.float8_e4m3fn).float()
    want = (q @ w8.T) * a + (x.float() @ down.float().T) @ up.float().T + bias.float()
    assert torch.equal(out, want.to(torch.bfloat16).float())
    fast = ops.reference_linear(*args[:10], "fp8").float()
    rel = ((out - fast).norm() / fast.norm()).item()
    assert 1e-4 < rel < 5e-2  # e4m3-rounded weights: a different function, but close


def test_reference_fp8w_needs_int4_weights():
    args = list(_layer_args(k=256, precision="nvfp4"))
    args[2] = torch.ones(48, 256 // 16).to(torch.float8_e4m3fn)
    args[3] = torch.tensor(1.0)
    with pytest.raises(BackendError, match="fp8w.*int4"):
        ops.reference_linear(*args)


def test_layer_mode_fast8_runs_the_fp8w_math():
    layer = sf.SVDQLinear(256, 48, rank=8, bias=True, dtype=torch.bfloat16)
    x, qweight, wscales, _, smooth, down, up, bias = _layer_args()[:8]
    with torch.no_grad():
        layer.qweight.copy_(qweight), layer.wscales.copy_(wscales), layer.smooth.copy_(smooth)
        layer.lora_down.copy_(down), layer.lora_up.copy_(up), layer.bias.copy_(bias)
    layer.mode = "fast8"
    assert layer.act == "fp8w"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(x)
    assert torch.equal(out, ops.reference_linear(*_layer_args()))
    nv = sf.SVDQLinear(256, 48, rank=8, precision="nvfp4", dtype=torch.bfloat16)
    nv.mode = "fast8"
    assert nv.act == "fp8"  # fast8 is an int4 mode; nvfp4 layers run `fast`


def _fast8_layer(mode="fast8"):
    layer = sf.SVDQLinear(256, 48, rank=8, bias=True, dtype=torch.bfloat16)
    x, qweight, wscales, _, smooth, down, up, bias = _layer_args(m=7)[:8]
    with torch.no_grad():
        layer.qweight.copy_(qweight), layer.wscales.copy_(wscales), layer.smooth.copy_(smooth)
        layer.lora_down.copy_(down), layer.lora_up.copy_(up), layer.bias.copy_(bias)
    layer.mode = mode
    return layer, x


@pytest.mark.parametrize("act", ["fp8", "fp8w"])
def test_reference_with_given_fp8_activations_is_the_reference(act):
    """``svdquant::linear_fp8`` (the compiled graphs' op) on the quantizer's ``q``/``a`` gives the
    reference bit for bit — NaN/inf rows and an activation shift included (the activations are
    quantized unshifted: a zero row keeps ``a = 0`` and its output is the shift-corrected bias)."""
    args = list(_layer_args(m=9, act=act))
    args[0][2, 3] = float("nan")
    args[0][4, 1] = float("inf")
    args[0][6] = 0
    for shift in (0.0, 0.75):
        x, smooth = args[0], args[4]
        q, a = ops.fp8_activations(x.float(), smooth)
        assert q.dtype == torch.float8_e4m3fn and a.shape == (9,) and a[6] == 0
        want = ops.reference_linear(*args, act_shift=shift)
        got = torch.ops.svdquant.linear_fp8(x, q, a, *args[1:], shift, False, "reference")
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def _graph_ops(model, x):
    """The ``svdquant`` ops in the graph dynamo captures for ``model(x)`` (no graph break)."""
    found: list[str] = []

    def backend(gm, example_inputs):
        found.extend(str(n.target) for n in gm.graph.nodes if "svdquant" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return found, out


def test_compiled_fast8_quantizes_the_activations_in_the_graph(monkeypatch):
    """With ``SVDQ_FAST8_PROLOGUE=inductor`` a compiled ``fast8`` layer is plain-torch quantization +
    ``svdquant::linear_fp8`` (so Inductor can fuse the quantizer into the producer of ``x``), with
    the eager output; the other modes stay one ``svdquant::linear`` node."""
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "inductor")
    layer, x = _fast8_layer()
    found, out = _graph_ops(layer, x)
    assert found == ["svdquant.smooth_reciprocal", "svdquant.linear_fp8"]
    assert torch.equal(out, layer(x))
    for mode in ("exact", "fast"):
        layer.mode = mode
        found, out = _graph_ops(layer, x)
        assert found == ["svdquant.linear"] and torch.equal(out, layer(x))


def test_fused_prologue_setting_makes_the_compiled_layer_one_op(monkeypatch):
    """``SVDQ_FAST8_PROLOGUE=fused`` (read at import into ``ops.FAST8_PROLOGUE``): the compiled
    ``fast8`` layer is one ``svdquant::linear`` (its backend quantizes x in the low-rank pass), with
    the eager output; a k-segmented layer keeps the graph quantizer (its scale spans the segments)."""
    layer, x = _fast8_layer()
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "fused")
    found, out = _graph_ops(layer, x)
    assert found == ["svdquant.linear"] and torch.equal(out, layer(x))


def _rank0_fast8_layer():
    layer = sf.SVDQLinear(256, 48, rank=0, bias=True, dtype=torch.bfloat16)
    x, qweight, wscales, _, smooth = _layer_args(m=7)[:5]
    with torch.no_grad():
        layer.qweight.copy_(qweight), layer.wscales.copy_(wscales), layer.smooth.copy_(smooth)
        layer.bias.normal_()
    layer.mode = "fast8"
    return layer, x.reshape(1, 7, 256)


def test_compiled_rank0_layer_quantizes_in_the_graph_and_never_hands_over_x(monkeypatch):
    """With the fused prologue (the default), a compiled ``fast8`` layer without a low-rank branch
    quantizes in the graph (Inductor fuses it into x's producer) and gives ``svdquant::linear_fp8`` an
    empty ``[..., 0]`` stand-in for x — so x itself need not be written — with the eager output, also
    through Inductor; ``GRAPH_QUANTIZE_RANK0 = False`` keeps it one ``svdquant::linear``."""
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "fused")
    layer, x = _rank0_fast8_layer()
    seen: list[tuple[int, ...]] = []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if "linear_fp8" in str(n.target):
                seen.append(tuple(n.args[0].meta["example_value"].shape))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert seen == [(1, 7, 0)] and torch.equal(out, layer(x))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))
    monkeypatch.setattr(ops, "GRAPH_QUANTIZE_RANK0", False)
    found, out = _graph_ops(layer, x)
    assert found == ["svdquant.linear"] and torch.equal(out, layer(x))


def test_linear_fp8_stand_in_needs_a_layer_without_low_rank_branch():
    """The empty stand-in for x is refused where x would be read: a layer with a low-rank branch."""
    layer, x = _fast8_layer()
    q, a = ops.fp8_activations(x.float(), layer.smooth)
    with pytest.raises(BackendError, match="stand-in for x needs a layer without a low-rank branch"):
        torch.ops.svdquant.linear_fp8(x.new_empty(7, 0), q, a, layer.qweight, layer.wscales, None, layer.smooth,
                                      layer.lora_down, layer.lora_up, layer.bias, None, "int4", "fp8w", 0.0,
                                      False, "reference")


def test_fast8_prologue_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SVDQ_FAST8_PROLOGUE", "Inductor ")
    assert ops._fast8_prologue_setting() == "inductor"
    monkeypatch.setenv("SVDQ_FAST8_PROLOGUE", "")
    assert ops._fast8_prologue_setting() == "fused"  # the default
    monkeypatch.setenv("SVDQ_FAST8_PROLOGUE", "fusd")
    with pytest.warns(UserWarning, match="SVDQ_FAST8_PROLOGUE='fusd' is not one of .* using 'fused'"):
        assert ops._fast8_prologue_setting() == "fused"


def test_fp8_quantizer_multiplies_by_reciprocals():
    """The FP8 modes' quantizer (docs/format.md §6): ``x̂ = (x + shift) · fp32(1/s)``, ``a = absmax/448``,
    ``q = e4m3(x̂ · fp32(1/a))`` — not the divisions (``exact`` keeps ``x / s``): the codes differ
    from dividing in rare entries (none here; ~1e-6 of them on real activations), by one e4m3
    step; ``1/s`` is made once per smoothing version."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1024, generator=g) * torch.logspace(-2, 2, 1024)
    smooth = (torch.rand(1024, generator=g) * 3 + 0.1).to(torch.bfloat16)
    q, a = ops.fp8_activations(x, smooth, 0.25)
    xs = (x + 0.25) * (1.0 / smooth.float())
    ra = 1.0 / (xs.abs().amax(dim=1, keepdim=True) / 448)
    assert torch.equal(a, (xs.abs().amax(dim=1) / 448))
    assert torch.equal(q.view(torch.uint8), (xs * ra).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    xd = (x + 0.25) / smooth.float()
    qd = (xd / (xd.abs().amax(dim=1, keepdim=True) / 448)).clamp(-448, 448).to(torch.float8_e4m3fn)
    differ = q.view(torch.uint8) != qd.view(torch.uint8)
    assert differ.float().mean() < 1e-4  # a last-bit difference must meet an e4m3 rounding tie
    step = (q.float() - qd.float()).abs()[differ] / torch.maximum(q.float().abs(), qd.float().abs())[differ]
    assert (step <= 2.0**-3 + 1e-6).all()
    assert ops.smooth_reciprocal(smooth) is ops.smooth_reciprocal(smooth)
    before = ops.smooth_reciprocal(smooth).clone()
    smooth.mul_(2)
    assert torch.equal(ops.smooth_reciprocal(smooth), before / 2)


def test_compiled_fast8_with_inductor_matches_eager():
    """Inductor (its CPU code generator here) lowers the graph quantizer — abs-max reduction, e4m3
    cast — to the same bits as eager."""
    layer, x = _fast8_layer()
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(got, layer(x))


# --------------------------------------------------------------------------- kernel side

def test_group64_configs_names_and_limits():
    from svdq_kernels.configs import DEFAULT_CONFIGS, GROUP64_CONFIGS, Group64GemmConfig

    names = [c.name for c in GROUP64_CONFIGS]
    assert len(set(names)) == len(names) and all(n.startswith("g64s4fp8_") for n in names)
    assert Group64GemmConfig(promote=2).name.endswith("_p2")
    assert set(GROUP64_CONFIGS) <= set(DEFAULT_CONFIGS)  # `svdq kernels build` prebuilds them
    c = GROUP64_CONFIGS[0]
    assert c.supports(m=16, n=3072, k=3072, group=64) is None
    assert "group" in c.supports(m=16, n=3072, k=3072, group=128)
    assert "tile_k" in c.supports(m=16, n=3072, k=3072 + 64, group=64)
    assert "multiple of 128" in c.supports(m=16, n=3072 + 64, k=3072, group=64)
    with pytest.raises(UnsupportedError):
        Group64GemmConfig(tile_k=64)
    with pytest.raises(UnsupportedError):
        Group64GemmConfig(promote=-1)
    with pytest.raises(UnsupportedError, match="cooperative"):
        Group64GemmConfig(tile_m=64, schedule="pingpong", scheduler="streamk")
    assert Group64GemmConfig(scheduler="streamk").name.endswith("_sk")


def test_group64_config_selection_and_override(monkeypatch):
    from svdq_kernels.configs import GROUP64_CONFIGS, group64_config

    monkeypatch.delenv("SVDQ_G64_CONFIG", raising=False)
    assert group64_config(4608).tile_n == 256 and group64_config(512).tile_n == 128
    assert group64_config(17).schedule == "pingpong" and group64_config(255).tile_m == 64
    for m in (1, 16):  # 16-token tiles, stream-K
        assert group64_config(m).tile_n == 16 and group64_config(m).scheduler == "streamk"
    assert all(c.lut for c in (group64_config(m) for m in (1, 17, 512, 4608)))
    # large M: stream-K where the 128 x 256 tiles leave the last wave mostly empty (132 SMs)
    assert group64_config(4608, n=3072).scheduler == "streamk"  # 432 tiles: 3.27 waves
    assert group64_config(4608, n=12288).scheduler == "streamk"  # 13.09 waves
    assert group64_config(4608, n=21504).scheduler == "persistent"  # 22.9 waves
    assert group64_config(4096, n=3072).scheduler == "persistent"  # 2.91 waves
    assert group64_config(4096, n=3072, sms=114).scheduler == "streamk"  # 3.37 waves on 114 SMs
    assert group64_config(1000, n=3072).tile_n == 128  # the choice below 2048 ignores N
    monkeypatch.setenv("SVDQ_G64_CONFIG", GROUP64_CONFIGS[3].name)
    assert group64_config(4608) is GROUP64_CONFIGS[3]
    monkeypatch.setenv("SVDQ_G64_CONFIG", "nope")
    with pytest.raises(UnsupportedError, match="SVDQ_G64_CONFIG"):
        group64_config(1)


def test_group64_source_instantiates_our_mainloop():
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import CSRC_DIR, render_source
    from svdq_kernels.configs import Group64GemmConfig

    cfg = Group64GemmConfig(tile_m=64, tile_n=128, schedule="pingpong", promote=1)
    src = render_source(cfg)
    assert '#include "svdq_sm90_mixed_input_g64.hpp"' in src
    assert "using TileShape = Shape<_64, _128, _128>;" in src
    assert "cutlass::gemm::KernelTmaWarpSpecializedPingpong" in src
    assert "cutlass::epilogue::TmaWarpSpecialized;" in src
    # PromoteKTiles, ScaleLut, LowRankUp, ConvertStages (0: the consumer conversion)
    assert "SvdqSm90MixedInputGroup64Mma<" in src and "\n    1, false, SVDQ_LOWRANK != 0, kConvertStages>;" in src
    assert "#define SVDQ_CONVERT_STAGES 0" in src
    assert "#define SVDQ_LOWRANK 0" in src
    lut = Group64GemmConfig(tile_m=128, tile_n=256, lut=True)
    assert lut.name.endswith("_lut") and "\n    0, true, SVDQ_LOWRANK != 0, kConvertStages>;" in render_source(lut)
    assert f'm.def("{cfg.name}(Tensor w, Tensor scales, Tensor rowinv, Tensor q, Tensor a, Tensor c) -> Tensor")' in src
    assert "${" not in src
    assert "Mainloop, Epilogue, void>;" in src  # the persistent scheduler
    sk = render_source(Group64GemmConfig(tile_n=64, scheduler="streamk"))
    assert "Mainloop, Epilogue, cutlass::gemm::StreamKScheduler>;" in sk
    header = (CSRC_DIR / "svdq_sm90_mixed_input_g64.hpp").read_text()
    assert "SPDX-License-Identifier: BSD-3-Clause" in header  # CUTLASS's license is kept
    assert header.count("svdq:") >= 6  # every change from the stock mainloop is marked


def test_lowrank_kernels_render_their_own_op_and_refuse_what_they_cannot_run():
    """``lowrank=True``: the low-rank k-tiles in the mainloop, an op that takes the bias, ``lr`` and
    ``l1`` instead of ``c``, a name of its own; only for e4m3 activations, tile_k 128, no promotion."""
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import render_source
    from svdq_kernels.configs import AUTO_GROUP64_CONFIGS, AUTO_GROUP64_LR_CONFIGS, Group64GemmConfig, group64_config

    cfg = Group64GemmConfig(tile_m=128, tile_n=256, lut=True, lowrank=True)
    src = render_source(cfg)
    assert cfg.name.endswith("_lut_lr") and "#define SVDQ_LOWRANK 1" in src and "${" not in src
    assert (f'm.def("{cfg.name}(Tensor w, Tensor scales, Tensor rowinv, Tensor q, Tensor a, Tensor bias, '
            'Tensor lr, Tensor l1) -> Tensor")') in src
    assert [dataclasses.replace(c, lowrank=False) for c in AUTO_GROUP64_LR_CONFIGS] == list(AUTO_GROUP64_CONFIGS)
    for m, n in ((4608, 3072), (4096, 3072), (512, 3072), (64, 12288), (1, 18432)):
        assert group64_config(m, n=n, lowrank=True) == dataclasses.replace(group64_config(m, n=n), lowrank=True)
    for bad in ({"activations": "f16"}, {"promote": 1}, {"tile_k": 256}):
        with pytest.raises(UnsupportedError, match="low-rank k-tiles"):
            Group64GemmConfig(lowrank=True, **bad)


def test_cache_key_covers_our_cpp_sources(monkeypatch):
    from svdq_kernels import build
    from svdq_kernels.configs import GROUP64_CONFIGS

    tc = build.Toolchain(nvcc="/x/nvcc", nvcc_version="13.0", cutlass_version="4.2.0.0",
                         cutlass_dir="/x", arch="sm_90a", torch_version="2.13", svdquant_version="0")
    key = build.cache_key(GROUP64_CONFIGS[0], tc)
    assert len(build.sources_digest()) == 64
    monkeypatch.setattr(build, "sources_digest", lambda: "0" * 64)
    assert build.cache_key(GROUP64_CONFIGS[0], tc) != key


def test_fast8_path_limits():
    from svdq_kernels import registry
    from svdq_kernels.cutlass_fast8 import fast8_unsupported

    assert registry.PATHS[("int4", "fp8w")].linear.__name__ == "fast8_linear"
    assert "bfloat16" in fast8_unsupported(3072, 3072, torch.float16)
    assert "tile_k" in fast8_unsupported(3072 + 64, 3072, torch.bfloat16)
    assert fast8_unsupported(3072, 3072, torch.bfloat16) is None


def test_set_mode_sets_every_layer_and_refuses_unknown_modes():
    from torch import nn

    model = nn.Sequential(sf.SVDQLinear(128, 64, rank=4), nn.GELU(), sf.SVDQLinear(64, 128, rank=4))
    assert sf.set_mode(model, "fast8", backend="reference") == 2
    assert all(m.mode == "fast8" and m.backend == "reference" for m in model if isinstance(m, sf.SVDQLinear))
    with pytest.raises(UnsupportedError, match="'turbo' is not one of"):
        sf.set_mode(model, "turbo")
    with pytest.raises(UnsupportedError, match="no SVDQ layer"):
        sf.set_mode(nn.Linear(2, 2), "fast")


def test_lowrank_source_rounds_the_fp32_product_once():
    """``[hi | lo] · [L1 | L1]ᵀ + bias`` (the fast8 low-rank source) is the fp32 ``lr · L1ᵀ + bias``
    rounded once to bf16 — within one bf16 ulp, where a bf16 ``lr`` alone is off by many."""
    from svdq_kernels.cutlass_fast8 import _UPS, lowrank_source

    g = torch.Generator().manual_seed(4)
    m, n, r = 64, 96, 32
    lr = torch.randn(m, r, generator=g) * 3
    up = (torch.randn(n, r, generator=g) * 0.2).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    hi = lr.to(torch.bfloat16)
    lr16 = torch.cat([hi, (lr - hi.float()).to(torch.bfloat16)], dim=1)
    ref = lr.double() @ up.double().T + bias.double()
    c = lowrank_source(lr16, up, bias, m=m, n=n, device=torch.device("cpu"))
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs()
    assert ((c.double() - ref).abs() <= ulp).all()
    naive = (hi @ up.T + bias).double()  # lr rounded to bf16 first: an error before the final rounding
    assert (naive - ref).abs().mean() > 1.5 * (c.double() - ref).abs().mean()
    assert (up,) in _UPS  # [L1 | L1] is cached for the next call
    assert torch.equal(lowrank_source(None, None, bias, m=2, n=n, device=torch.device("cpu")), bias.expand(2, n))
    assert not lowrank_source(None, None, None, m=2, n=n, device=torch.device("cpu")).any()


def test_first_use_builds_exactly_the_kernels_the_selection_picks():
    """``AUTO_GROUP64_CONFIGS`` (compiled together on first use) is the set ``group64_config`` can
    return for any token count."""
    from svdq_kernels.configs import AUTO_GROUP64_CONFIGS, group64_config

    picked = {group64_config(m, n=n).name for m in (1, 2, 16, 17, 64, 255, 256, 1000, 2047, 2048, 4608, 65536)
              for n in (None, 3072, 21504)}
    assert picked == {c.name for c in AUTO_GROUP64_CONFIGS} and len(AUTO_GROUP64_CONFIGS) == len(picked)


def test_device_guard_switches_only_to_another_gpu(monkeypatch):
    """Launch helpers enter ``torch.cuda.device`` only for tensors on a non-current GPU (the
    context costs host time on every eager layer call)."""
    import contextlib

    from svdq_kernels._device import device_guard

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    for dev in ("cpu", "cuda:0"):
        with device_guard(torch.device(dev)):
            pass
    assert entered == []
    with device_guard(torch.device("cuda:1")):
        pass
    assert entered == [torch.device("cuda:1")]


def test_w4a16_variant_of_the_group64_kernel():
    """``activations="f16"``: the same tiling with an fp16 activation operand (int4 W4A16 layers);
    the table conversion is e4m3-only."""
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import render_source
    from svdq_kernels.configs import AUTO_GROUP64_W4A16_CONFIGS, Group64GemmConfig, group64_config

    cfg = Group64GemmConfig(tile_n=16, scheduler="streamk", activations="f16")
    src = render_source(cfg)
    assert cfg.name == "g64s4f16_128x16x128_c1x1_cooperative_sk" and "using ElementX = cutlass::half_t;" in src
    assert "q.scalar_type() == at::kHalf" in src and "${" not in src
    fp8 = render_source(Group64GemmConfig(tile_n=16, scheduler="streamk"))
    assert "using ElementX = cutlass::float_e4m3_t;" in fp8 and "at::kFloat8_e4m3fn" in fp8
    with pytest.raises(UnsupportedError, match="lut"):
        Group64GemmConfig(lut=True, activations="f16")
    with pytest.raises(UnsupportedError, match="activations"):
        Group64GemmConfig(activations="bf16")
    for m, n in ((1, 18432), (64, 3072), (512, 3072), (4608, 3072), (4608, 21504)):
        twin = group64_config(m, n=n, activations="f16")
        assert twin in AUTO_GROUP64_W4A16_CONFIGS and twin.activations == "f16" and not twin.lut
        assert dataclasses.replace(twin, activations="e4m3", lut=True) == group64_config(m, n=n)


def test_fast8_and_w4a16_layers_share_the_group64_tail(monkeypatch):
    """Both CUTLASS layers (fast8, experimental W4A16) run ``cutlass_fast8.group64_layer`` with
    their own weight preparation: checked on the CPU with stand-ins for the GPU kernels."""
    from svdq_kernels import cutlass_fast8, cutlass_w4a16

    g = torch.Generator().manual_seed(7)
    m, k, n, r = 5, 256, 128, 8
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    ws = (torch.rand(n, k // 64, generator=g) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = torch.ones(k, dtype=torch.bfloat16)
    down = torch.randn(r, k, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    seen = []

    def fake_prologue(x2, smooth, down, *, act_shift=0.0, lr16=False, w16=False, lora_scales=None, **_):
        q = torch.zeros(x2.shape, dtype=torch.float16 if w16 else torch.float8_e4m3fn)
        return q, torch.ones(x2.shape[0]), torch.zeros(x2.shape[0], 2 * down.shape[0], dtype=torch.bfloat16)

    def fake_gemm(qweight, scales16, rowinv, q, a, c, *, config=None):
        seen.append((scales16, rowinv, q.dtype))
        return c.clone()

    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", False)  # the two-step tail (test below: the k-tiles)
    monkeypatch.setattr(cutlass_fast8, "prologue", fake_prologue)
    monkeypatch.setattr(cutlass_w4a16, "prologue", fake_prologue)
    monkeypatch.setattr(cutlass_fast8, "group64_gemm", fake_gemm)
    # the fast8 layer with its low-rank source from cuBLAS (LOWRANK_IN_GEMM, the default now, runs
    # the low-rank k-tiles GEMM instead, whose inputs test_lowrank_k_tiles_compute_the_fast8_layer checks)
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", False)
    args = (qw, ws, None, smooth, down, up, None, None, "int4")
    y8 = cutlass_fast8.fast8_linear(x, *args, "fp8w")
    y16 = cutlass_w4a16.w4a16_linear(x, *args, "none")
    assert y8.shape == y16.shape == (m, n)
    (s8, r8, q8), (s16, r16, q16) = seen
    assert q8 == torch.float8_e4m3fn and q16 == torch.float16
    want8, want16 = cutlass_fast8.fast8_weights(qw, ws), cutlass_w4a16.w4a16_weights(ws)
    assert torch.equal(s8, want8[0]) and torch.equal(r8, want8[1])
    assert want16 is not None and torch.equal(s16, want16[0]) and torch.equal(r16, want16[1])


def test_fast8_layer_with_lowrank_k_tiles_hands_the_kernel_its_inputs(monkeypatch):
    """With the low-rank k-tiles (the default) and ``SVDQ_FAST8_PROLOGUE=inductor`` both fast8 entry
    points quantize without the low-rank branch, then call the ``lowrank`` GEMM with the
    sentinel-extended scales, ``a'`` and ``lr`` of ``lowrank_tiles``, ``l1 = L1 / rowinv`` and the
    bias: checked on the CPU with stand-ins for the Triton and CUTLASS kernels (their math:
    tests/test_kernels_interpreter.py, the GPU tests; the fused prologue: the next test)."""
    from svdq_format import ops
    from svdq_kernels import cutlass_fast8, lowrank_tiles

    assert cutlass_fast8.LOWRANK_IN_GEMM
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "inductor")
    g = torch.Generator().manual_seed(8)
    m, k, n, r = 5, 256, 128, 40
    x = torch.randn(2, m, k, generator=g).to(torch.bfloat16)
    qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    ws = (torch.rand(n, k // 64, generator=g) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = torch.ones(k, dtype=torch.bfloat16)
    down = torch.randn(r, k, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    calls = []

    def fake_prologue(x2, smooth, down, **kw):
        assert down is None and not kw.get("lr16")  # the branch is the GEMM's now
        return torch.zeros(x2.shape, dtype=torch.float8_e4m3fn), torch.full((x2.shape[0],), 0.5), None

    def fake_tiles(x2, down_, a, *, lora_scales=None):
        assert x2.shape == (2 * m, k) and down_ is not None and a.shape == (2 * m,)
        return torch.zeros(2 * m, 128, dtype=torch.bfloat16), a.clone()

    def fake_gemm(qweight, scales, rowinv, q, a, b, lr, l1, *, config=None):
        calls.append((scales, rowinv, q, a, b, lr, l1))
        return torch.zeros(q.shape[0], qweight.shape[0], dtype=torch.bfloat16)

    monkeypatch.setattr(cutlass_fast8, "prologue", fake_prologue)
    monkeypatch.setattr(cutlass_fast8, "lowrank_tiles", fake_tiles)
    monkeypatch.setattr(cutlass_fast8, "group64_gemm_lowrank", fake_gemm)
    args = (qw, ws, None, smooth, down, up, bias, None, "int4", "fp8w")
    assert cutlass_fast8.fast8_linear(x, *args).shape == (2, m, n)
    q, a = ops.fp8_activations(x.reshape(-1, k).float(), smooth)
    assert cutlass_fast8.fast8_linear_fp8(x, q, a, *args).shape == (2, m, n)
    assert len(calls) == 2
    plain, rowinv0 = cutlass_fast8.fast8_weights(qw, ws)
    for scales, rowinv, _q, _a, b, lr, l1 in calls:
        assert scales.shape == (k // 64 + 2 * 2, n) and torch.equal(scales[: k // 64], plain)  # rank 40: 2 k-tiles
        assert (scales[k // 64:].view(torch.int16) == lowrank_tiles.SENTINEL_BITS).all()
        assert torch.equal(rowinv, rowinv0) and torch.equal(b, bias)
        assert torch.equal(l1, lowrank_tiles.padded_up(up, rowinv0)) and l1.shape == (n, 64)
    assert torch.equal(calls[1][2].view(torch.uint8), q.view(torch.uint8)) and torch.equal(calls[1][3], a)


def _lowrank_layer(m: int, k: int, n: int, r: int, *, seed: int):
    """``(x, qweight, wscales, smooth, L2, L1)`` of a random bf16 low-rank layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    ws = (torch.rand(n, k // 64, generator=g) * 0.004 + 0.001).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    down = torch.randn(r, k, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    return x, qw, ws, smooth, down, up


def test_fused_prologue_hands_the_kernel_the_quantize_lowrank_outputs(monkeypatch):
    """``SVDQ_FAST8_PROLOGUE=fused``: the eager ``fast8`` layer (and so the compiled graph's
    ``svdquant::linear``) takes ``q``, ``a'`` and the k-tiles from one ``quantize_lowrank`` call
    (per-rank scales passed on; no shift: it is in the bias the GEMM gets, ``ops.fp8_bias``) instead of
    the prologue and ``lowrank_tiles``."""
    from svdq_kernels import cutlass_fast8

    m, k, n, r = 6, 256, 128, 16
    x, qw, ws, smooth, down, up = _lowrank_layer(m, k, n, r, seed=9)
    ls = torch.linspace(0.5, 1.5, r).to(torch.bfloat16)
    outs = (torch.ones(m, k, dtype=torch.float8_e4m3fn), torch.full((m,), 0.25),
            torch.ones(m, 64, dtype=torch.bfloat16), torch.full((m,), 0.5))
    seen = []

    def fake_quantize_lowrank(x2, smooth_, down_, *, act_shift=0.0, lora_scales=None):
        seen.append((x2, smooth_, down_, act_shift, lora_scales))
        return outs

    def refuse(*args, **kwargs):
        raise AssertionError("the fused prologue replaces the prologue and lowrank_tiles")

    def fake_gemm(qweight, scales, rowinv, q, a, b, lr, l1, *, config=None):
        seen.append((q, a, lr, b))
        return torch.zeros(q.shape[0], qweight.shape[0], dtype=torch.bfloat16)

    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "fused")
    monkeypatch.setattr(cutlass_fast8, "quantize_lowrank", fake_quantize_lowrank)
    monkeypatch.setattr(cutlass_fast8, "prologue", refuse)
    monkeypatch.setattr(cutlass_fast8, "lowrank_tiles", refuse)
    monkeypatch.setattr(cutlass_fast8, "group64_gemm_lowrank", fake_gemm)
    y = cutlass_fast8.fast8_linear(x, qw, ws, None, smooth, down, up, None, ls, "int4", "fp8w", 0.5)
    assert y.shape == (m, n) and len(seen) == 2
    x2, smooth_, down_, shift, lrs = seen[0]
    assert torch.equal(x2, x) and smooth_ is smooth and torch.equal(down_, down) and shift == 0 and lrs is ls
    q, a, lr, b = seen[1]
    assert q is outs[0] and a is outs[3] and lr is outs[2]  # a' (not a) is the GEMM's token scale
    want = ops.fp8_bias(qw, ws, None, smooth, None, "int4", "fp8w", 0.5, dtype=torch.bfloat16)
    assert want is not None and b is not None and torch.equal(b, want)  # the shift, as a bias
