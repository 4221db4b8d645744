"""The producer conversion of the ``fast8`` GEMM (``Group64GemmConfig(convert="producer")``) on the
CPU: its configurations, selection, source generation and first-use build list. Its kernel runs
in ``tests/test_kernels_producer_gpu.py``."""

from __future__ import annotations

import dataclasses

import pytest

from svdq_format.errors import UnsupportedError
from svdq_kernels import build, configs
from svdq_kernels.configs import (
    AUTO_GROUP64_CONFIGS,
    AUTO_GROUP64_LR_CONFIGS,
    DEFAULT_CONFIGS,
    GROUP64_CANDIDATES,
    PRODUCER_CONVERT_CONFIGS,
    Group64GemmConfig,
    config_by_name,
    group64_config,
)

PC = Group64GemmConfig(tile_m=128, tile_n=256, lut=True, lowrank=True, convert="producer")


def test_producer_configs_are_the_large_m_low_rank_tilings_with_their_own_names():
    twins = [dataclasses.replace(c, convert="consumer") for c in PRODUCER_CONVERT_CONFIGS]
    assert twins == list(AUTO_GROUP64_LR_CONFIGS[:2])
    assert PRODUCER_CONVERT_CONFIGS[0] == PC and PC.name == "g64s4fp8_128x256x128_c1x1_cooperative_lut_lr_pc2"
    assert PRODUCER_CONVERT_CONFIGS[1].name.endswith("_sk_lut_lr_pc2")
    consumer = dataclasses.replace(PC, convert="consumer")
    assert consumer.name == PC.name.removesuffix("_pc2")
    assert dataclasses.replace(PC, convert_slots=3).name.endswith("_pc3")
    tc = build.Toolchain(nvcc="/x/nvcc", nvcc_version="13.0", cutlass_version="4.2.0.0",
                         cutlass_dir="/x", arch="sm_90a", torch_version="2.13", svdquant_version="0")
    assert build.cache_key(PC, tc) != build.cache_key(consumer, tc)
    assert config_by_name(PC.name) == PC
    (pc3,) = configs.PRODUCER_CONVERT_CANDIDATES
    assert config_by_name(pc3.name) == pc3 == dataclasses.replace(PC, convert_slots=3)
    probes = configs.PRODUCER_CONVERT_PROBES
    assert [p.name for p in probes] == [c.name + "_probe" for c in PRODUCER_CONVERT_CONFIGS]
    assert all(config_by_name(p.name) == p for p in probes)


def test_producer_configs_are_opt_in():
    """Not prebuilt, not picked by default: only ``convert="producer"`` selects them."""
    everywhere = (*DEFAULT_CONFIGS, *GROUP64_CANDIDATES, *AUTO_GROUP64_CONFIGS, *AUTO_GROUP64_LR_CONFIGS,
                  *configs.AUTO_GROUP64_W4A16_CONFIGS)
    assert not any(getattr(c, "convert", "consumer") == "producer" for c in everywhere)
    for m, n in ((4608, 3072), (4608, 21504), (4096, 3072), (2048, 12288)):
        default = group64_config(m, n=n, lowrank=True)
        assert default.convert == "consumer"
        producer = group64_config(m, n=n, lowrank=True, convert="producer")
        assert producer == dataclasses.replace(default, convert="producer")
    # below 2048 tokens the tilings have no producer twin: the consumer kernel runs
    for m in (1, 16, 17, 255, 256, 2047):
        assert group64_config(m, n=3072, lowrank=True, convert="producer") == group64_config(m, n=3072, lowrank=True)
    with pytest.raises(UnsupportedError, match="convert"):
        group64_config(4608, lowrank=True, convert="both")


@pytest.mark.parametrize("bad, needle", [
    ({"lowrank": False}, "needs lut, lowrank"),
    ({"lut": False}, "needs lut, lowrank"),
    ({"schedule": "pingpong", "tile_m": 64}, "needs lut, lowrank"),
    ({"cluster_m": 2}, "without clusters"),
    ({"tile_m": 256}, "tiles up to 128 x 256"),
    ({"convert_slots": 1}, "deadlocks"),
    ({"convert_slots": 5}, "convert_slots"),
    ({"convert": "warp"}, "is not 'consumer' or 'producer'"),
    ({"convert": "consumer", "convert_probe": True}, "convert_probe"),
])
def test_invalid_producer_configs_are_refused(bad, needle):
    fields = {**dataclasses.asdict(PC), **bad}
    fields.pop("kind")
    with pytest.raises(UnsupportedError, match=needle):
        Group64GemmConfig(**fields)


def test_producer_source_instantiates_the_converting_kernel():
    pytest.importorskip("cutlass_library")
    from svdq_kernels.codegen import CSRC_DIR, render_source

    src = render_source(PC)
    assert "#define SVDQ_CONVERT_STAGES 2" in src and "#define SVDQ_LOWRANK 1" in src and "${" not in src
    assert "#define SVDQ_CONVERT_PROBE 0" in src
    assert "#define SVDQ_CONVERT_PROBE 1" in render_source(dataclasses.replace(PC, convert_probe=True))
    assert '#include "svdq_sm90_gemm_producer_convert.hpp"' in src
    assert "cutlass::gemm::SvdqMainloopSm90ProducerConvert<kStages, ClusterShape>" in src
    assert "\n    0, true, SVDQ_LOWRANK != 0, kConvertStages>;" in src
    assert (f'm.def("{PC.name}(Tensor w, Tensor scales, Tensor rowinv, Tensor q, Tensor a, Tensor bias, '
            'Tensor lr, Tensor l1) -> Tensor")') in src  # the consumer twin's op signature
    twin = render_source(dataclasses.replace(PC, convert="consumer"))
    assert "#define SVDQ_CONVERT_STAGES 0" in twin
    kernel = (CSRC_DIR / "svdq_sm90_gemm_producer_convert.hpp").read_text()
    assert "SPDX-License-Identifier: BSD-3-Clause" in kernel  # CUTLASS's license is kept
    assert kernel.count("svdq:") >= 8  # every change from the stock kernel is marked
    header = (CSRC_DIR / "svdq_sm90_mixed_input_g64.hpp").read_text()
    for fn in ("CUTLASS_DEVICE void\n  convert(", "mma_converted(", "mma_tail_converted(", "init_convert_barriers("):
        assert fn in header


def test_first_use_builds_the_producer_kernels_only_when_opted_in(monkeypatch):
    """``cutlass_fast8.CONVERT``: the low-rank GEMM's kernel and the set built with it on first use."""
    torch = pytest.importorskip("torch")
    from svdq_kernels import cutlass_fast8

    calls = []

    def fake_load(config, *, also_build=()):
        calls.append((config, tuple(also_build)))
        return lambda *args: None

    monkeypatch.setattr(cutlass_fast8, "load_kernel", fake_load)
    monkeypatch.setattr(cutlass_fast8, "_sm_count", lambda index: 132)
    q = torch.zeros(4608, 3072, dtype=torch.float8_e4m3fn)
    qw = torch.zeros(3072, 1536, dtype=torch.uint8)
    for convert in ("consumer", "producer"):
        monkeypatch.setattr(cutlass_fast8, "CONVERT", convert)
        cutlass_fast8.group64_gemm_lowrank(qw, None, None, q, None, None, None, None)
    (default, default_build), (producer, producer_build) = calls
    assert default.convert == "consumer" and not any(c.convert == "producer" for c in default_build)
    assert producer.convert == "producer" and producer == group64_config(4608, n=3072, lowrank=True, convert="producer")
    assert set(PRODUCER_CONVERT_CONFIGS) <= set(producer_build)
