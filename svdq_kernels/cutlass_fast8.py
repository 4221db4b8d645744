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

With :data:`LOWRANK_IN_GEMM`, steps 2 and 3 are one kernel: the GEMM ends each output tile with
low-rank k-tiles (bf16 MMAs of ``lr · L1ᵀ`` into the FP8 k-tiles' accumulator,
:mod:`svdq_kernels.lowrank_tiles`) and its epilogue adds the bias — no ``c`` is written or read.
A layer without a low-rank branch (rank 0) takes this path too, with one k-tile of zeros.

By default (``SVDQ_FAST8_PROLOGUE=fused``, :data:`svdq_format.ops.FAST8_PROLOGUE`) step 1 and
the low-rank k-tiles are one prologue (:func:`svdq_kernels.lowrank_tiles.quantize_lowrank`: ``x``
read for the absmax and ``x · L2ᵀ`` together, then for the codes), and a compiled graph calls
this function through ``svdquant::linear`` instead of quantizing in the graph.

By default (``SVDQ_FAST8_WEIGHTS=e4m3``, :data:`WEIGHTS`), a low-rank layer at M ≥ 2048 converts
its weights in a pre-pass instead of in the GEMM's mainloop: :func:`svdq_kernels.weights_e4m3.
e4m3_weights` writes them as a plain e4m3 ``[N, K]`` matrix (per call: the model stays 4-bit in
memory), and the pre-converted GEMM (:class:`svdq_kernels.configs.SsLowrankGemmConfig`: a dense
FP8 mainloop with the same low-rank k-tiles and epilogue) runs on it — the same results.

With ``SVDQ_FAST8_PROLOGUE=inductor``, and for k-segmented layers, a compiled graph hands the
activations over quantized (:func:`fast8_linear_fp8`, the
``svdquant::linear_fp8`` op: Inductor fused :func:`svdq_format.ops.quantize_fp8_rows` into the
kernel that produced ``x``), and step 1 shrinks to the low-rank down projection alone
(:func:`svdq_kernels.triton_prologue.lowrank_down`).

A layer's ``act_shift`` (a Nunchaku GELU segment: FLUX's ``mlp_fc2`` layers, a converted single
block's ``proj_out`` MLP half) is not applied to the FP8 activations: both entry points quantize
``x · (1/s)`` and add the shift's exact contribution to the bias
(:func:`svdq_format.ops.fp8_bias`, cached per layer), so those activations are signed and take
the fast kernels above. A call whose activations are one-signed without a shift
(``act_unsigned`` and no ``act_shift``, :func:`svdq_format.ops.fp8_one_signed`: e.g. a ReLU-fed
layer) with M > 16 runs the promoted kernel (:data:`svdq_kernels.configs.PROMOTED_GROUP64_CONFIGS`)
on the two-step path: Hopper's FP8 MMAs accumulate with reduced precision, which on one-signed
activations (the shifted GELU half, when it was quantized shifted) gave 1.16e-2 (H100; cuBLAS
``_scaled_mm`` with fast accumulation: 1.15e-2), the promoted kernel 1.66e-3 (the bf16 output
rounding); signed activations 2.6e-3 on the fast kernels, as the FP8 peer's fast accumulation.
This comes before :data:`WEIGHTS`: the pre-converted kernel accumulates without promotion too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Optional

import torch

from svdq_format import ops, packing
from svdq_format.errors import UnsupportedError

from ._device import device_guard
from .build import load_kernel
from .configs import (
    AUTO_GROUP64_CONFIGS,
    AUTO_GROUP64_LR_CONFIGS,
    AUTO_GROUP64_W4A16_CONFIGS,
    PRODUCER_CONVERT_CONFIGS,
    PROMOTED_GROUP64_CONFIGS,
    SS_LOWRANK_CONFIGS,
    SS_TUNED_CONFIGS,
    Group64GemmConfig,
    SsLowrankGemmConfig,
    group64_config,
    ss_lowrank_config,
    ss_tuned_config,
)
from .lowrank_tiles import (
    LR_K,
    lowrank_k_tiles,
    lowrank_tiles,
    padded_up,
    padded_up64,
    quantize_lowrank,
    sentinel_scale_rows,
)
from .tensor_cache import TensorCache
from .triton_fast import layer_inputs
from .triton_prologue import lowrank_down, prologue
from .weights_e4m3 import e4m3_weights

__all__ = ["LOWRANK_IN_GEMM", "CONVERT", "PROMOTE_SHIFTED", "WEIGHTS", "WEIGHTS_CHOICES",
           "DEFAULT_WEIGHTS", "SS_MIN_M", "fast8_weights", "fast8_lowrank_weights", "fast8_linear", "fast8_linear_fp8",
           "lowrank_source", "group64_gemm", "group64_gemm_lowrank", "ss_gemm_lowrank", "group64_layer"]

#: Run the low-rank up projection inside the GEMM (``Group64GemmConfig.lowrank`` kernels) rather
#: than as a cuBLAS GEMM whose bf16 output the GEMM's epilogue reads back.
LOWRANK_IN_GEMM = True

#: Where the low-rank kernels at M ≥ 2048 convert the int4 weights to e4m3: ``"consumer"`` (the
#: MMA warps, into registers: the default) or ``"producer"`` (the producer warpgroup's idle warps,
#: into shared memory, for shared-memory-sourced FP8 MMAs: :data:`svdq_kernels.configs.
#: PRODUCER_CONVERT_CONFIGS`, same results; opt-in: 0.87–0.91× the consumer kernels on an H100).
CONVERT = "consumer"

