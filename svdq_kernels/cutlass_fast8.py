"""The ``fast8`` int4 layer on Hopper: the Triton prologue + our CUTLASS group-64 GEMM.

Semantics: :func:`svdq_format.ops.reference_linear` with ``act="fp8w"`` — activations
quantized to e4m3 per token (as in ``fast``), int4 weights rounded to e4m3 after scaling each
row by a power of two (:func:`svdq_format.packing.fp8_weight_values`). That is what an FP8
tensor-core mainloop that converts the packed int4 weights on the fly computes, so the GEMM
(``csrc/svdq_sm90_mixed_input_g64.hpp``, built by :mod:`svdq_kernels.build`) runs at FP8 speed
with the weights 4-bit in memory.

One layer call:

1. the ``fast`` prologue (:func:`svdq_kernels.triton_prologue.prologue`, two short Triton
   kernels): ``q`` (e4m3), ``a`` (per-token scale) and ``lr = x · L2ᵀ`` (times the per-rank
   LoRA scales) as bf16 ``[hi | lo]``;
2. ``c = bias + lr · L1ᵀ`` in bf16: one cuBLAS GEMM of the prologue's ``[hi | lo]`` bf16 split
   of ``lr`` (written by the prologue itself) with a cached ``[L1 | L1]``, so the product keeps
   fp32-level accuracy before its single rounding;
3. the CUTLASS GEMM ``out = (Σ q · w8) · rowinv · a + c``: weights and their fp16 group scales
   read once per tile, the epilogue applies both scales and adds ``c``.

In a compiled graph the activations arrive quantized (:func:`fast8_linear_fp8`, the
``svdquant::linear_fp8`` op: Inductor fused :func:`svdq_format.ops.quantize_fp8_rows` into the
kernel that produced ``x``), and step 1 shrinks to the low-rank down projection alone
(:func:`svdq_kernels.triton_prologue.lowrank_down`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch

from svdq_format import packing

from ._device import device_guard
from .build import load_kernel
from .configs import AUTO_GROUP64_CONFIGS, AUTO_GROUP64_W4A16_CONFIGS, Group64GemmConfig, group64_config
from .tensor_cache import TensorCache
from .triton_fast import layer_inputs
from .triton_prologue import lowrank_down, prologue

__all__ = ["fast8_weights", "fast8_linear", "fast8_linear_fp8", "lowrank_source", "group64_gemm", "group64_layer"]

_WEIGHTS: TensorCache[tuple[torch.Tensor, torch.Tensor]] = TensorCache()
_UPS: TensorCache[torch.Tensor] = TensorCache()


def fast8_weights(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's view of a layer's weights, made once per weight version (cached).

    Returns:
        ``(scales16 [K/64, N] float16, rowinv [N] float32)``: the group scales times the row's
        power of two (:func:`svdq_format.packing.fp8_weight_scales`), transposed for the kernel's
        TMA, and one over that power of two. The packed codes are used as stored.
    """
    return _WEIGHTS.get((qweight, wscales), lambda: _make_fast8_weights(qweight, wscales))


