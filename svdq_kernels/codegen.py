"""Kernel source generation: CUTLASS kernels emitted by ``cutlass_library`` + our C++ wrappers.

The CUTLASS part of every kernel (collective builders, tile shapes, schedules, epilogue) is
emitted from Python by nvidia-cutlass's own generator (``cutlass_library.gemm_operation.
EmitGemmUniversal3xInstance``); the torch-op wrapper around it is a template in
``svdq_kernels/csrc/``. Nothing here needs CUDA, so CPU CI tests it.
"""

from __future__ import annotations

import string
from pathlib import Path

from ._cuda_compat import import_cutlass_library
from .configs import CutlassGemmConfig, Group64GemmConfig, SsLowrankGemmConfig

__all__ = ["CSRC_DIR", "emit_cutlass_gemm", "render_source", "render_group64_source", "render_ss_lowrank_source",
           "csrc_template"]

#: Our C++/CUDA templates and headers.
CSRC_DIR = Path(__file__).resolve().parent / "csrc"


def csrc_template(name: str) -> string.Template:
    """A ``${NAME}`` template from :data:`CSRC_DIR`."""
    return string.Template((CSRC_DIR / name).read_text(encoding="utf-8"))


def _gemm_operation(config: CutlassGemmConfig):  # -> cutlass_library GemmOperation
    import_cutlass_library()
    from cutlass_library import library as L
    from cutlass_library.gemm_operation import GemmOperation

    math = L.MathInstruction(
        [64, config.tile_n, 32], L.DataType.s4, L.DataType.e4m3, L.DataType.f32,
        L.OpcodeClass.TensorOp, L.MathOperation.multiply_add,
    )
    tile = L.TileDescription(
        [config.tile_m, config.tile_n, config.tile_k], config.stages,
        [config.tile_m // 64 if config.schedule == "pingpong" else 4, 1, 1],
        math, 90, 90, [config.cluster_m, config.cluster_n, 1],
    )
    a = L.TensorDescription(L.DataType.s4, L.LayoutType.RowMajor, 32)        # weights [N, K]
    b = L.TensorDescription(L.DataType.e4m3, L.LayoutType.ColumnMajor, 16)   # x [M, K] as K x M
    c = L.TensorDescription(L.DataType.bf16, L.LayoutType.ColumnMajor, 8)    # D^T [N, M]
    kernel_schedule, epilogue_schedule = _schedule_types(config.schedule)
    return GemmOperation(
        L.GemmKind.Universal3x, 90, tile, a, b, c, L.DataType.f32,
        L.EpilogueFunctor.LinearCombination, L.SwizzlingFunctor.Identity1, None,
        kernel_schedule, epilogue_schedule, L.TileSchedulerType.Default,
        mixed_input_mode=L.MixedInputMode.ScaleOnly,
    )


def emit_cutlass_gemm(config: CutlassGemmConfig) -> tuple[str, str]:
    """Emit the CUTLASS kernel type for ``config``.

    Returns:
        ``(operation_name, cpp)``: the C++ struct name and its definition (collective
        builders for mainloop and epilogue, ``GemmUniversal`` kernel).
    """
    from cutlass_library.gemm_operation import EmitGemmUniversal3xInstance

    op = _gemm_operation(config)
    return op.procedural_name(), EmitGemmUniversal3xInstance().emit(op)


def _schedule_types(schedule: str):  # -> (cutlass_library KernelScheduleType, EpilogueScheduleType)
    """``cutlass_library``'s kernel and epilogue schedule of a ``cooperative``/``pingpong`` config."""
    import_cutlass_library()
    from cutlass_library import library as L

    if schedule == "cooperative":
        return L.KernelScheduleType.TmaWarpSpecializedCooperative, L.EpilogueScheduleType.TmaWarpSpecializedCooperative
    return L.KernelScheduleType.TmaWarpSpecializedPingpong, L.EpilogueScheduleType.TmaWarpSpecialized


def _schedule_tags(schedule: str) -> tuple[str, str]:
    """CUTLASS's C++ names of the kernel and epilogue schedules, from ``cutlass_library``."""
    from cutlass_library import library as L

    kernel, epilogue = _schedule_types(schedule)
    return L.KernelScheduleTag[kernel], L.EpilogueScheduleTag[epilogue]


#: Group-64 activation operand: (CUTLASS element, ATen dtype, torch name).
_ACTIVATIONS = {
    "e4m3": ("cutlass::float_e4m3_t", "at::kFloat8_e4m3fn", "float8_e4m3fn"),
    "f16": ("cutlass::half_t", "at::kHalf", "float16"),
}


def render_group64_source(config: Group64GemmConfig) -> str:
    """The ``.cu`` of our group-64 GEMM (``csrc/svdq_g64_gemm.cu.in`` + the mainloop header)."""
    kernel_schedule, epilogue_schedule = _schedule_tags(config.schedule)
    header = f"// svdquant kernel {config.name}\n// config: {sorted(config.as_dict().items())}\n"
    return header + csrc_template("svdq_g64_gemm.cu.in").substitute(
        TILE_M=config.tile_m, TILE_N=config.tile_n, TILE_K=config.tile_k,
        CLUSTER_M=config.cluster_m, CLUSTER_N=config.cluster_n,
        KERNEL_SCHEDULE=kernel_schedule, EPILOGUE_SCHEDULE=epilogue_schedule,
        STAGES=config.stages, PROMOTE=config.promote, LUT="true" if config.lut else "false",
        ELEMENT_X=_ACTIVATIONS[config.activations][0], Q_DTYPE=_ACTIVATIONS[config.activations][1],
        Q_DTYPE_NAME=_ACTIVATIONS[config.activations][2],
        OP_NAME=config.name, LOWRANK=1 if config.lowrank else 0,
        CONVERT_STAGES=config.convert_slots if config.convert == "producer" else 0,
        CONVERT_PROBE=1 if config.convert_probe else 0,
        TILE_SCHEDULER="cutlass::gemm::StreamKScheduler" if config.scheduler == "streamk" else "void",
    )


def render_ss_lowrank_source(config: SsLowrankGemmConfig) -> str:
    """The ``.cu`` of the pre-converted GEMM (``csrc/svdq_ss_gemm.cu.in`` + ``svdq_sm90_ss_lowrank.hpp``)."""
    kernel_schedule, epilogue_schedule = _schedule_tags(config.schedule)
    header = f"// svdquant kernel {config.name}\n// config: {sorted(config.as_dict().items())}\n"
    return header + csrc_template("svdq_ss_gemm.cu.in").substitute(
        TILE_M=config.tile_m, TILE_N=config.tile_n, TILE_K=config.tile_k,
        CLUSTER_M=config.cluster_m, CLUSTER_N=config.cluster_n,
        KERNEL_SCHEDULE=kernel_schedule, EPILOGUE_SCHEDULE=epilogue_schedule, STAGES=config.stages,
        OP_NAME=config.name,
        TILE_SCHEDULER="cutlass::gemm::StreamKScheduler" if config.scheduler == "streamk" else "void",
    )


def render_source(config: CutlassGemmConfig) -> str:
    """The complete ``.cu`` translation unit for ``config`` (kernel + torch op registration)."""
    if isinstance(config, Group64GemmConfig):
        return render_group64_source(config)
    if isinstance(config, SsLowrankGemmConfig):
        return render_ss_lowrank_source(config)
    operation_name, cpp = emit_cutlass_gemm(config)
    header = (
        f"// svdquant kernel {config.name}\n"
        f"// config: {sorted(config.as_dict().items())}\n"
    )
    return header + csrc_template("cutlass_gemm_s4_fp8.cu.in").substitute(
        CUTLASS_KERNEL=cpp, OPERATION_NAME=operation_name, OP_NAME=config.name
    )