#: Also run GELU-shifted unsigned layers (``act_unsigned`` with an ``act_shift``) on the promoted
#: kernels, as before their activations were quantized unshifted. Off since an H100 measured the
#: unshifted post-GELU rows accumulating like signed ones (``benchmarks/fp8_accumulation.py``, K = 12288,
#: against the float64 product: ours 2.94e-3 unshifted, 3.12e-3 signed, 1.16e-2 shifted; the whole
#: layer on the fast kernels 5.28e-3 against the promoted path's 5.52e-3,
#: ``tests/test_fp8_shift_bias_gpu.py``): those layers run the fast and pre-converted kernels like
#: signed ones. The promoted kernels serve one-signed layers without a shift
#: (:func:`svdq_format.ops.fp8_one_signed`).
PROMOTE_SHIFTED = False

#: The values of :data:`WEIGHTS`.
WEIGHTS_CHOICES = ("int4", "e4m3")
#: :data:`WEIGHTS` without ``SVDQ_FAST8_WEIGHTS``: the pre-converted path since 2026-12-07 (an H100:
#: the layer's GEMM 1.09–1.18× faster with its pass, the FLUX.1-dev step 127.7 → 125.1 ms, same
#: bits; docs/benchmarks.md).
DEFAULT_WEIGHTS = "e4m3"


def _weights_setting() -> str:
    return ops.env_choice("SVDQ_FAST8_WEIGHTS", WEIGHTS_CHOICES, DEFAULT_WEIGHTS)


#: What the low-rank ``fast8`` GEMM at M ≥ :data:`SS_MIN_M` reads as weights: ``"e4m3"`` (the
#: default: a per-call pre-pass, :func:`svdq_kernels.weights_e4m3.e4m3_weights`, writes them as a
#: plain e4m3 matrix and the pre-converted kernel, :data:`svdq_kernels.configs.SS_TUNED_CONFIGS`,
#: runs on it) or ``"int4"`` (the packed codes, converted to e4m3 inside the GEMM's mainloop); the
#: same bits either way at K ≤ 4096 (persistent tilings, one k-tile order), within the same float64
#: bound above (stream-K splits the k-tiles differently). Read once at import from ``SVDQ_FAST8_WEIGHTS``.
WEIGHTS = _weights_setting()

