"""Kernel configurations: what one compiled CUTLASS kernel is (the cache key's first part).

A configuration is a frozen dataclass; its :meth:`~CutlassGemmConfig.as_dict` is hashed into
the build-cache key together with the toolchain (:mod:`svdq_kernels.build`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from svdq_format.errors import UnsupportedError

__all__ = ["CutlassGemmConfig", "Group64GemmConfig", "SCHEDULES", "DEFAULT_CONFIGS", "GROUP64_CONFIGS",
           "GROUP64_CANDIDATES", "AUTO_GROUP64_CONFIGS", "AUTO_GROUP64_W4A16_CONFIGS", "AUTO_GROUP64_LR_CONFIGS",
           "PRODUCER_CONVERT_CONFIGS", "PRODUCER_CONVERT_CANDIDATES", "PRODUCER_CONVERT_PROBES", "SsLowrankGemmConfig",
           "SS_LOWRANK_CONFIGS", "SS_LOWRANK_CANDIDATES", "SS_TUNED_CONFIGS", "PROMOTED_GROUP64_CONFIGS",
           "config_by_name", "group64_config", "ss_lowrank_config", "ss_tuned_config"]

#: Kernel schedules (the CUTLASS sm90 warp-specialized mainloops) we emit.
SCHEDULES = ("cooperative", "pingpong")


@dataclasses.dataclass(frozen=True)
class CutlassGemmConfig:
    """One CUTLASS 3.x sm90 int4 × FP8 mixed-input GEMM (weights int4, activations e4m3).

    The weights are the kernel's A operand (``[N, K]`` row-major, int4), the activations its B
    operand (``[M, K]``), the output ``D[M, N]`` bf16. Scales are the stock mixed-input
    lookup-table scales (``cutlass::Array<float_e4m3_t, 8>`` per ``N × K/group`` entry).

    Attributes:
        tile_m: CTA tile along the weights' N (the kernel's M).
        tile_n: CTA tile along the tokens (the kernel's N).
        tile_k: CTA tile along K (elements); stock CUTLASS needs ``group % tile_k == 0``.
        cluster_m: Thread-block cluster along the kernel's M.
        cluster_n: Thread-block cluster along the kernel's N.
        schedule: ``"cooperative"`` or ``"pingpong"``.
        stages: Pipeline stages; 0 lets the CUTLASS builder choose (carve-out for the epilogue).
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    cluster_m: int = 1
    cluster_n: int = 1
    schedule: str = "cooperative"
    stages: int = 0

    kind: str = dataclasses.field(default="cutlass_gemm_s4_fp8", init=False)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UnsupportedError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.tile_k not in (64, 128, 256):
            raise UnsupportedError(f"tile_k {self.tile_k} is not 64, 128 or 256")
        if self.tile_n not in (16, 32, 64, 128, 256):
            raise UnsupportedError(f"tile_n {self.tile_n} is not a wgmma N tile (16..256)")
        min_m = 128 if self.schedule == "cooperative" else 64
        if self.tile_m % min_m or self.tile_m > 256:
            raise UnsupportedError(
                f"tile_m {self.tile_m} must be a multiple of {min_m} (<= 256) for the "
                f"{self.schedule} schedule"
            )
        if self.cluster_m not in (1, 2) or self.cluster_n not in (1, 2):
            raise UnsupportedError("cluster sizes must be 1 or 2")
        if self.stages < 0:
            raise UnsupportedError(f"stages {self.stages} is negative")

    @property
    def name(self) -> str:
        """Short unique name; also the torch op name ``torch.ops.svdq_kernels.<name>``."""
        stages = f"_s{self.stages}" if self.stages else ""
        return (
            f"s4fp8_{self.tile_m}x{self.tile_n}x{self.tile_k}_c{self.cluster_m}x{self.cluster_n}"
            f"_{self.schedule}{stages}"
        )

    def as_dict(self) -> dict[str, Any]:
        """All fields (the kernel part of the cache key)."""
        return dataclasses.asdict(self)

    def supports(self, *, m: int, n: int, k: int, group: int) -> str | None:
        """``None`` if this kernel can run the problem, else why not (host-side checks)."""
        if group % self.tile_k:
            return f"group {group} is not a multiple of tile_k {self.tile_k} (stock CUTLASS limit)"
        if k % group:
            return f"K={k} is not a multiple of the group {group}"
        if n % 32 or k % 32:
            return "N and K must be multiples of 32 (TMA alignment of int4 operands)"
        return None


@dataclasses.dataclass(frozen=True)
class Group64GemmConfig(CutlassGemmConfig):
    """Our group-64 int4 × FP8 GEMM (``csrc/svdq_sm90_mixed_input_g64.hpp``): the ``fast8`` layer.

    The stock mixed-input mainloop with a ``[tile_m, tile_k/64]`` fp16 scale tile per stage;
    the weights are converted to e4m3 as ``code × scale`` in the mainloop. The epilogue applies
    the per-row power of two and the per-token scale and adds a bf16 source tensor (low-rank
    branch + bias): ``out = acc · rowinv[n] · a[m] + c[m, n]``. ``stages = 0``: as many as fit.
    """

    #: ``"persistent"`` (CUTLASS's default tile scheduler) or ``"streamk"`` (work split along K
    #: too, so few output tiles still fill the GPU: small M; cooperative schedule only).
    scheduler: str = "persistent"
    #: Add the FP8 partial sums to the fp32 accumulator every ``promote`` k-tiles (0: never).
    #: Hopper's FP8 MMAs accumulate with reduced precision; promotion bounds that error at the
    #: cost of a second accumulator (registers: tiles up to 128 × 128 per consumer pair).
    promote: int = 0
    #: Convert the weights by table lookup (per group and row, the 16 e4m3 values of
    #: ``code × scale`` built from the fp16 scale; three byte permutes per four weights) instead
    #: of int4 → fp16, multiply, → e4m3 per weight. Same bits.
    lut: bool = False
    #: The activation operand: ``"e4m3"`` (the ``fast8`` layer: FP8 MMAs) or ``"f16"`` (int4
    #: W4A16 layers: fp16 activations, weights converted exactly to fp16, fp16 MMAs).
    activations: str = "e4m3"
    #: Run the low-rank up projection inside the mainloop: after the FP8 k-tiles, low-rank
    #: k-tiles of bf16 MMAs add ``lr · L1ᵀ`` to the same accumulator (``lr`` divided by the token
    #: scale, ``L1`` by the row's), so there is no separate low-rank GEMM and no bf16 source
    #: tensor for the epilogue to read; the epilogue adds the bias (``e4m3`` only).
    lowrank: bool = False
    #: Where the int4 weights become e4m3: ``"consumer"`` (the MMA warps convert into registers and
    #: issue register-sourced wgmmas) or ``"producer"`` (the producer warpgroup's idle warps
    #: convert each TMA stage into a ring of ``convert_slots`` e4m3 tiles in shared memory, and the
    #: MMA warps issue shared-memory-sourced FP8 wgmmas like a dense FP8 GEMM; same bits).
    #: ``"producer"`` needs the table conversion, the cooperative schedule, the low-rank k-tiles
    #: (their epilogue reads no source tensor, which leaves three idle producer warps) and no
    #: promotion; it waits for its GPU run (:data:`PRODUCER_CONVERT_CONFIGS`, not used by default).
    convert: str = "consumer"
    #: Slots of the producer conversion's e4m3 ring (``convert="producer"``; 16 KiB each at tile_m 128).
    convert_slots: int = 2
    #: Benchmark probe of ``convert="producer"`` (**wrong results**): the converter warps only keep
    #: the barriers, so the kernel's time is the producer kernel's with a free conversion.
    convert_probe: bool = False

    kind: str = dataclasses.field(default="svdq_g64_gemm", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile_k % 64 or self.tile_k < 128:
            raise UnsupportedError(f"tile_k {self.tile_k}: the group-64 mainloop needs 128 or 256")
        if self.promote < 0:
            raise UnsupportedError(f"promote {self.promote} is negative")
        if self.scheduler not in ("persistent", "streamk"):
            raise UnsupportedError(f"scheduler {self.scheduler!r} is not 'persistent' or 'streamk'")
        if self.scheduler == "streamk" and self.schedule != "cooperative":
            raise UnsupportedError("the stream-K scheduler needs the cooperative schedule (CUTLASS 4.2)")
        if self.activations not in ("e4m3", "f16"):
            raise UnsupportedError(f"activations {self.activations!r} is not 'e4m3' or 'f16'")
        if self.lut and self.activations != "e4m3":
            raise UnsupportedError("the table conversion writes e4m3 weights: lut needs activations='e4m3'")
        if self.lowrank and (self.activations != "e4m3" or self.promote or self.tile_k != 128):
            raise UnsupportedError("the low-rank k-tiles need e4m3 activations, tile_k 128 and no promotion")
        if self.convert not in ("consumer", "producer"):
            raise UnsupportedError(f"convert {self.convert!r} is not 'consumer' or 'producer'")
        if self.convert == "producer":
            if not (self.lut and self.lowrank and self.schedule == "cooperative"):
                raise UnsupportedError("convert='producer' needs lut, lowrank and the cooperative schedule")
            if self.tile_n * self.tile_m > 128 * 256 or self.cluster_m * self.cluster_n != 1:
                raise UnsupportedError("convert='producer' is built for tiles up to 128 x 256 without clusters")
            # one slot deadlocks: the consumers free slot t only after waiting for tile t + 1's
            if not 2 <= self.convert_slots <= 4:
                raise UnsupportedError(f"convert_slots {self.convert_slots} is not 2..4 (one slot deadlocks)")
        elif self.convert_probe:
            raise UnsupportedError("convert_probe times the producer conversion: it needs convert='producer'")

    @property
    def name(self) -> str:
        base = super().name if self.activations == "e4m3" else super().name.replace("s4fp8_", "s4f16_", 1)
        return ("g64" + base + (f"_p{self.promote}" if self.promote else "")
                + ("_sk" if self.scheduler == "streamk" else "") + ("_lut" if self.lut else "")
                + ("_lr" if self.lowrank else "")
                + (f"_pc{self.convert_slots}" if self.convert == "producer" else "")
                + ("_probe" if self.convert_probe else ""))

    def supports(self, *, m: int, n: int, k: int, group: int) -> str | None:
        if group != 64:
            return f"group {group}: this kernel is for groups of 64"
        if k % self.tile_k:
            return f"K={k} is not a multiple of tile_k {self.tile_k}"
        if n % 128:  # whole weight tiles: the only shapes run on a GPU so far (FLUX, SD3: all are)
            return f"N={n} is not a multiple of 128 (the group-64 kernels are validated on whole weight tiles)"
        return None


_G64 = Group64GemmConfig

#: The group-64 kernels the ``fast8`` path chooses from (:func:`group64_config`), and the
#: promoted variants measured against them (benchmarks/fast8_linear.py). All but the promoted
#: ones convert the weights by table lookup (``lut``: same bits, 2-7 % faster at M = 4608).
GROUP64_CONFIGS: tuple[Group64GemmConfig, ...] = (
    _G64(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative", lut=True),
    _G64(tile_m=128, tile_n=256, tile_k=128, schedule="cooperative", lut=True),
    _G64(tile_m=64, tile_n=128, tile_k=128, schedule="pingpong", lut=True),
    _G64(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative", promote=1),
    _G64(tile_m=64, tile_n=128, tile_k=128, schedule="pingpong", promote=1),
    # M <= 16: 16-token tiles, stream-K over K (1.5-2.2x the 64 x 128 tile at M = 16, H100)
    _G64(tile_m=128, tile_n=16, tile_k=128, schedule="cooperative", scheduler="streamk", lut=True),
    # large M when 128 x 256 tiles leave the last wave part-empty (N = 3072 at M = 4608: 3.3
    # waves on 132 SMs): stream-K splits the remainder along K (+6-15 % there, H100)
    _G64(tile_m=128, tile_n=256, tile_k=128, schedule="cooperative", scheduler="streamk", lut=True),
)


#: The kernels :func:`group64_config` chooses from (without ``SVDQ_G64_CONFIG``), largest M first:
#: 128 × 256 (M ≥ 2048) and its stream-K twin, 128 × 128 (256 ≤ M < 2048), 64 × 128 pingpong
#: (16 < M < 256), 128 × 16 stream-K (M ≤ 16). Built together on first use.
AUTO_GROUP64_CONFIGS: tuple[Group64GemmConfig, ...] = tuple(GROUP64_CONFIGS[i] for i in (1, 6, 0, 2, 5))


#: The promoted kernels (``promote=1``: the FP8 partial sums added to an fp32 accumulator every
#: k-tile) that :func:`group64_config` picks with ``promote=True`` — for one-signed activations (a
#: Nunchaku GELU segment's shifted, unsigned codes), where Hopper's FP8 MMA accumulation loses
#: precision: on a FLUX single block's ``proj_out`` MLP half (H100) the unpromoted kernel is off by
#: 1.16e-2 (cuBLAS ``_scaled_mm`` with fast accumulation: 1.15e-2), the promoted 128 × 128 one by
#: 1.66e-3 (the bf16 output rounding; signed activations: 2.6e-3 unpromoted). 128 × 128 cooperative
#: (M ≥ 256) and 64 × 128 pingpong (16 < M < 256); built together on first use, 87–90 % of the
#: unpromoted kernels' speed. They have no low-rank k-tiles (the layer takes the two-step path).
PROMOTED_GROUP64_CONFIGS: tuple[Group64GemmConfig, ...] = (GROUP64_CONFIGS[3], GROUP64_CONFIGS[4])


#: Other group-64 tilings, measured by ``benchmarks/fast8_linear.py --configs all`` (not prebuilt).
GROUP64_CANDIDATES: tuple[Group64GemmConfig, ...] = (
    _G64(tile_m=128, tile_n=256, tile_k=128, schedule="cooperative", cluster_m=2),
    _G64(tile_m=256, tile_n=128, tile_k=128, schedule="cooperative"),
    _G64(tile_m=64, tile_n=256, tile_k=128, schedule="pingpong"),
    _G64(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative", promote=4),
    # small M: stream-K over K, and token tiles of 32 (the 16-token one won: GROUP64_CONFIGS)
    _G64(tile_m=128, tile_n=64, tile_k=128, schedule="cooperative", scheduler="streamk"),
    _G64(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative", scheduler="streamk"),
    _G64(tile_m=128, tile_n=32, tile_k=128, schedule="cooperative", scheduler="streamk"),
    _G64(tile_m=64, tile_n=32, tile_k=128, schedule="pingpong"),
    # the automatic tilings with the fp16 conversion (int4 -> fp16, x scale, -> e4m3 per weight)
    *(dataclasses.replace(c, lut=False) for c in AUTO_GROUP64_CONFIGS),
)

#: Below this share of busy SMs in the last wave of 128 × 256 tiles, large M runs stream-K.
STREAMK_WAVE_EFFICIENCY = 0.95


#: The automatic tilings with the low-rank up projection in the mainloop (``lowrank``): what the
#: ``fast8`` layer runs when :data:`svdq_kernels.cutlass_fast8.LOWRANK_IN_GEMM` is on.
AUTO_GROUP64_LR_CONFIGS: tuple[Group64GemmConfig, ...] = tuple(
    dataclasses.replace(c, lowrank=True) for c in AUTO_GROUP64_CONFIGS)


#: The producer-conversion twins (``convert="producer"``) of the large-M low-rank tilings (128 × 256
#: and its stream-K twin): opt-in (:data:`svdq_kernels.cutlass_fast8.CONVERT`), not prebuilt. On an
#: H100 they give the consumer kernels' bits at 0.87–0.91× their speed (docs/kernels.md).
PRODUCER_CONVERT_CONFIGS: tuple[Group64GemmConfig, ...] = tuple(
    dataclasses.replace(c, convert="producer") for c in AUTO_GROUP64_LR_CONFIGS[:2])

#: Measured beside them (benchmarks/fast8_producer.py), not selected: a three-slot converted ring
#: (more slack for the converter warps, at the cost of one TMA stage at 128 × 256).
PRODUCER_CONVERT_CANDIDATES: tuple[Group64GemmConfig, ...] = (
    dataclasses.replace(PRODUCER_CONVERT_CONFIGS[0], convert_slots=3),)

#: Timing probes (``convert_probe``, wrong results: benchmarks only) of the producer kernels.
PRODUCER_CONVERT_PROBES: tuple[Group64GemmConfig, ...] = tuple(
    dataclasses.replace(c, convert_probe=True) for c in PRODUCER_CONVERT_CONFIGS)


@dataclasses.dataclass(frozen=True)
class SsLowrankGemmConfig(CutlassGemmConfig):
    """The pre-converted ``fast8`` GEMM (``csrc/svdq_sm90_ss_lowrank.hpp``; issue 23, lever 5).

    The weights arrive already converted, as a plain e4m3 ``[N, K]`` matrix
    (:func:`svdq_kernels.weights_e4m3.e4m3_weights`, one pass per layer call), so the mainloop is
    CUTLASS's dense FP8 one — both operands from shared memory, accumulating without promotion —
    plus the low-rank k-tiles of the ``lowrank`` group-64 kernels and their epilogue:
    ``out = (Σ q · w8 + lr · l1ᵀ) · rowinv[n] · a[m] + bias[n]``. ``stages = 0``: as many as fit.
    """

    #: ``"persistent"`` or ``"streamk"`` (as :attr:`Group64GemmConfig.scheduler`).
    scheduler: str = "persistent"

    kind: str = dataclasses.field(default="svdq_ss_gemm", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile_k != 128:
            raise UnsupportedError(f"tile_k {self.tile_k}: the low-rank k-tiles need tile_k 128")
        if self.scheduler not in ("persistent", "streamk"):
            raise UnsupportedError(f"scheduler {self.scheduler!r} is not 'persistent' or 'streamk'")
        if self.scheduler == "streamk" and self.schedule != "cooperative":
            raise UnsupportedError("the stream-K scheduler needs the cooperative schedule (CUTLASS 4.2)")
        # the fp32 accumulator: at most 128 registers a thread (two consumer warpgroups share a
        # cooperative tile, one warpgroup owns a pingpong tile)
        threads = 256 if self.schedule == "cooperative" else 128
        if self.tile_m * self.tile_n > 128 * threads:
            raise UnsupportedError(
                f"tile {self.tile_m} x {self.tile_n}: over 128 accumulator registers a thread for the "
                f"{self.schedule} schedule (at most {128 * threads} outputs a tile)")
        # 2 x 1 and 1 x 2: the low-rank k-tiles' L1 and lr loads multicast like the operands they
        # replace (CUTLASS's mcast masks; both CTAs of a cluster run the same k-tiles)
        if self.cluster_m * self.cluster_n > 2:
            raise UnsupportedError("the pre-converted kernel is built for clusters of 1 x 1, 2 x 1 and 1 x 2")

    @property
    def name(self) -> str:
        return ("ss_" + super().name.replace("s4fp8_", "e4m3_", 1)
                + ("_sk" if self.scheduler == "streamk" else "") + "_lr")

    def supports(self, *, m: int, n: int, k: int, group: int) -> str | None:
        if k % self.tile_k:
            return f"K={k} is not a multiple of tile_k {self.tile_k}"
        if n % 128:
            return f"N={n} is not a multiple of 128 (the fast8 kernels are validated on whole weight tiles)"
        if n % self.tile_m:
            return f"N={n} is not a multiple of tile_m {self.tile_m} (whole weight tiles)"
        return None

    def tiling(self) -> tuple[int, int, int, str, str]:
        """``(tile_m, tile_n, tile_k, schedule, scheduler)``: what it shares with its group-64 twin."""
        return self.tile_m, self.tile_n, self.tile_k, self.schedule, self.scheduler


def _tiling(config: Group64GemmConfig) -> tuple[int, int, int, str, str]:
    return config.tile_m, config.tile_n, config.tile_k, config.schedule, config.scheduler


#: The pre-converted kernels (:class:`SsLowrankGemmConfig`): the two large-M automatic tilings
#: (128 × 256 and its stream-K twin) and 128 × 128. Used with ``SVDQ_FAST8_WEIGHTS=e4m3`` (the
#: default, :data:`svdq_kernels.cutlass_fast8.WEIGHTS`), and prebuilt by ``svdq kernels build`` then.
SS_LOWRANK_CONFIGS: tuple[SsLowrankGemmConfig, ...] = tuple(
    SsLowrankGemmConfig(tile_m=c.tile_m, tile_n=c.tile_n, tile_k=c.tile_k, schedule=c.schedule, scheduler=c.scheduler)
    for c in AUTO_GROUP64_LR_CONFIGS[:3])


_SS = SsLowrankGemmConfig

#: Other tilings of the pre-converted kernel, timed by ``benchmarks/fast8_preconverted.py
#: --candidates`` beside :data:`SS_LOWRANK_CONFIGS` and cuBLAS (never picked by
#: :func:`ss_lowrank_config`; three of them are :data:`SS_TUNED_CONFIGS`), in build-priority order.
#: The kernel's A operand is the weights, so
#: ``tile_m``/``cluster_m`` run along the weights' rows and ``tile_n``/``cluster_n`` along the tokens:
#: a 2 × 1 cluster shares the token tile (B and lr multicast), 1 × 2 the weight tile (A and L1).
#: vLLM's FP8 choices on sm_90, in these terms: large M a 128 × 256 cooperative tile with the cluster
#: along the tokens (1 × 2), otherwise 128 × 128 pingpong (FP8 fast accumulation), 1 × 2.
SS_LOWRANK_CANDIDATES: tuple[SsLowrankGemmConfig, ...] = (
    _SS(tile_m=128, tile_n=256, cluster_m=2),
    _SS(tile_m=128, tile_n=256, cluster_m=2, scheduler="streamk"),
    _SS(tile_m=128, tile_n=128, cluster_n=2, schedule="pingpong"),
    _SS(tile_m=128, tile_n=256, cluster_n=2),
    _SS(tile_m=128, tile_n=256, cluster_n=2, scheduler="streamk"),
    _SS(tile_m=256, tile_n=128),
    _SS(tile_m=256, tile_n=128, cluster_m=2),
    _SS(tile_m=128, tile_n=128, cluster_m=2, schedule="pingpong"),
    _SS(tile_m=64, tile_n=256, schedule="pingpong"),
)


#: The pre-converted kernels a ``fast8`` layer runs at M ≥ 2048 (:func:`ss_tuned_config`), from the
#: candidates' H100 timing at M = 4608 on FLUX.1-dev's seven shapes (``gpu_session.sh ssc``,
#: ``benchmarks/results/fast8_ss_candidates_h100.json``; speed-up over the twin of the group-64 tiling,
#: :func:`ss_lowrank_config`): K ≤ 4096 and N ≤ 4096, 128 × 128 pingpong with a 1 × 2 cluster
#: (1.148× on 3072 → 3072); K ≤ 4096 and wider N, 128 × 128 pingpong with a 2 × 1 cluster
#: (1.016–1.051×); K > 4096, 128 × 256 stream-K with a 2 × 1 cluster (1.010–1.026×). Each within the
#: twin's float64 bound; the persistent ones give the persistent twin's bits.
SS_TUNED_CONFIGS: tuple[SsLowrankGemmConfig, ...] = (
    SS_LOWRANK_CANDIDATES[2], SS_LOWRANK_CANDIDATES[7], SS_LOWRANK_CANDIDATES[1])

#: The largest K of the tuned 128 × 128 pingpong tilings (:func:`ss_tuned_config`).
SS_TUNED_MAX_K = 4096


def ss_tuned_config(m: int, *, n: int, k: int, sms: int = 132) -> SsLowrankGemmConfig | None:
    """The pre-converted kernel a ``fast8`` layer of ``m`` tokens, ``k`` inputs and ``n`` outputs runs
    (:data:`SS_TUNED_CONFIGS`), or ``None`` where :func:`ss_lowrank_config` has none (the small-M
    tilings). Their weight tiles are 128 rows, like the twins': they take the same shapes."""
    if ss_lowrank_config(m, n=n, sms=sms) is None:
        return None
    pingpong_1x2, pingpong_2x1, streamk_2x1 = SS_TUNED_CONFIGS
    return streamk_2x1 if k > SS_TUNED_MAX_K else pingpong_1x2 if n <= SS_TUNED_MAX_K else pingpong_2x1


def ss_lowrank_config(m: int, *, n: int | None = None, sms: int = 132) -> SsLowrankGemmConfig | None:
    """The pre-converted kernel with the tiling the ``lowrank`` group-64 kernel would use for ``m``
    tokens (:func:`group64_config`), or ``None`` where that tiling has no pre-converted twin."""
    tiling = _tiling(group64_config(m, n=n, sms=sms, lowrank=True))
    for config in SS_LOWRANK_CONFIGS:
        if config.tiling() == tiling:
            return config
    return None


#: The int4 W4A16 variants (fp16 activations, no table conversion) of the automatic tilings.
AUTO_GROUP64_W4A16_CONFIGS: tuple[Group64GemmConfig, ...] = tuple(
    dataclasses.replace(c, lut=False, activations="f16") for c in AUTO_GROUP64_CONFIGS)


def group64_config(m: int, *, n: int | None = None, sms: int = 132, activations: str = "e4m3",
                   lowrank: bool = False, convert: str = "consumer", promote: bool = False) -> Group64GemmConfig:
    """The group-64 kernel for ``m`` tokens (and ``n`` output features on ``sms`` SMs): wide token
    tiles for large M, narrow ones below. At M ≥ 2048, when the ``[128 × 256]`` tiles fill their
    last wave so little that the waves run below :data:`STREAMK_WAVE_EFFICIENCY` busy, the
    stream-K twin balances the remainder. ``activations="f16"``: the same tiling's W4A16 variant
    (:data:`AUTO_GROUP64_W4A16_CONFIGS`). ``SVDQ_G64_CONFIG=<name>`` forces a tiling from
    :data:`GROUP64_CONFIGS` or :data:`GROUP64_CANDIDATES` (benchmarks; ``e4m3`` only).
    ``lowrank``: the tiling's variant with the low-rank k-tiles (:data:`AUTO_GROUP64_LR_CONFIGS`;
    a forced tiling gets its ``lowrank`` twin). ``convert="producer"`` (with ``lowrank``): the
    tiling's producer-conversion twin where it has one (:data:`PRODUCER_CONVERT_CONFIGS`: M ≥ 2048),
    else the tiling itself. ``promote`` (``e4m3``, without ``lowrank``): for M > 16 the promoted
    kernel (:data:`PROMOTED_GROUP64_CONFIGS`: 128 × 128 for M ≥ 256, 64 × 128 pingpong below), for
    one-signed activations; M ≤ 16 keeps the 128 × 16 stream-K tiling (its split-K parts sum in
    fp32: 2.3e-3 on the layer where the unpromoted 128 × 128 kernel gives 1.16e-2)."""
    if convert not in ("consumer", "producer"):
        raise UnsupportedError(f"convert {convert!r} is not 'consumer' or 'producer'")
    if promote and (lowrank or activations != "e4m3"):
        raise UnsupportedError("the promoted group-64 kernels take e4m3 activations and have no low-rank k-tiles")
    if lowrank:
        config = dataclasses.replace(group64_config(m, n=n, sms=sms), lowrank=True)
        if convert == "producer":
            for twin in PRODUCER_CONVERT_CONFIGS:
                if dataclasses.replace(twin, convert="consumer") == config:
                    return twin
        return config
    if activations != "e4m3":
        return AUTO_GROUP64_W4A16_CONFIGS[AUTO_GROUP64_CONFIGS.index(_auto_tiling(m, n=n, sms=sms))]
    forced = os.environ.get("SVDQ_G64_CONFIG")
    if forced:
        for config in (*GROUP64_CONFIGS, *GROUP64_CANDIDATES):
            if config.name == forced:
                return config
        known = [c.name for c in (*GROUP64_CONFIGS, *GROUP64_CANDIDATES)]
        raise UnsupportedError(f"SVDQ_G64_CONFIG={forced!r} is not one of {known}")
    if promote and m > 16:
        return PROMOTED_GROUP64_CONFIGS[0] if m >= 256 else PROMOTED_GROUP64_CONFIGS[1]
    return _auto_tiling(m, n=n, sms=sms)


def _auto_tiling(m: int, *, n: int | None, sms: int) -> Group64GemmConfig:
    if m >= 2048:
        wide = AUTO_GROUP64_CONFIGS[0]
        if n is not None and sms > 0:
            waves = -(-n // wide.tile_m) * -(-m // wide.tile_n) / sms
            if waves / math.ceil(waves) < STREAMK_WAVE_EFFICIENCY:
                return AUTO_GROUP64_CONFIGS[1]
        return wide
    if m >= 256:
        return AUTO_GROUP64_CONFIGS[2]
    if m > 16:
        return AUTO_GROUP64_CONFIGS[3]
    return AUTO_GROUP64_CONFIGS[4]


#: What ``svdq kernels build`` compiles by default.
DEFAULT_CONFIGS: tuple[CutlassGemmConfig, ...] = (
    CutlassGemmConfig(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative"),
    CutlassGemmConfig(tile_m=128, tile_n=256, tile_k=128, schedule="cooperative"),
    *GROUP64_CONFIGS,
)


def config_by_name(name: str) -> CutlassGemmConfig:
    """Find a default configuration by :attr:`CutlassGemmConfig.name`."""
    named = (*DEFAULT_CONFIGS, *GROUP64_CANDIDATES, *AUTO_GROUP64_W4A16_CONFIGS, *AUTO_GROUP64_LR_CONFIGS,
             *PRODUCER_CONVERT_CONFIGS, *PRODUCER_CONVERT_CANDIDATES, *PRODUCER_CONVERT_PROBES, *SS_LOWRANK_CONFIGS,
             *SS_LOWRANK_CANDIDATES)
    for config in named:
        if config.name == name:
            return config
    known = ", ".join(c.name for c in named)
    raise UnsupportedError(f"unknown kernel configuration {name!r} (known: {known})")
