"""The pre-converted ``fast8`` GEMM (``SsLowrankGemmConfig``, issue 23 lever 5) on the CPU: its
configurations, selection, source generation, the ``l1`` layout it reads, and the layer's dispatch
(``SVDQ_FAST8_WEIGHTS=e4m3``) with the kernels replaced by their float64 arithmetic. Its kernel runs
in ``tests/test_kernels_ss_gpu.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from svdq_format import ops, packing
from svdq_format.errors import UnsupportedError
from svdq_kernels import build, configs, cutlass_fast8, lowrank_tiles
from svdq_kernels.configs import (
    AUTO_GROUP64_LR_CONFIGS,
    DEFAULT_CONFIGS,
    SS_LOWRANK_CANDIDATES,
    SS_LOWRANK_CONFIGS,
    SS_TUNED_CONFIGS,
    Group64GemmConfig,
    SsLowrankGemmConfig,
    config_by_name,
    group64_config,
    ss_lowrank_config,
    ss_tuned_config,
)

SS = SsLowrankGemmConfig(tile_m=128, tile_n=256)


def test_ss_configs_are_the_low_rank_tilings_with_their_own_names_and_keys():
    assert [c.tiling() for c in SS_LOWRANK_CONFIGS] == [
        (c.tile_m, c.tile_n, c.tile_k, c.schedule, c.scheduler) for c in AUTO_GROUP64_LR_CONFIGS[:3]]
    assert [c.name for c in SS_LOWRANK_CONFIGS] == [
        "ss_e4m3_128x256x128_c1x1_cooperative_lr", "ss_e4m3_128x256x128_c1x1_cooperative_sk_lr",
        "ss_e4m3_128x128x128_c1x1_cooperative_lr"]
    assert SS_LOWRANK_CONFIGS[0] == SS and SS.kind == "svdq_ss_gemm"
    assert all(config_by_name(c.name) == c for c in SS_LOWRANK_CONFIGS)
    tc = build.Toolchain(nvcc="/x/nvcc", nvcc_version="13.0", cutlass_version="4.2.0.0",
                         cutlass_dir="/x", arch="sm_90a", torch_version="2.13", svdquant_version="0")
    keys = {build.cache_key(c, tc) for c in (*SS_LOWRANK_CONFIGS, *AUTO_GROUP64_LR_CONFIGS)}
    assert len(keys) == len(SS_LOWRANK_CONFIGS) + len(AUTO_GROUP64_LR_CONFIGS)
    # opt-in: not prebuilt, not a group-64 kernel
    assert not set(SS_LOWRANK_CONFIGS) & set(DEFAULT_CONFIGS)
    assert not any(isinstance(c, Group64GemmConfig) for c in SS_LOWRANK_CONFIGS)


@pytest.mark.parametrize("bad, needle", [
    ({"tile_k": 256}, "tile_k 256"),
    ({"schedule": "pingpong", "tile_m": 64, "tile_n": 128, "scheduler": "streamk"}, "stream-K scheduler needs"),
    ({"schedule": "pingpong"}, "tile 128 x 256: over 128 accumulator registers a thread for the pingpong"),
    ({"tile_m": 256}, "tile 256 x 256: over 128 accumulator registers a thread for the cooperative"),
    ({"cluster_m": 2, "cluster_n": 2}, "clusters of 1 x 1, 2 x 1 and 1 x 2"),
    ({"cluster_m": 4}, "cluster sizes must be 1 or 2"),
    ({"schedule": "cooperative", "tile_m": 64, "tile_n": 128}, "multiple of 128"),
    ({"scheduler": "splitk"}, "'persistent' or 'streamk'"),
    ({"tile_n": 48}, "wgmma N tile"),
])
def test_invalid_ss_configs_are_refused(bad, needle):
    fields = {**dataclasses.asdict(SS), **bad}
    fields.pop("kind")
    with pytest.raises(UnsupportedError, match=needle):
        SsLowrankGemmConfig(**fields)


def test_ss_config_supports_whole_tiles_only():
    assert SS.supports(m=4608, n=3072, k=3072, group=64) is None
    assert "multiple of tile_k" in SS.supports(m=4608, n=3072, k=3136, group=64)
    assert "multiple of 128" in SS.supports(m=4608, n=3000, k=3072, group=64)
    wide = SsLowrankGemmConfig(tile_m=256, tile_n=128)
    assert wide.supports(m=4608, n=3072, k=3072, group=64) is None
    assert "multiple of tile_m 256" in wide.supports(m=4608, n=3200, k=3072, group=64)


def test_ss_candidates_are_valid_new_named_tilings_never_picked():
    """The candidate tilings (clusters, 256 × 128, pingpong): unique names and cache keys, none of today's
    kernels, found by name, buildable on their own (``svdq kernels build --config``), never chosen by
    :func:`ss_lowrank_config` (three of them are :data:`SS_TUNED_CONFIGS`)."""
    from svdq_kernels.configs import SS_LOWRANK_CANDIDATES

    names = [c.name for c in SS_LOWRANK_CANDIDATES]
    assert 6 <= len(names) <= 10 and len(set(names)) == len(names)
    assert not set(names) & {c.name for c in (*SS_LOWRANK_CONFIGS, *DEFAULT_CONFIGS, *AUTO_GROUP64_LR_CONFIGS)}
    assert all(config_by_name(n) == c for n, c in zip(names, SS_LOWRANK_CANDIDATES))
    assert all(isinstance(c, SsLowrankGemmConfig) and c.tile_k == 128 for c in SS_LOWRANK_CANDIDATES)
    # what the brief of the search asked for, first: a 2 x 1 cluster of 128 x 256 on both schedulers, a pingpong
    assert names[:3] == ["ss_e4m3_128x256x128_c2x1_cooperative_lr", "ss_e4m3_128x256x128_c2x1_cooperative_sk_lr",
                         "ss_e4m3_128x128x128_c1x2_pingpong_lr"]
    assert {(c.cluster_m, c.cluster_n) for c in SS_LOWRANK_CANDIDATES} == {(1, 1), (2, 1), (1, 2)}
    assert {c.schedule for c in SS_LOWRANK_CANDIDATES} == {"cooperative", "pingpong"}
    tc = build.Toolchain(nvcc="/x/nvcc", nvcc_version="13.0", cutlass_version="4.2.0.0",
                         cutlass_dir="/x", arch="sm_90a", torch_version="2.13", svdquant_version="0")
    keys = {build.cache_key(c, tc) for c in (*SS_LOWRANK_CANDIDATES, *SS_LOWRANK_CONFIGS)}
    assert len(keys) == len(SS_LOWRANK_CANDIDATES) + len(SS_LOWRANK_CONFIGS)
    for m in (2048, 3000, 4096, 4608, 8192, 16384):
        for n in (3072, 9216, 12288, 15360, 21504):
            assert ss_lowrank_config(m, n=n, sms=132) in SS_LOWRANK_CONFIGS
    for c in SS_LOWRANK_CANDIDATES:  # the FLUX shapes the benchmark times are whole tiles of each
        for n, k in ((3072, 3072), (9216, 3072), (3072, 15360), (21504, 3072)):
            assert c.supports(m=4608, n=n, k=k, group=64) is None


def test_today_s_ss_kernels_keep_their_cache_keys():
    """Allowing clusters and pingpong added no field: today's kernels' keys (and the prebuilt caches that
    carry them) are what they were; the dict hashed is the same fields as before."""
    assert set(SS.as_dict()) == {"tile_m", "tile_n", "tile_k", "cluster_m", "cluster_n", "schedule", "stages",
                                 "kind", "scheduler"}


@pytest.mark.parametrize("m, n", [(4608, 3072), (4608, 21504), (4096, 3072), (2048, 12288), (4608, 9216),
                                  (1000, 3072), (256, 3072)])
def test_ss_selection_is_the_twin_of_the_lowrank_tiling(m, n):
    g64 = group64_config(m, n=n, sms=132, lowrank=True)
    ss = ss_lowrank_config(m, n=n, sms=132)
    assert ss is not None and ss.tiling() == (g64.tile_m, g64.tile_n, g64.tile_k, g64.schedule, g64.scheduler)


_P12, _P21, _SK21 = ("ss_e4m3_128x128x128_c1x2_pingpong_lr", "ss_e4m3_128x128x128_c2x1_pingpong_lr",
                      "ss_e4m3_128x256x128_c2x1_cooperative_sk_lr")


@pytest.mark.parametrize("m, k, n, want", [
    (4608, 3072, 3072, _P12), (4096, 3072, 3072, _P12), (4608, 3072, 4096, _P12),
    (4608, 3072, 9216, _P21), (2048, 3072, 21504, _P21),
    (4608, 12288, 3072, _SK21), (4096, 15360, 3072, _SK21), (4608, 4224, 3072, _SK21),
])
def test_layers_take_the_tuned_ss_tiling_of_their_shape(m, k, n, want):
    """K ≤ 4096: 128 × 128 pingpong, the cluster along the weights (1 × 2) up to N = 4096, along the
    tokens (2 × 1) above; K > 4096: 128 × 256 stream-K with a 2 × 1 cluster (the H100 timing of the
    candidates, :data:`SS_TUNED_CONFIGS`); each a prebuilt candidate."""
    config = ss_tuned_config(m, n=n, k=k, sms=132)
    assert config is not None and config.name == want and config in SS_TUNED_CONFIGS
    assert config in SS_LOWRANK_CANDIDATES and config.supports(m=m, n=n, k=k, group=64) is None


def test_small_m_has_no_tuned_ss_tiling():
    """Where the group-64 tiling has no pre-converted twin (small M), no tuned kernel either."""
    assert ss_tuned_config(255, n=3072, k=3072) is None and ss_tuned_config(16, n=3072, k=12288) is None


@pytest.mark.parametrize("m", [1, 16, 17, 255])
def test_small_m_tilings_have_no_ss_twin(m):
    assert ss_lowrank_config(m, n=3072) is None


def test_ss_source_instantiates_the_ss_mainloop_with_the_lowrank_op():
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import CSRC_DIR, render_source

    for config in SS_LOWRANK_CONFIGS:
        src = render_source(config)
        assert "${" not in src and f"// svdquant kernel {config.name}" in src
        assert '#include "svdq_sm90_ss_lowrank.hpp"' in src
        assert "svdq_sm90_mixed_input_g64.hpp" not in src  # no int4 mainloop
        assert f"using TileShape = Shape<_{config.tile_m}, _{config.tile_n}, _128>;" in src
        assert "cutlass::gemm::MainloopSm90TmaGmmaWarpSpecialized<kStages, ClusterShape, KernelSchedule>" in src
        assert "cutlass::gemm::collective::SvdqSm90SsLowRankMma<" in src
        assert "using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;" in src
        scheduler = "cutlass::gemm::StreamKScheduler" if config.scheduler == "streamk" else "void"
        assert f"GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, {scheduler}>" in src
        assert (f'm.def("{config.name}(Tensor w8, Tensor rowinv, Tensor q, Tensor a, Tensor bias, '
                'Tensor lr, Tensor l1) -> Tensor")') in src
        assert "at::kFloat8_e4m3fn" in src and "Sm90ColBroadcast<0, TileShape, ElementOut" in src  # the bias
    header = (CSRC_DIR / "svdq_sm90_ss_lowrank.hpp").read_text()
    # the multicast masks of the operands also carry the low-rank k-tiles' L1 (like A) and lr (like B)
    assert "tma_load_l1.with(*tma_barrier, mcast_mask_a)" in header
    assert "tma_load_lr.with(*tma_barrier, mcast_mask_b)" in header
    assert "SPDX-License-Identifier: BSD-3-Clause" in header  # CUTLASS's license is kept
    assert header.count("svdq:") >= 15  # every change from the stock mainloop is marked
    for piece in ("struct SvdqSm90SsLowRankMma", "store_k_tile_index(", "load_k_tile_index(", "TiledMmaLR",
                  "GMMA::ScaleOut::Zero"):
        assert piece in header


def test_ss_candidate_sources_carry_their_cluster_and_schedule():
    """Each candidate renders the same template (so today's kernels' sources and digest are unchanged)
    with its cluster shape and CUTLASS's kernel / epilogue schedule pair; stream-K only cooperative."""
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import render_source
    from svdq_kernels.configs import SS_LOWRANK_CANDIDATES

    schedules = {
        "cooperative": ("cutlass::gemm::KernelTmaWarpSpecializedCooperative",
                        "cutlass::epilogue::TmaWarpSpecializedCooperative"),
        "pingpong": ("cutlass::gemm::KernelTmaWarpSpecializedPingpong", "cutlass::epilogue::TmaWarpSpecialized"),
    }
    for config in SS_LOWRANK_CANDIDATES:
        src = render_source(config)
        assert "${" not in src and f"// svdquant kernel {config.name}" in src
        assert f"using TileShape = Shape<_{config.tile_m}, _{config.tile_n}, _128>;" in src
        assert f"using ClusterShape = Shape<_{config.cluster_m}, _{config.cluster_n}, _1>;" in src
        kernel, epilogue = schedules[config.schedule]
        assert f"using KernelSchedule = {kernel};" in src and f"using EpilogueSchedule = {epilogue};" in src
        scheduler = "cutlass::gemm::StreamKScheduler" if config.scheduler == "streamk" else "void"
        assert f"GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, {scheduler}>" in src
        assert f'm.def("{config.name}(Tensor w8,' in src
        # the same translation unit as today's kernel but for these lines
        today = render_source(SS_LOWRANK_CONFIGS[0])
        differ = [a for a, b in zip(src.splitlines()[2:], today.splitlines()[2:]) if a != b]
        expected = ("TileShape = ", "ClusterShape = ", "Schedule = ", "GemmUniversal<", "kStageBytes", config.name)
        assert all(any(t in line for t in expected) for line in differ), differ


