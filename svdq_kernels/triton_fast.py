"""The Triton layers on Hopper: each layer mode = a prologue + a group-64 GEMM.

* :func:`fast_linear` — the ``fast`` mode (``act="fp8"``): FP8 e4m3 activation codes with a
  per-token scale (:func:`~svdq_kernels.triton_prologue.prologue`) × int4 weights on the
  ``f16t`` datapath below :data:`FP8T_MIN_M` tokens and ``fp8t`` from there
  (:func:`fast_datapath`, :func:`~svdq_kernels.triton_gemm.gemm`);
* :func:`exact_linear` — the ``exact`` int4 W4A4 mode (the format's int4 activation quantizer);
* :func:`w4a16_linear` — int4 weight-only layers (``f16s``: scales folded into fp16 weights);
* :func:`nvfp4_linear` — nvfp4 layers, W4A4 or W4A16 (both operands exact in fp16).

Each has the signature of :func:`svdq_format.ops.reference_linear` and equals it up to fp32
summation order (``fast``: up to the FP8 activation rounding it defines; ``fp8t``: ~4e-4
relative). The kernels live by family in :mod:`svdq_kernels.triton_prologue` and
:mod:`svdq_kernels.triton_gemm`; Triton is imported when they are first built, so importing
this module is free on CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from svdq_format import ops

from . import triton_gemv
from ._device import device_guard
from .triton_gemm import gemm, gemm_exact, gemm_nvfp4
from .triton_prologue import prologue, prologue_exact, prologue_nvfp4

__all__ = ["fast_linear", "exact_linear", "w4a16_linear", "nvfp4_linear", "layer_inputs", "fast_datapath",
           "FP8T_MIN_M", "triton_available"]

#: From this many tokens on, the ``fast`` mode takes ``fp8t``: 10–21 % faster than ``f16t`` at M = 4608
#: on an H100 (two runs, benchmarks/results/gemm_datapaths_h100_run{2,3}.json), 3.6e-4 relative
#: from the exact products; below it the two trade places shape by shape, and ``f16t`` is exact.
FP8T_MIN_M = 1024


def fast_datapath(m: int) -> str:
    """The GEMM datapath :func:`fast_linear` uses for ``m`` tokens."""
    return "fp8t" if m >= FP8T_MIN_M else "f16t"


def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def layer_inputs(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """A layer call's tensors as the kernels take them: ``x`` as a contiguous ``[M, K]``; the
    low-rank factors (and per-rank scales) only when both exist with a rank, ``L2`` in x's dtype."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()  # (also an empty [..., 0] stand-in)
    lr_on = lora_down is not None and lora_up is not None and lora_down.shape[0] > 0
    return (x2, smooth.contiguous(),
            lora_down.to(x2.dtype).contiguous() if lr_on else None,  # type: ignore[union-attr]
            lora_up.contiguous() if lr_on else None,  # type: ignore[union-attr]
            bias.contiguous() if bias is not None else None,
            lora_scales.contiguous() if (lr_on and lora_scales is not None) else None)


def exact_linear(
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
    """The ``exact`` int4 W4A4 mode (signature of :func:`svdq_format.ops.reference_linear`)."""
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    with device_guard(x2.device):
        codes, scales, lr = prologue_exact(x2, smooth, down, act_shift=act_shift, unsigned=act_unsigned)
        y = gemm_exact(codes, scales, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                       out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def nvfp4_linear(
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
    """nvfp4 layers on Hopper (``act="nvfp4"`` W4A4 or ``"none"`` W4A16): both operands are
    dequantized exactly into fp16 (E2M1 × e4m3 needs ≤ 6 significant bits), so a plain fp16
    MMA with fp32 accumulation computes the format's math up to summation order."""
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    wt = wtscale if wtscale is not None else torch.ones((), device=x2.device)
    with device_guard(x2.device):
        if act == "nvfp4":
            xq, lr = prologue_nvfp4(x2, smooth, down, act_shift=act_shift)
            a = None
        else:
            xq, a, lr = prologue(x2, smooth, down, act_shift=act_shift, w16=True)
        y = gemm_nvfp4(xq, a, qweight.contiguous(), wscales, wt, lr, up, bias, lora_scales, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def w4a16_linear(
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
    """int4 weight-only layers (``act="none"``): ``x̂`` in fp16 (per-token power-of-two scale) ×
    int4 weights, on the ``f16s`` GEMM (``f16t`` when the scales cannot be folded exactly), or at
    up to :data:`~svdq_kernels.triton_gemv.GEMV_MAX_M` tokens on the GEMV (:func:`~svdq_kernels.triton_gemv.gemv`).
    Differs from the reference only by the rounding of ``x̂`` to fp16 (~1e-4 relative)."""
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    with device_guard(x2.device):
        q, a, lr = prologue(x2, smooth, down, act_shift=act_shift, w16=True)
        if 0 < x2.shape[0] <= triton_gemv.GEMV_MAX_M:  # a few tokens (AdaLN at batch 1): bandwidth-bound
            y = triton_gemv.gemv(q, a, qweight, wscales, lr, up, bias, lora_scales, out_dtype=x.dtype)
        else:
            y = gemm(q, a, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                     out_dtype=x.dtype, datapath="f16s")
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def fast_linear(
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
    """The backend entry point (signature of :func:`svdq_format.ops.reference_linear`): activations
    quantized unshifted, ``act_shift`` in the bias (:func:`svdq_format.ops.fp8_bias`)."""
    bias = ops.fp8_bias(qweight, wscales, wtscale, smooth, bias, precision, act, act_shift, dtype=x.dtype)
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    datapath = fast_datapath(x2.shape[0])
    with device_guard(x2.device):  # Triton launches on the current device
        q, a, lr = prologue(x2, smooth, down)
        y = gemm(q, a, qweight.contiguous(), wscales.contiguous(), lr, up, bias, lora_scales,
                 out_dtype=x.dtype, datapath=datapath)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
