"""Quantizer presets that make the output loadable by another runtime (``svdq quantize --target``).

* ``"svdquant"`` (default): the best our format and runtime can do — any layer may pick unsigned
  GELU-shifted activations where they score better, AdaLN layers (``norm_out`` included) are
  weight-only with a smoothing search.
* ``"nunchaku"``: every layer representable in Nunchaku's files (docs/interop.md §5), so
  ``svdq convert --to nunchaku`` succeeds:

  - only the modulation layers Nunchaku stores as AWQ W4A16 (``norm1.linear``,
    ``norm1_context.linear``, ``norm.linear``, Qwen-Image ``img_mod.1`` / ``txt_mod.1``) are
    weight-only: int4 even in an nvfp4 model, without smoothing or a low-rank branch; other
    AdaLN layers (FLUX ``norm_out.linear``) stay 16-bit, as in Nunchaku's files;
  - int4: the GELU-fed fc2 layers (``<ff>.net.2`` after diffusers' ``GELU``) run on GELU outputs
    shifted by 0.171875 with unsigned codes, FLUX single blocks' ``proj_out`` has two
    k-segments — attention half signed, MLP half shifted unsigned (format 2, ``k_segments``) —
    and no other layer is shifted (no scored choice);
  - nvfp4: the layers of one input group (q|k|v, which Nunchaku fuses) share one tensor scale,
    so the fused layer's ``wcscales`` are exact;
  - a 16-bit compute dtype, and no weight-only-everything (Nunchaku runs W4A4).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from svdq_format.errors import UnsupportedError
from svdq_format.spec import KSegment

__all__ = ["TARGETS", "NUNCHAKU_SHIFT", "check_target", "nunchaku_weight_only", "nunchaku_act_handling"]

#: Quantizer presets (:attr:`QuantizeOptions.target`).
TARGETS: tuple[str, ...] = ("svdquant", "nunchaku")
#: The shift Nunchaku adds to GELU outputs before unsigned int4 quantization.
NUNCHAKU_SHIFT = 0.171875


def check_target(target: str, *, weight_only: bool, w4a16_rank: int) -> None:
    """Refuse options a target cannot honour (one line naming the option)."""
    if target not in TARGETS:
        raise UnsupportedError(f"unknown quantize target {target!r} (known: {', '.join(TARGETS)})")
    if target == "nunchaku" and weight_only:
        raise UnsupportedError(
            "--target nunchaku quantizes W4A4 (Nunchaku runs no weight-only model): drop --weight-only"
        )
    if target == "nunchaku" and w4a16_rank:
        raise UnsupportedError("--target nunchaku: Nunchaku's AWQ modulation layers have no low-rank branch "
                               f"(--w4a16-rank {w4a16_rank}); use 0")


def nunchaku_weight_only(name: str) -> bool:
    """Whether Nunchaku stores this module as an AWQ W4A16 modulation layer."""
    from ..nunchaku.names import adanorm_splits

    return adanorm_splits(name) > 1


def nunchaku_act_handling(
    model: nn.Module, names: Mapping[str, str], precision: str,
) -> dict[str, tuple[KSegment, ...]]:
    """The activation handling Nunchaku's kernels apply, for the selected W4A4 layers that need one.

    Args:
        model: The model being quantized.
        names: Selected layer → kind (``"w4a4"`` / ``"w4a16"``).
        precision: The W4A4 precision (only int4 shifts activations).

    Returns:
        Layer → its segments (one segment: the whole layer shifted; two: FLUX single-block
        ``proj_out``, attention half plain, MLP half shifted). Layers not listed are plain.
    """
    from ..nunchaku.common import is_gelu_fc2

    if precision != "int4":
        return {}
    out: dict[str, tuple[KSegment, ...]] = {}
    for name, kind in names.items():
        if kind != "w4a4":
            continue
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if is_gelu_fc2(model, name):
            out[name] = (KSegment(mod.in_features, NUNCHAKU_SHIFT, True),)
        elif leaf == "proj_out" and parent.startswith("single_transformer_blocks."):
            try:
                mlp = model.get_submodule(f"{parent}.proj_mlp")
            except AttributeError:
                continue
            if not isinstance(mlp, nn.Linear):
                continue
            k_mlp = mlp.out_features
            out[name] = (KSegment(mod.in_features - k_mlp), KSegment(k_mlp, NUNCHAKU_SHIFT, True))
    return out
