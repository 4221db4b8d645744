"""Kernel source generation (nvidia-cutlass's cutlass_library + our csrc templates); no GPU."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("cutlass_library")

from svdq_format.errors import UnsupportedError  # noqa: E402
from svdq_kernels import codegen  # noqa: E402
from svdq_kernels.configs import DEFAULT_CONFIGS, CutlassGemmConfig, config_by_name  # noqa: E402


@pytest.mark.parametrize(
    "config",
    [*DEFAULT_CONFIGS, CutlassGemmConfig(tile_m=64, tile_n=64, tile_k=128, schedule="pingpong", stages=4),
     CutlassGemmConfig(tile_m=256, tile_n=128, tile_k=64, cluster_m=2)],
    ids=lambda c: c.name,
)
def test_emitted_kernel_has_the_config(config: CutlassGemmConfig) -> None:
    name, cpp = codegen.emit_cutlass_gemm(config)
    tile = f"cute::Shape<cute::_{config.tile_m}, cute::_{config.tile_n}, cute::_{config.tile_k}>"
    assert cpp.count(tile) == 2  # mainloop and epilogue builders
    assert f"cute::Shape<cute::_{config.cluster_m}, cute::_{config.cluster_n}, cute::_1>" in cpp
    # int4 weights with the 8-entry FP8 lookup-table scales (stock int4 x fp8 mixed input)
    assert "cute::tuple<cutlass::int4b_t, cutlass::Array<cutlass::float_e4m3_t, 8>>" in cpp
    assert "cutlass::float_e4m3_t, cutlass::layout::ColumnMajor, 16" in cpp
    assert "cutlass::bfloat16_t, cutlass::layout::ColumnMajor, 8" in cpp
    schedule = "Cooperative" if config.schedule == "cooperative" else "Pingpong"
    assert f"cutlass::gemm::KernelTmaWarpSpecialized{schedule}" in cpp
    if config.stages:
        assert f"StageCount<{config.stages}>" in cpp
    else:
        assert "StageCountAutoCarveout" in cpp
    assert f"_{config.tile_m}x{config.tile_n}x{config.tile_k}_" in name
    assert f"struct {name} :" in cpp


def test_rendered_source_is_complete_and_registers_the_op() -> None:
    config = DEFAULT_CONFIGS[0]
    src = codegen.render_source(config)
    assert "${" not in src and "$OP" not in src
    name, _ = codegen.emit_cutlass_gemm(config)
    assert f"GemmUniversalAdapter<{name}>" in src
    assert re.search(rf'm\.def\("{config.name}\(Tensor w, Tensor scales, Tensor x, int group\) -> Tensor"\)', src)
    assert f'm.impl("{config.name}", &gemm)' in src
    assert "TORCH_LIBRARY_FRAGMENT(svdq_kernels, m)" in src


def test_each_config_renders_a_different_source_and_name() -> None:
    configs = [CutlassGemmConfig(tile_n=n, schedule=s, tile_m=128)
               for n in (64, 128, 256) for s in ("cooperative", "pingpong")]
    names = {c.name for c in configs}
    sources = {codegen.render_source(c) for c in configs}
    assert len(names) == len(configs) and len(sources) == len(configs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"schedule": "fast"}, "schedule"), ({"tile_k": 96}, "tile_k"), ({"tile_n": 384}, "tile_n"),
     ({"tile_m": 64}, "tile_m"), ({"cluster_m": 4}, "cluster"), ({"stages": -1}, "stages")],
)
def test_invalid_configs_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(UnsupportedError, match=needle):
        CutlassGemmConfig(**kwargs)


def test_stock_group_limit_is_reported() -> None:
    config = CutlassGemmConfig(tile_k=128)
    assert config.supports(m=4608, n=3072, k=3072, group=128) is None
    assert "group 64" in config.supports(m=4608, n=3072, k=3072, group=64)
    assert config.supports(m=16, n=3072, k=3072 + 128, group=128) is None
    assert "multiple" in config.supports(m=16, n=3072, k=3000, group=128)


def test_config_by_name() -> None:
    assert config_by_name(DEFAULT_CONFIGS[1].name) == DEFAULT_CONFIGS[1]
    with pytest.raises(UnsupportedError, match="unknown kernel configuration"):
        config_by_name("nope")