#: The smallest token count for which :data:`WEIGHTS` ``= "e4m3"`` takes the pre-converted path (the
#: pre-pass costs N·K/2 + N·K/32 bytes read and N·K written per call: worth it only on large M).
SS_MIN_M = 2048



@dataclasses.dataclass
class _Fast8Prep:
    """A layer's GEMM-side weight preparation: ``scales`` ``[K/64 + 2·t, N]`` fp16 (the first
    ``groups`` rows real, the rest the low-rank k-tiles' sentinels), ``rowinv`` ``[N]`` fp32."""

    scales: torch.Tensor
    groups: int
    rowinv: torch.Tensor


_WEIGHTS: TensorCache[_Fast8Prep] = TensorCache()
#: The scales with more than one low-rank k-tile's sentinel rows (a LoRA that widens the rank), per tile count.
_WIDER_SCALES: TensorCache[torch.Tensor] = TensorCache()
_UPS: TensorCache[torch.Tensor] = TensorCache()
_ZERO_UPS: TensorCache[torch.Tensor] = TensorCache()


def _zero_up(qweight: torch.Tensor) -> torch.Tensor:
    """A rank-0 layer's stand-in ``L1``: bf16 zeros ``[N, 1]`` (one low-rank k-tile of zeros), cached
    per weight like the other preparations (made outside a CUDA graph's pool)."""
    return _ZERO_UPS.get((qweight,), lambda: torch.zeros(qweight.shape[0], 1, device=qweight.device,
                                                           dtype=torch.bfloat16))