def test_padded_up64_spreads_padded_up_over_the_k_tiles():
    """``l1`` of the pre-converted kernels: ranks ``32j … 32j+31`` in columns ``64j … 64j+31`` (the
    columns ``lowrank_tiles`` fills in ``lr``), zeros elsewhere; the values are ``padded_up``'s."""
    g = torch.Generator().manual_seed(1)
    n, r = 128, 48  # two k-tiles, the second half full
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    rowinv = torch.exp2(torch.randint(-3, 4, (n,), generator=g).float())
    l1 = lowrank_tiles.padded_up64(up, rowinv)
    narrow = lowrank_tiles.padded_up(up, rowinv)
    assert l1.shape == (n, 128) and l1.dtype == torch.bfloat16 and l1.is_contiguous()
    assert torch.equal(l1[:, 0:32], narrow[:, 0:32]) and torch.equal(l1[:, 64:96], narrow[:, 32:64])
    assert not l1[:, 32:64].any() and not l1[:, 96:].any()
    assert torch.equal(l1[:, 0:32].float(), (up[:, :32].float() / rowinv[:, None]).to(torch.bfloat16).float())
    assert lowrank_tiles.padded_up64(up, rowinv) is l1  # cached per tensor and version
    up.mul_(2)
    assert not torch.equal(lowrank_tiles.padded_up64(up, rowinv), l1)
    # lr (lowrank_tiles' layout: [M, 64 t], the same columns) times l1 is the low-rank product
    m = 5
    lr_ranks = torch.randn(m, r, generator=g).to(torch.bfloat16)
    lr = torch.zeros(m, 2, 64, dtype=torch.bfloat16)
    lr[:, 0, :32], lr[:, 1, :16] = lr_ranks[:, :32], lr_ranks[:, 32:]
    got = lr.reshape(m, 128).double() @ lowrank_tiles.padded_up64(up, rowinv).double().t()
    want = lr_ranks.double() @ (up.float() / rowinv[:, None]).to(torch.bfloat16).double().t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the layer's dispatch, the kernels replaced by their arithmetic in float64 -----------------------

