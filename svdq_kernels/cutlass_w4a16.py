"""int4 W4A16 layers on Hopper with the CUTLASS group-64 GEMM (fp16 activations) — experimental.

Semantics: :func:`svdq_format.ops.reference_linear` with ``act="none"`` (AdaLN modulation layers
and whatever the quantizer keeps weight-only), as :func:`svdq_kernels.triton_fast.w4a16_linear`
computes it: ``x̂`` rounded to fp16 with a per-token power of two (the Triton prologue's ``w16``
output), int4 weights whose products ``code × scale × 2^e`` are exact in fp16 (``2^e`` per row,
:func:`svdq_kernels.triton_gemm.row_pow2`), fp16 tensor-core MMAs accumulating in fp32. The GEMM
is the ``fast8`` kernel's mainloop and epilogue with an fp16 activation operand
(``Group64GemmConfig(activations="f16")``): the weights stay 4-bit in memory and are converted
in registers, exactly. Layers whose scales cannot be folded exactly run the Triton path.

Used only with ``SVDQ_EXPERIMENTAL_KERNELS=1`` (``registry.EXPERIMENTAL_PATHS``) until its GPU
tests pass; the kernels compile on the CPU machine (sm_90a).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import triton_fast
from .cutlass_fast8 import group64_layer
from .tensor_cache import TensorCache
from .triton_fast import layer_inputs
from .triton_gemm import row_pow2
from .triton_prologue import prologue

__all__ = ["w4a16_weights", "w4a16_linear"]

_WEIGHTS: TensorCache[Optional[tuple[torch.Tensor, torch.Tensor]]] = TensorCache()


def w4a16_weights(wscales: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The GEMM's view of a layer's scales, made once per scales version (cached).

    Returns:
        ``(scales16 [K/64, N] float16, rowinv [N] float32)`` — each row's bf16 group scales times
        its power of two ``2^e``, exact in fp16 with every code product, and ``2^-e`` — or None
        when no such power of two exists (then the Triton path runs the layer).
    """
    def make() -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        pw = row_pow2(wscales)
        if pw is None:
            return None
        scales16 = (wscales.float() * pw.unsqueeze(1)).to(torch.float16).t().contiguous()
        return scales16, (1.0 / pw).to(torch.float32).contiguous()

    return _WEIGHTS.get((wscales,), make)


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
    """The backend entry point (signature of :func:`svdq_format.ops.reference_linear`)."""
    prepared = w4a16_weights(wscales)
    if prepared is None:
        return triton_fast.w4a16_linear(x, qweight, wscales, wtscale, smooth, lora_down, lora_up, bias,
                                        lora_scales, precision, act, act_shift, act_unsigned)
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    return group64_layer(x, x2, qweight, *prepared, up, bias, lambda: prologue(
        x2, smooth, down, act_shift=act_shift, w16=True, lr16=True, lora_scales=lora_scales))