def fast8_weights(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's view of a layer's weights, made once per weight version (cached).

    Returns:
        ``(scales16 [K/64, N] float16, rowinv [N] float32)``: the group scales times the row's
        power of two (:func:`svdq_format.packing.fp8_weight_scales`), transposed for the kernel's
        TMA, and one over that power of two. The packed codes are used as stored.
    """
    prep = _WEIGHTS.get((qweight, wscales), lambda: _make_fast8_weights(qweight, wscales))
    return prep.scales[: prep.groups], prep.rowinv


def fast8_lowrank_weights(
    qweight: torch.Tensor, wscales: torch.Tensor, tiles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fast8_weights` for the ``lowrank`` kernels: the scales with ``2·tiles`` sentinel rows
    after the ``K/64`` real ones (:func:`svdq_kernels.lowrank_tiles.sentinel_scale_rows`) — a view
    of the same cached tensor for one k-tile, a cached copy per tile count beyond (a LoRA that
    widens the rank) — and ``rowinv``."""
    prep = _WEIGHTS.get((qweight, wscales), lambda: _make_fast8_weights(qweight, wscales))
    rows = prep.groups + 2 * tiles
    if prep.scales.shape[0] >= rows:
        return prep.scales[:rows], prep.rowinv

    def wider() -> torch.Tensor:  # a cache entry of its own, so it too is made outside CUDA graphs' pool
        extra = sentinel_scale_rows(tiles, prep.scales.shape[1], device=prep.scales.device)
        return torch.cat([prep.scales[: prep.groups], extra]).contiguous()

    return _WIDER_SCALES.get((qweight, wscales), wider, variant=tiles), prep.rowinv


def _make_fast8_weights(qweight: torch.Tensor, wscales: torch.Tensor) -> _Fast8Prep:
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    pw = packing.fp8_weight_row_scales(codes, wscales)
    scales16 = packing.fp8_weight_scales(wscales, pw).t()
    # one tensor for both kernel kinds: [K/64, N] real rows, then one low-rank k-tile's sentinels
    scales = torch.cat([scales16, sentinel_scale_rows(1, scales16.shape[1], device=scales16.device)]).contiguous()
    return _Fast8Prep(scales, scales16.shape[0], (1.0 / pw).to(torch.float32).contiguous())


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


def _one_signed(act_shift: float, act_unsigned: bool) -> bool:
    """Whether a call takes the promoted kernels' route: :func:`svdq_format.ops.fp8_one_signed`, or any
    ``act_unsigned`` call with :data:`PROMOTE_SHIFTED`."""
    return ops.fp8_one_signed(act_shift, act_unsigned) or (PROMOTE_SHIFTED and bool(act_unsigned))


def _promoted(m: int, one_signed: bool) -> Optional[Group64GemmConfig]:
    """The promoted group-64 kernel for an ``m``-token ``fast8`` call whose activations are one-signed
    (:func:`svdq_format.ops.fp8_one_signed`: ``act_unsigned`` without a shift), else ``None`` (signed
    activations — GELU-shifted layers included, quantized unshifted —, or M ≤ 16: the 128 × 16
    stream-K tiling, whose split-K parts sum in fp32: 2.3e-3 on FLUX's ``proj_out`` MLP half)."""
    if not one_signed:
        return None
    config = group64_config(m, promote=True)
    return config if config.promote else None


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
    # several token counts (image, text, 1-token batches), and each nvcc run takes ~2 minutes; the
    # promoted kernels (one-signed activations) likewise as a pair
    others = (AUTO_GROUP64_W4A16_CONFIGS if activations == "f16"
              else PROMOTED_GROUP64_CONFIGS if config.promote else AUTO_GROUP64_CONFIGS)
    op = load_kernel(config, also_build=others)
    return op(qweight, scales16, rowinv, q, a, c)


def group64_gemm_lowrank(
    qweight: torch.Tensor, scales: torch.Tensor, rowinv: torch.Tensor, q: torch.Tensor, a: torch.Tensor,
    bias: Optional[torch.Tensor], lr: torch.Tensor, l1: torch.Tensor, *, config: Optional[Group64GemmConfig] = None,
) -> torch.Tensor:
    """``(Σ q · w8 + lr · l1ᵀ) · rowinv · a + bias`` in bf16 ``[M, N]`` on the ``lowrank`` group-64
    kernel: ``scales`` and ``rowinv`` from :func:`fast8_lowrank_weights`, ``lr``/``a`` from
    :func:`svdq_kernels.lowrank_tiles.lowrank_tiles`, ``l1`` from
    :func:`svdq_kernels.lowrank_tiles.padded_up`."""
    if config is None:
        config = group64_config(q.shape[0], n=qweight.shape[0], sms=_sm_count(q.device.index), lowrank=True,
                                convert=CONVERT)
    producer = PRODUCER_CONVERT_CONFIGS if CONVERT == "producer" else ()
    op = load_kernel(config, also_build=AUTO_GROUP64_LR_CONFIGS + producer)
    b = bias.to(torch.bfloat16) if bias is not None else q.new_empty(0, dtype=torch.bfloat16)
    return op(qweight, scales, rowinv, q, a, b, lr, l1)


def ss_gemm_lowrank(
    w8: torch.Tensor, rowinv: torch.Tensor, q: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor],
    lr: torch.Tensor, l1: torch.Tensor, *, config: Optional[SsLowrankGemmConfig] = None,
) -> torch.Tensor:
    """``(Σ q · w8 + lr · l1ᵀ) · rowinv · a + bias`` in bf16 ``[M, N]`` on the pre-converted kernel
    (:class:`svdq_kernels.configs.SsLowrankGemmConfig`): ``w8`` float8_e4m3fn ``[N, K]`` from
    :func:`svdq_kernels.weights_e4m3.e4m3_weights`, ``rowinv`` from :func:`fast8_weights`, ``lr``/``a``
    as for :func:`group64_gemm_lowrank`, ``l1`` from :func:`svdq_kernels.lowrank_tiles.padded_up64`.
    Without ``config``: the twin of the tiling :func:`group64_gemm_lowrank` would use (M ≥ 2048)."""
    if config is None:
        config = ss_lowrank_config(q.shape[0], n=w8.shape[0], sms=_sm_count(q.device.index))
        if config is None:
            raise UnsupportedError(f"no pre-converted fast8 kernel for M={q.shape[0]} (M >= {SS_MIN_M} only)")
    # a first use builds the kernel's family in parallel: the tuned kernels the layers run, or the twins
    op = load_kernel(config, also_build=SS_TUNED_CONFIGS if config in SS_TUNED_CONFIGS else SS_LOWRANK_CONFIGS)
    b = bias.to(torch.bfloat16) if bias is not None else q.new_empty(0, dtype=torch.bfloat16)
    return op(w8, rowinv, q, a, b, lr, l1)