def _ss_op(w8, rowinv, q, a, bias, lr, l1):
    """The pre-converted kernel's math: ``(q · w8ᵀ + lr · l1ᵀ) · rowinv · a + bias`` (bf16 out)."""
    acc = q.double() @ w8.double().t() + lr.double() @ l1.double().t()
    out = acc * rowinv.double() * a.double()[:, None]
    return (out + bias.double() if bias.numel() else out).to(torch.bfloat16)


def _g64_op(qweight, scales, rowinv, q, a, bias, lr, l1):
    """The ``lowrank`` group-64 kernel's math (int4 codes, sentinel-extended scales, l1 ``[N, 32 t]``)."""
    m, t = q.shape[0], l1.shape[1] // 32
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    w8 = packing.fp8_weight_values(codes, scales[: q.shape[1] // 64].t())
    lr_used = lr.view(m, t, 2, 32)[:, :, 0].reshape(m, 32 * t)
    return _ss_op(w8, rowinv, q, a, bias, lr_used, l1)


@pytest.fixture()
def emulated(monkeypatch):
    """``cutlass_fast8`` with its kernels (CUTLASS ops, the e4m3 pass, ``lowrank_tiles``) replaced by
    CPU arithmetic; records which kernels ran."""
    return emulate_kernels(monkeypatch)


def emulate_kernels(monkeypatch) -> list[object]:
    """:func:`emulated`'s body, for other modules' tests: the list it records the kernels in."""
    calls: list[object] = []

    def load(config, *, also_build=()):
        calls.append(config)
        return _ss_op if isinstance(config, SsLowrankGemmConfig) else _g64_op

    def e4m3_weights(qweight, scales16):
        calls.append("e4m3_weights")
        codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
        return packing.fp8_weight_values(codes, scales16.t()).to(torch.float8_e4m3fn)

    def tiles(x, down, a, *, lora_scales=None):
        m, r = x.shape[0], down.shape[0]
        t = lowrank_tiles.lowrank_k_tiles(r)
        ag = torch.where(a > 0, a, torch.ones_like(a))
        ranks = torch.zeros(m, 32 * t)
        ranks[:, :r] = x.float() @ down.float().t() / ag[:, None]
        lr = torch.zeros(m, t, 64, dtype=torch.bfloat16)
        lr[:, :, :32] = ranks.view(m, t, 32).to(torch.bfloat16)
        return lr.view(m, 64 * t), ag

    monkeypatch.setattr(cutlass_fast8, "load_kernel", load)
    monkeypatch.setattr(cutlass_fast8, "e4m3_weights", e4m3_weights)
    monkeypatch.setattr(cutlass_fast8, "lowrank_tiles", tiles)
    monkeypatch.setattr(cutlass_fast8, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cutlass_fast8, "LOWRANK_IN_GEMM", True)
    return calls


def layer_weights(g: torch.Generator, n: int, k: int, r: int) -> tuple[torch.Tensor, ...]:
    """A random fast8 layer's ``(qweight, wscales, smooth, down, up, bias)``, drawn from ``g`` in that
    order (bf16 factors; the emulated-kernel tests' layers)."""
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16)
    down = (torch.randn(r, k, generator=g) / k**0.5).to(torch.bfloat16)
    up = (torch.randn(n, r, generator=g) * 0.5).to(torch.bfloat16)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)
    return qweight, wscales, smooth, down, up, bias


