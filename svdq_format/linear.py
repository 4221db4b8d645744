"""``SVDQLinear``: one SVDQuant linear layer as an ``nn.Module``.

    y = Q(x / s) · Q(R)ᵀ  +  (x · L2ᵀ) · L1ᵀ  +  b

* ``R`` — the 4-bit residual (``qweight`` + ``wscales`` [+ ``wtscale``]),
* ``s`` — the smoothing vector (``smooth``),
* ``L2`` — ``lora_down`` ``[r, K]``, acting on the **raw** input (1/s folded in),
* ``L1`` — ``lora_up`` ``[N, r]``,
* ``b`` — ``bias``.

The tensors are buffers named exactly like the on-disk keys (``<prefix>.qweight``, ...), so a
module's ``state_dict()`` *is* its part of a checkpoint. The forward goes through the
``svdquant::linear`` op (:mod:`svdq_format.ops`), which picks a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from . import packing
from .errors import QuantizationError, UnsupportedError
from .lowrank import LOWRANK_METHODS, lowrank_factors
from .ops import auto_act, svdq_linear
from .spec import FLOAT_DTYPES, GROUP_SIZE, KINDS, PRECISIONS, KSegment, LayerSpec, dtype_from_name, dtype_name

__all__ = ["SVDQLinear", "EXEC_MODES"]

#: Execution modes of a W4A4 layer: ``exact`` = the format's W4A4 math; ``fast`` = FP8 per-token
#: activations with the same 4-bit weights (the Hopper fast path; more precise activations).
EXEC_MODES = ("auto", "exact", "fast", "fast8")


class SVDQLinear(nn.Module):
    """A linear layer stored in SVDQuant form (docs/format.md).

    Build one from an ``nn.Linear`` with :meth:`from_linear`, from a manifest entry with
    :meth:`from_spec`, or load many with :func:`svdq_format.load_file`.

    Args:
        in_features: K (a multiple of the precision's group size).
        out_features: N.
        rank: Rank r of the 16-bit low-rank branch (0 disables it).
        precision: ``"int4"`` or ``"nvfp4"``.
        kind: ``"w4a4"`` (activations quantized at run time) or ``"w4a16"``.
        bias: Whether the layer has a bias.
        dtype: Compute dtype (of smooth, low-rank branch, bias and output).
        scale_dtype: dtype of int4 group scales (bf16 or fp16); default: ``dtype`` when
            16-bit, else float16. Ignored for nvfp4 (always e4m3).
        device: Where to allocate the (uninitialised) buffers; ``"meta"`` works.
        fused_from: Names of the linears fused along N into this one (q|k|v), if any.
        split_sizes: Their output sizes.
        act_shift: Input shift of the 4-bit branch (docs/format.md §6; 0 normally).
        act_unsigned: Unsigned int4 activation codes (post-GELU inputs; with ``act_shift``).
        k_segments: Per-segment activation handling of the input channels (format 2,
            docs/format.md §7.4; e.g. FLUX single blocks' ``proj_out``: attention half signed,
            MLP half GELU-shifted unsigned); then ``act_shift``/``act_unsigned`` stay 0 / false,
            and an nvfp4 ``wtscale`` holds one scale per segment.
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    wtscale: Optional[torch.Tensor]
    smooth: torch.Tensor
    lora_down: Optional[torch.Tensor]
    lora_up: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    lora_scales: Optional[torch.Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 32,
        precision: str = "int4",
        kind: str = "w4a4",
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        scale_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        fused_from: Sequence[str] = (),
        split_sizes: Sequence[int] = (),
        act_shift: float = 0.0,
        act_unsigned: bool = False,
        k_segments: Sequence[KSegment] = (),
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise UnsupportedError(f"precision {precision!r} is not one of {PRECISIONS}")
        if kind not in KINDS:
            raise UnsupportedError(f"kind {kind!r} is not one of {KINDS}")
        if dtype_name(dtype) not in FLOAT_DTYPES:
            raise UnsupportedError(f"compute dtype {dtype} is not one of {FLOAT_DTYPES}")
        group = GROUP_SIZE[precision]
        if in_features % group:
            raise UnsupportedError(
                f"in_features {in_features} is not a multiple of the {precision} group size {group}"
            )
        if scale_dtype is None:
            scale_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16
        if precision == "int4" and scale_dtype not in (torch.bfloat16, torch.float16):
            raise UnsupportedError(f"int4 scales must be bfloat16 or float16, not {scale_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.precision = precision
        self.kind = kind
        self.dtype = dtype
        self.fused_from = tuple(fused_from)
        self.split_sizes = tuple(split_sizes)
        self.act_shift = float(act_shift)
        self.act_unsigned = bool(act_unsigned)
        self.k_segments = tuple(k_segments)
        #: ``"auto"`` (the default: the fastest of ``"fast8"`` / ``"fast"`` that a kernel backend
        #: runs for this layer on its device — Hopper —, else ``"exact"``; :func:`svdq_format.ops.auto_act`),
        #: ``"exact"`` (the format's W4A4 math), ``"fast"`` (FP8 activations) or ``"fast8"`` (FP8
        #: activations and e4m3-rounded int4 weights: the fastest Hopper kernel); W4A16 ignores it.
        self.mode = "auto"
        #: ``"auto"`` or a registered backend name (see :mod:`svdq_format.ops`).
        self.backend = "auto"

        ng = in_features // group
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        if precision == "int4":
            self.register_buffer("wscales", torch.empty(out_features, ng, dtype=scale_dtype, device=device))
            self.register_buffer("wtscale", None)
        else:
            self.register_buffer("wscales", torch.empty(out_features, ng, dtype=torch.float8_e4m3fn, device=device))
            shape = (len(self.k_segments),) if self.k_segments else ()
            self.register_buffer("wtscale", torch.empty(shape, dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, device=device))
        if rank > 0:
            self.register_buffer("lora_down", torch.empty(rank, in_features, dtype=dtype, device=device))
            self.register_buffer("lora_up", torch.empty(out_features, rank, dtype=dtype, device=device))
        else:
            self.register_buffer("lora_down", None)
            self.register_buffer("lora_up", None)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        # Runtime-only per-rank multipliers of the low-rank branch (LoRA strengths); never saved.
        self.register_buffer("lora_scales", None, persistent=False)
        try:
            self.spec.check()
        except Exception as exc:
            raise UnsupportedError(str(exc)) from None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spec(cls, spec: LayerSpec, *, device: torch.device | str | None = None,
                  scale_dtype: torch.dtype | None = None) -> SVDQLinear:
        """An (uninitialised) module with the shapes of a manifest entry."""
        return cls(
            spec.in_features,
            spec.out_features,
            rank=spec.rank,
            precision=spec.precision,
            kind=spec.kind,
            bias=spec.has_bias,
            dtype=dtype_from_name(spec.dtype),
            scale_dtype=scale_dtype,
            device=device,
            fused_from=spec.fused_from,
            split_sizes=spec.split_sizes,
            act_shift=spec.act_shift,
            act_unsigned=spec.act_unsigned,
            k_segments=spec.k_segments,
        )

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int = 32,
        precision: str = "int4",
        kind: str = "w4a4",
        smooth: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        scale_dtype: torch.dtype | None = None,
        int4_scales: torch.Tensor | None = None,
        lowrank: str = "auto",
    ) -> SVDQLinear:
        """Quantize an ``nn.Linear`` into SVDQuant form.

        Computes ``Ŵ = W · diag(s)``, its top-``rank`` factors ``L1 · L̂2`` (in float32), stores
        ``lora_up = L1``, ``lora_down = L̂2 · diag(1/s)`` (the raw-input domain) and quantizes
        the residual ``R = Ŵ − L1 · L̂2`` (computed from the *stored*, rounded branch).

        The factors come from the quantizer's rule (:func:`svdq_format.lowrank.lowrank_factors`):
        by default an exact SVD for small layers and a randomised SVD (``torch.svd_lowrank``, 4
        power iterations) for large ones — on a 3072 × 3072 layer about 10× faster than the full
        SVD, with a residual error within 1 % of it. The randomised sketch uses a fixed seed, so
        the result is deterministic and the global random state is left untouched.

        Args:
            linear: The layer to quantize (any float dtype, any device).
            rank: Rank of the low-rank branch (0: plain 4-bit).
            precision: ``"int4"`` or ``"nvfp4"``.
            kind: ``"w4a4"`` or ``"w4a16"``.
            smooth: Smoothing vector ``s`` ``[K]`` (positive); ``None`` means no smoothing.
            dtype: Compute dtype of the result; default: the linear's weight dtype.
            scale_dtype: int4 scale dtype (see the class docstring).
            int4_scales: Optional precomputed int4 group scales of the residual (e.g. from a
                clipping search); default absmax / 7.
            lowrank: ``"auto"`` (default), ``"svd"`` (exact, ``torch.linalg.svd``: slow on large
                layers) or ``"randomized"``.

        Returns:
            The quantized layer on the linear's device.

        Raises:
            QuantizationError: non-finite weights, bad smoothing vector, or rank too large.
        """
        w = linear.weight.detach().float()
        n, k = w.shape
        dtype = dtype or linear.weight.dtype
        if not torch.isfinite(w).all():
            raise QuantizationError("linear weight contains NaN or inf")
        if rank < 0 or rank > min(n, k):
            raise QuantizationError(f"rank {rank} is outside [0, min(N={n}, K={k})]")
        if lowrank not in LOWRANK_METHODS:
            raise QuantizationError(f"low-rank method {lowrank!r} is not one of {LOWRANK_METHODS}")
        device = w.device
        if smooth is None:
            s = torch.ones(k, device=device)
        else:
            s = smooth.detach().float().to(device)
            if s.shape != (k,) or not torch.isfinite(s).all() or (s <= 0).any():
                raise QuantizationError(f"smooth must be a finite positive vector of length {k}")
        layer = cls(
            k, n, rank=rank, precision=precision, kind=kind, bias=linear.bias is not None,
            dtype=dtype, scale_dtype=scale_dtype, device=device,
        )
        s_stored = s.to(dtype)
        s = s_stored.float()  # the forward divides by the stored (rounded) vector
        layer.smooth.copy_(s_stored)
        w_hat = w * s.unsqueeze(0)
        residual = w_hat
        if rank > 0:
            up32, vh = _seeded_lowrank_factors(w_hat, rank, method=lowrank)
            up = up32.to(dtype)
            down = (vh / s.unsqueeze(0)).to(dtype)
            assert layer.lora_up is not None and layer.lora_down is not None
            layer.lora_up.copy_(up)
            layer.lora_down.copy_(down)
            residual = w_hat - up.float() @ (down.float() * s.unsqueeze(0))
        layer.set_residual(residual, int4_scales=int4_scales)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.copy_(linear.bias.detach().to(dtype))
        return layer

    @torch.no_grad()
    def set_residual(
        self, residual: torch.Tensor, *, int4_scales: torch.Tensor | None = None,
        nvfp4_tensor_scale: float | None = None,
    ) -> None:
        """Quantize a float residual ``R`` ``[N, K]`` (smoothed domain) into this layer's buffers.

        Args:
            residual: The residual.
            int4_scales: int4 group scales to use (default absmax / 7).
            nvfp4_tensor_scale: nvfp4 tensor scale to use for every segment (default: each
                segment's ``absmax / (6 · 448)``), e.g. one scale shared by layers fused later.
        """
        if residual.shape != (self.out_features, self.in_features):
            raise QuantizationError(
                f"residual shape {tuple(residual.shape)} != ({self.out_features}, {self.in_features})"
            )
        if self.precision == "int4":
            nib, scales = packing.quantize_int4(
                residual, group_size=64, scale_dtype=self.wscales.dtype, scales=int4_scales
            )
            self.wscales.copy_(scales)
        else:  # one tensor scale per segment (the whole layer without k_segments)
            assert self.wtscale is not None
            parts, lo = [], 0
            for i, size in enumerate(self.spec.segment_sizes):
                nib_s, gscales, ts = packing.quantize_nvfp4(residual[:, lo : lo + size], group_size=16,
                                                            tensor_scale=nvfp4_tensor_scale)
                self.wscales[:, lo // 16 : (lo + size) // 16].copy_(gscales)
                self.wtscale.view(-1)[i].copy_(ts)
                parts.append(nib_s)
                lo += size
            nib = torch.cat(parts, dim=1)
        self.qweight.copy_(packing.pack_nibbles(nib))

    # ------------------------------------------------------------------ description

    @property
    def group_size(self) -> int:
        """Quantization group size along K (64 int4, 16 nvfp4)."""
        return GROUP_SIZE[self.precision]

    @property
    def spec(self) -> LayerSpec:
        """The manifest entry describing this layer."""
        return LayerSpec(
            kind=self.kind,
            precision=self.precision,
            in_features=self.in_features,
            out_features=self.out_features,
            rank=self.rank,
            dtype=dtype_name(self.dtype),
            has_bias=self.bias is not None,
            fused_from=self.fused_from,
            split_sizes=self.split_sizes,
            act_shift=self.act_shift,
            act_unsigned=self.act_unsigned,
            k_segments=self.k_segments,
        )

    def extra_repr(self) -> str:
        segments = ""
        if self.k_segments:
            segments = ", k_segments=[" + ", ".join(
                f"{seg.size}" + (f" shift={seg.act_shift:g}" if seg.act_shift else "")
                + (" unsigned" if seg.act_unsigned else "") for seg in self.k_segments) + "]"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, precision={self.precision}, kind={self.kind}, "
            f"bias={self.bias is not None}, dtype={dtype_name(self.dtype)}{segments}"
        )

    # ------------------------------------------------------------------ math

    @property
    def act(self) -> str:
        """Activation handling passed to the op (see :data:`svdq_format.ops.ACT_MODES`) for an
        input on this layer's device."""
        return self.act_for(self.qweight.device, self.dtype)

    def act_for(self, device: torch.device, dtype: torch.dtype) -> str:
        """Activation handling for an input on ``device`` in ``dtype`` (``mode="auto"`` depends on
        which kernels run there)."""
        if self.kind == "w4a16":
            return "none"
        if self.mode == "auto":
            # (act_shift 0.0: no backend's choice reads the shift, and a shift that differed between
            # two compiles of this forward is a symbolic float to dynamo, which auto_act, a constant
            # function, cannot take)
            return auto_act(device, dtype, self.precision, self.in_features, self.out_features, self.rank,
                            self.bias is not None, 0.0, self.act_unsigned, self.backend,
                            tuple((seg.size, seg.act_shift, seg.act_unsigned) for seg in self.k_segments))
        if self.mode == "exact":
            return self.precision
        return "fp8w" if self.mode == "fast8" and self.precision == "int4" else "fp8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = Q(x/s) Q(R)ᵀ + x L2ᵀ L1ᵀ + b`` via the ``svdquant::linear`` op."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        if self.mode not in EXEC_MODES:
            raise UnsupportedError(f"mode {self.mode!r} is not one of {EXEC_MODES}")
        return svdq_linear(
            x.to(self.dtype),
            self.qweight,
            self.wscales,
            self.wtscale,
            self.smooth,
            self.lora_down,
            self.lora_up,
            self.bias,
            precision=self.precision,
            act=self.act_for(x.device, self.dtype),
            lora_scales=self.lora_scales,
            act_shift=self.act_shift,
            act_unsigned=self.act_unsigned,
            backend=self.backend,
            k_segments=self.k_segments,
        )

    @torch.no_grad()
    def residual(self) -> torch.Tensor:
        """The dequantized residual ``Q(R)`` in the smoothed domain, float32 ``[N, K]``."""
        nib = packing.unpack_nibbles(self.qweight)
        if self.precision == "int4":
            return packing.dequantize_int4(nib, self.wscales, group_size=64)
        assert self.wtscale is not None
        parts, lo = [], 0
        for i, size in enumerate(self.spec.segment_sizes):  # one tensor scale per segment
            parts.append(packing.dequantize_nvfp4(nib[:, lo : lo + size], self.wscales[:, lo // 16 : (lo + size) // 16],
                                                  self.wtscale.reshape(-1)[i], group_size=16))
            lo += size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense weight this layer represents on the raw input, float32 ``[N, K]``.

        ``W_eff = Q(R) · diag(1/s) + L1 · L2`` — what the layer computes when activations
        are not quantized (exactly the W4A16 function).
        """
        w = self.residual() / self.smooth.float().unsqueeze(0)
        # (runtime LoRA ranks sit here too, also on a layer stored with rank 0)
        if self.lora_down is not None and self.lora_up is not None and self.lora_down.shape[0] > 0:
            up, down = self.lora_up.float(), self.lora_down.float()
            if self.lora_scales is not None:
                up = up * self.lora_scales.float()
            w = w + up @ down
        return w

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with :meth:`dequantize`'s weight (and the bias)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize().to(self.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _seeded_lowrank_factors(w: torch.Tensor, rank: int, *, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lowrank_factors` with the randomised sketch drawn from a fixed seed (same layer →
    same bits), leaving the caller's random state as it was."""
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(0)
        if devices:
            with torch.cuda.device(w.device):
                torch.cuda.manual_seed(0)
        return lowrank_factors(w, rank, method=method)