def _preconverted(m: int, n: int, k: int, device: torch.device) -> Optional[SsLowrankGemmConfig]:
    """The pre-converted kernel for an ``m``-token low-rank layer call (its tuned tiling,
    :func:`svdq_kernels.configs.ss_tuned_config`), if :data:`WEIGHTS` asks for it."""
    if WEIGHTS != "e4m3" or m < SS_MIN_M:
        return None
    return ss_tuned_config(m, n=n, k=k, sms=_sm_count(device.index))


def _fast8_lowrank_layer(
    x: torch.Tensor, x2: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, down: Optional[torch.Tensor],
    up: Optional[torch.Tensor], bias: Optional[torch.Tensor], lora_scales: Optional[torch.Tensor],
    quantized: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    fused: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = None,
) -> torch.Tensor:
    """The ``fast8`` layer with the low-rank k-tiles: ``quantized()`` → ``(q, a)``, then the
    branch's inputs (:func:`svdq_kernels.lowrank_tiles.lowrank_tiles`) — or ``fused()`` → ``(q, a,
    lr, a')`` in one prologue (:func:`svdq_kernels.lowrank_tiles.quantize_lowrank`) — and one GEMM.

    A layer without a low-rank branch (``down``/``up`` ``None``: rank 0, as a rank allocation gives
    the least sensitive layers) runs the same kernels with one k-tile of zeros (``lr`` zeros, a
    cached zero ``L1``): its bias then comes from the epilogue, where the two-step path would write
    and read back a bias-filled ``[M, N]`` source — a broadcast copy and a read as large as the
    output (7.4 ms of a FLUX.1-dev step on an H100) — and it gets the pre-converted kernel too."""
    n = qweight.shape[0]
    with device_guard(x2.device):
        if fused is not None:
            q, _, lr, ag = fused()
        else:
            q, a = quantized()
            if down is None:
                lr, ag = torch.zeros(q.shape[0], 2 * LR_K, device=q.device, dtype=torch.bfloat16), a
            else:
                lr, ag = lowrank_tiles(x2, down, a, lora_scales=lora_scales)
        up = _zero_up(qweight) if up is None else up
        ss = _preconverted(q.shape[0], n, q.shape[1], q.device)
        if ss is not None:  # SVDQ_FAST8_WEIGHTS=e4m3: the weights converted by a pre-pass, a dense FP8 GEMM
            scales16, rowinv = fast8_weights(qweight, wscales)
            w8 = e4m3_weights(qweight.contiguous(), scales16)
            y = ss_gemm_lowrank(w8, rowinv, q, ag, bias, lr, padded_up64(up, rowinv), config=ss)
        else:
            scales, rowinv = fast8_lowrank_weights(qweight, wscales, lowrank_k_tiles(up.shape[1]))
            y = group64_gemm_lowrank(qweight.contiguous(), scales, rowinv, q, ag, bias, lr, padded_up(up, rowinv))
    return y.reshape(*x.shape[:-1], n)


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
    """The backend entry point (signature of :func:`svdq_format.ops.reference_linear`). The
    activations are quantized unshifted and ``act_shift`` enters through the bias
    (:func:`svdq_format.ops.fp8_bias`); one-signed activations (``act_unsigned`` without a shift,
    :func:`svdq_format.ops.fp8_one_signed`) with M > 16: the promoted kernel, two-step path."""
    bias = ops.fp8_bias(qweight, wscales, wtscale, smooth, bias, precision, act, act_shift, dtype=x.dtype)
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    promoted = _promoted(x2.shape[0], _one_signed(act_shift, act_unsigned))
    if LOWRANK_IN_GEMM and promoted is None:  # rank 0 too (_fast8_lowrank_layer)
        def quantized() -> tuple[torch.Tensor, torch.Tensor]:
            q, a, _ = prologue(x2, smooth, None)
            return q, a

        fused = (functools.partial(quantize_lowrank, x2, smooth, down, lora_scales=lora_scales)
                 if ops.FAST8_PROLOGUE == "fused" and down is not None else None)  # (rank 0: nothing to fuse)
        return _fast8_lowrank_layer(x, x2, qweight, wscales, down, up, bias, lora_scales, quantized, fused)
    return group64_layer(x, x2, qweight, *fast8_weights(qweight, wscales), up, bias, lambda: prologue(
        x2, smooth, down, lr16=True, lora_scales=lora_scales), config=promoted)


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
    :func:`svdq_format.ops.reference_linear_fp8`): ``q`` float8_e4m3fn ``[M, K]``, ``a`` ``[M]`` of the
    unshifted ``x · (1/s)`` (the k-segmented layers' path in a compiled graph; ``act_shift`` and
    ``act_unsigned`` as there)."""
    bias = ops.fp8_bias(qweight, wscales, wtscale, smooth, bias, precision, act, act_shift, dtype=x.dtype)
    x2, smooth, down, up, bias, lora_scales = layer_inputs(x, smooth, lora_down, lora_up, bias, lora_scales)
    m = x2.shape[0]
    promoted = _promoted(m, _one_signed(act_shift, act_unsigned))
    if LOWRANK_IN_GEMM and promoted is None:  # rank 0 too (_fast8_lowrank_layer)
        return _fast8_lowrank_layer(x, x2, qweight, wscales, down, up, bias, lora_scales, lambda: (
            q.reshape(m, -1).contiguous(), a.reshape(m).to(torch.float32).contiguous()))
    return group64_layer(x, x2, qweight, *fast8_weights(qweight, wscales), up, bias, lambda: (
        q.reshape(m, -1).contiguous(), a.reshape(m).to(torch.float32).contiguous(),
        lowrank_down(x2, down, lora_scales=lora_scales) if down is not None else None), config=promoted)


def group64_layer(
    x: torch.Tensor, x2: torch.Tensor, qweight: torch.Tensor, scales16: torch.Tensor, rowinv: torch.Tensor,
    up: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    activations: Callable[[], tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], *,
    config: Optional[Group64GemmConfig] = None,
) -> torch.Tensor:
    """What every layer on the group-64 GEMM does after its weight preparation (``scales16``,
    ``rowinv``: :func:`fast8_weights`, or :func:`svdq_kernels.cutlass_w4a16.w4a16_weights`): on
    ``x``'s device, ``activations()`` → ``(q, a, lr16)`` (``q`` e4m3 or fp16), then the low-rank
    source and the GEMM (``config``: its kernel, else :func:`group64_gemm`'s choice); the output
    shaped like ``x`` with N features."""
    n = qweight.shape[0]
    with device_guard(x2.device):
        q, a, lr16 = activations()
        c = lowrank_source(lr16, up, bias, m=x2.shape[0], n=n, device=x2.device)
        y = group64_gemm(qweight.contiguous(), scales16, rowinv, q, a, c, config=config)
    return y.reshape(*x.shape[:-1], n)


def fast8_unsupported(in_features: int, out_features: int, dtype: torch.dtype) -> Optional[str]:
    """Why the ``fast8`` kernels cannot run a layer (host-side shape/dtype limits), else None."""
    if dtype != torch.bfloat16:
        return f"fast8 kernels output bfloat16; the layer computes in {dtype}"
    return group64_config(4096).supports(m=1, n=out_features, k=in_features, group=64)