def _layer(m, n=128, k=256, r=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    x[3] = 0  # a zero row: a' = 1, the low-rank term still added
    return (x, *layer_weights(g, n, k, r))


def _run(x, qweight, wscales, smooth, down, up, bias):
    q, a = ops.quantize_fp8_rows(ops.smoothed(x, smooth, 0.0))
    return cutlass_fast8.fast8_linear_fp8(x, q, a, qweight, wscales, None, smooth, down, up, bias, None,
                                          "int4", "fp8w")


def test_e4m3_weights_setting_routes_large_m_through_the_pre_pass_and_the_ss_kernel(emulated, monkeypatch):
    """With ``WEIGHTS = "e4m3"`` an M ≥ 2048 low-rank call runs ``e4m3_weights`` on the layer's
    ``fast8_weights`` scales, then the pre-converted kernel with ``padded_up64``'s ``l1``: the same
    output as the int4 kernel's arithmetic, and within the fast8 layer's bound of the reference."""
    x, qweight, wscales, smooth, down, up, bias = _layer(2048)
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "int4")
    want = _run(x, qweight, wscales, smooth, down, up, bias)
    assert emulated == [group64_config(2048, n=128, sms=132, lowrank=True)]
    emulated.clear()
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "e4m3")
    got = _run(x, qweight, wscales, smooth, down, up, bias)
    assert emulated == ["e4m3_weights", ss_tuned_config(2048, n=128, k=256, sms=132)]
    assert got.shape == (2048, 128) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8w").double()
    assert ((got.double() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.parametrize("m, weights", [(2047, "e4m3"), (64, "e4m3"), (4608, "int4")])
def test_small_m_or_int4_setting_keeps_the_group64_kernel(emulated, monkeypatch, m, weights):
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", weights)
    _run(*_layer(m, r=32))
    assert emulated == [group64_config(m, n=128, sms=132, lowrank=True)]


def test_ss_gemm_lowrank_builds_the_ss_kernels_together(monkeypatch):
    calls = []

    def fake_load(config, *, also_build=()):
        calls.append((config, tuple(also_build)))
        return lambda *args: None

    monkeypatch.setattr(cutlass_fast8, "load_kernel", fake_load)
    monkeypatch.setattr(cutlass_fast8, "_sm_count", lambda index: 132)
    w8 = torch.zeros(3072, 3072, dtype=torch.float8_e4m3fn)
    cutlass_fast8.ss_gemm_lowrank(w8, None, torch.zeros(4608, 3072, dtype=torch.float8_e4m3fn), None, None, None, None)
    ((config, also),) = calls
    assert config == ss_lowrank_config(4608, n=3072) == SS_LOWRANK_CONFIGS[1]  # 3.3 waves: stream-K
    assert set(also) == set(SS_LOWRANK_CONFIGS)  # the twins: a layer's tuned kernel builds the tuned family
    calls.clear()
    tuned = SS_TUNED_CONFIGS[0]
    cutlass_fast8.ss_gemm_lowrank(w8, None, torch.zeros(4608, 3072, dtype=torch.float8_e4m3fn), None, None, None,
                                  None, config=tuned)
    assert calls == [(tuned, SS_TUNED_CONFIGS)]
    with pytest.raises(UnsupportedError, match="M >= 2048"):
        cutlass_fast8.ss_gemm_lowrank(w8, None, torch.zeros(16, 3072, dtype=torch.float8_e4m3fn), None, None, None,
                                      None)


def test_weights_setting_comes_from_the_environment(monkeypatch):
    """``SVDQ_FAST8_WEIGHTS`` (read at import into ``WEIGHTS``): ``e4m3`` by default, a bad value warns."""
    for value, want in (("e4m3", "e4m3"), ("", "e4m3"), (" INT4 ", "int4")):
        monkeypatch.setenv("SVDQ_FAST8_WEIGHTS", value)
        assert cutlass_fast8._weights_setting() == want
    monkeypatch.setenv("SVDQ_FAST8_WEIGHTS", "fp8")
    with pytest.warns(UserWarning, match="SVDQ_FAST8_WEIGHTS='fp8' is not one of"):
        assert cutlass_fast8._weights_setting() == "e4m3"
    assert cutlass_fast8.WEIGHTS == "e4m3"  # this process's setting (the suite runs without it)


def test_cli_lists_the_ss_kernels_unless_opted_out(capsys, tmp_path, monkeypatch):
    pytest.importorskip("cutlass_library")
    from svdq_format.cli import main

    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "int4")
    assert main(["kernels", "build", "--list"]) == 0
    int4 = capsys.readouterr().out.split()
    assert not any(n.startswith("ss_") for n in int4)
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", "e4m3")
    assert main(["kernels", "build", "--list"]) == 0
    assert sorted(set(capsys.readouterr().out.split()) - set(int4)) == sorted(c.name for c in SS_TUNED_CONFIGS)
    assert main(["kernels", "build", "--list", "--config", SS.name]) == 0
    assert capsys.readouterr().out.split() == [SS.name]
    assert main(["kernels", "info"]) == 0
    info = capsys.readouterr().out
    want = "fast8_weights: e4m3 (SVDQ_FAST8_WEIGHTS: int4 | e4m3; e4m3 at M >= 2048: " + SS_TUNED_CONFIGS[0].name
    assert want in info


def test_configs_module_lists_the_new_names():
    assert {"SsLowrankGemmConfig", "SS_LOWRANK_CONFIGS", "SS_LOWRANK_CANDIDATES", "ss_lowrank_config"} <= set(
        configs.__all__)


@pytest.mark.parametrize("weights, m", [("e4m3", 2048), ("int4", 2048), ("int4", 64)])
def test_a_rank0_layer_runs_the_lowrank_kernels_with_one_zero_tile(emulated, monkeypatch, weights, m):
    """A layer without a low-rank branch (rank 0: a rank allocation's least sensitive layers) takes
    the low-rank kernels with one k-tile of zeros — its bias from the epilogue, not a bias-filled
    ``[M, N]`` source (a broadcast copy the size of the output) on the two-step path — and gives the
    same output as a zero-valued rank-32 branch, within the fast8 bound of the reference."""
    monkeypatch.setattr(cutlass_fast8, "WEIGHTS", weights)
    x, qweight, wscales, smooth, down, up, bias = _layer(m, r=32)
    got = _run(x, qweight, wscales, smooth, None, None, bias)
    want_kernel = ss_tuned_config(m, n=128, k=256, sms=132) if weights == "e4m3" and m >= cutlass_fast8.SS_MIN_M \
        else group64_config(m, n=128, sms=132, lowrank=True)
    assert emulated[-1] == want_kernel
    zero = _run(x, qweight, wscales, smooth, torch.zeros_like(down), torch.zeros_like(up), bias)
    assert torch.equal(got, zero)
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, None, None, bias, None, "int4", "fp8w").double()
    assert ((got.double() - ref).norm() / ref.norm()).item() < 4e-3