def _make_fast8_weights(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    pw = packing.fp8_weight_row_scales(codes, wscales)
    scales16 = packing.fp8_weight_scales(wscales, pw).t().contiguous()
    return scales16, (1.0 / pw).to(torch.float32).contiguous()


def _doubled_up(lora_up: torch.Tensor) -> torch.Tensor:
    """``[L1 | L1]`` in bf16 (``[N, 2r]``), cached per tensor and version."""
    def make() -> torch.Tensor:
        up = lora_up.to(torch.bfloat16)
        return torch.cat([up, up], dim=1).contiguous()

    return _UPS.get((lora_up,), make)


def lowrank_source(
    lr16: Optional[torch.Tensor], lora_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, m: int, n: int,
    device: torch.device,
) -> torch.Tensor:
    """``bias + lr · L1ᵀ`` as bf16 ``[M, N]`` (zeros when there is neither) — one cuBLAS GEMM.

    ``lr16`` is the prologue's ``lr16=True`` output, ``[hi | lo]`` bf16 ``[M, 2r]`` (the per-rank
    LoRA scales already applied), multiplied by ``[L1 | L1]`` with fp32 accumulation, so the
    only rounding beyond fp32 is the final one to bf16.
    """
    if lr16 is None or lora_up is None:
        if bias is None:
            return torch.zeros(m, n, device=device, dtype=torch.bfloat16)
        return bias.to(torch.bfloat16).expand(m, n).contiguous()
    ups = _doubled_up(lora_up)
    if bias is None:
        return lr16 @ ups.t()
    return torch.addmm(bias.to(torch.bfloat16), lr16, ups.t())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(
        device_index if device_index is not None else torch.cuda.current_device()).multi_processor_count


def group64_gemm(
    qweight: torch.Tensor, scales16: torch.Tensor, rowinv: torch.Tensor, q: torch.Tensor, a: torch.Tensor,
    c: torch.Tensor, *, config: Optional[Group64GemmConfig] = None,
) -> torch.Tensor:
    """``(Σ q · w8) · rowinv · a + c`` in bf16 ``[M, N]`` on the CUTLASS group-64 kernel (built on
    first use; :func:`svdq_kernels.configs.group64_config` picks the tile for M, N and the GPU).
    ``q`` float8_e4m3fn: the ``fast8`` kernels; float16: their W4A16 twins (``w8`` then is the
    exact fp16 ``code × scales16``)."""
    activations = "f16" if q.dtype == torch.float16 else "e4m3"
    if config is None:
        config = group64_config(q.shape[0], n=qweight.shape[0], sms=_sm_count(q.device.index),
                                activations=activations)
    # the first use compiles every kernel group64_config picks, in parallel: a model asks for
    # several token counts (image, text, 1-token batches), and each nvcc run takes ~2 minutes
    op = load_kernel(config, also_build=AUTO_GROUP64_W4A16_CONFIGS if activations == "f16" else AUTO_GROUP64_CONFIGS)
    return op(qweight, scales16, rowinv, q, a, c)


def fast8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """The backend entry point (signature of :func:`svdq_format.ops.reference_linear`)."""
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    return group64_layer(x, x2, qweight, *fast8_weights(qweight, wscales), up, bias, lambda: prologue(
        x2, smooth, down, act_shift=act_shift, lr16=True, lora_scales=lora_scales))


def fast8_linear_fp8(
    x: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtscale: Optional[torch.Tensor],
    smooth: torch.Tensor,
    lora_down: Optional[torch.Tensor],
    lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
    precision: str,
    act: str,
    act_shift: float = 0.0,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """:func:`fast8_linear` with the activations already quantized (signature of
    :func:`svdq_format.ops.reference_linear_fp8`): ``q`` float8_e4m3fn ``[M, K]``, ``a`` ``[M]``."""
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    m = x2.shape[0]
    return group64_layer(x, x2, qweight, *fast8_weights(qweight, wscales), up, bias, lambda: (
        q.reshape(m, -1).contiguous(), a.reshape(m).to(torch.float32).contiguous(),
        lowrank_down(x2, down, lora_scales=lora_scales) if down is not None else None))


def group64_layer(
    x: torch.Tensor, x2: torch.Tensor, qweight: torch.Tensor, scales16: torch.Tensor, rowinv: torch.Tensor,
    up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    activations: Callable[[], tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
) -> torch.Tensor:
    """What every layer on the group-64 GEMM does after its weight preparation (``scales16``,
    ``rowinv``: :func:`fast8_weights`, or :func:`svdq_kernels.cutlass_w4a16.w4a16_weights`): on
    ``x``'s device, ``activations()`` → ``(q, a, lr16)`` (``q`` e4m3 or fp16), then the low-rank
    source and the GEMM; the output shaped like ``x`` with N features."""
    n = qweight.shape[0]
    with device_guard(x2.device):
        q, a, lr16 = activations()
        c = lowrank_source(lr16, up, bias, m=x2.shape[0], n=n, device=x2.device)
        y = group64_gemm(qweight.contiguous(), scales16, rowinv, q, a, c)
    return y.reshape(*x.shape[:-1], n)


def fast8_unsupported(in_features: int, out_features: int, dtype: torch.dtype) -> Optional[str]:
    """Why the ``fast8`` kernels cannot run a layer (host-side shape/dtype limits), else None."""
    if dtype != torch.bfloat16:
        return f"fast8 kernels output bfloat16; the layer computes in {dtype}"
    return group64_config(4096).supports(m=1, n=out_features, k=in_features, group=64)
