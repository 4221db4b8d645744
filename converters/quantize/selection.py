"""Which linears get quantized, and how (W4A4, weight-only W4A16, or kept 16-bit).

Default rule (works for any model built from repeated blocks, with per-architecture extras):

* every ``nn.Linear`` inside the repeated blocks (``transformer_blocks``,
  ``single_transformer_blocks``, ``blocks``, ``encoder.layer`` ...) → **W4A4**;
* AdaLN modulation linears (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``,
  ``norm_out.linear``, Qwen-Image ``img_mod.1`` ...) → **W4A16** (weight-only: their input is
  the tiny conditioning vector, whose activations quantize badly and cost nothing);
* everything else (patch/text/time embedders, norms, the final ``proj_out``) stays 16-bit;
* linears whose ``in_features`` is not a multiple of 64 stay 16-bit, with a note.

``include`` / ``exclude`` are shell-style patterns (:mod:`fnmatch`) on qualified module names;
``include`` adds layers, ``exclude`` removes them (exclude wins).

``target="nunchaku"`` (:mod:`converters.quantize.targets`) keeps the AdaLN layers Nunchaku holds
in 16 bits (``norm_out.linear``) unquantized and records the activation handling Nunchaku's
kernels apply (:attr:`Selection.act_handling`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from svdq_format.spec import KSegment

from .stats import block_containers
from .targets import nunchaku_act_handling, nunchaku_weight_only

__all__ = ["ADALN_PATTERNS", "EMBEDDER_PATTERN", "ARCH_EXTRA_EXCLUDES", "Selection", "select_layers", "MIN_GROUP"]

#: Every quantized K must be a multiple of this (int4 group; kernels tile K by 64).
MIN_GROUP = 64

#: Regular expressions (searched in the qualified name) of AdaLN modulation linears.
ADALN_PATTERNS: tuple[str, ...] = (
    r"(^|\.)norm1(_context)?\.linear$",
    r"(^|\.)norm1_context\.linear$",
    r"(^|\.)norm2(_context)?\.linear$",
    r"(^|\.)norm\.linear$",
    r"(^|\.)norm_out\.linear$",
    r"(^|\.)(img|txt)_mod\.\d+$",
    r"(^|\.)adaLN_modulation(\.\d+)?$",
)

#: Regular expression of embedder linears inside blocks (e.g. DiT's per-block timestep/label
#: embedders ``norm1.emb.timestep_embedder.linear_1``): kept 16-bit like every embedder.
EMBEDDER_PATTERN = r"(^|\.)(emb|[A-Za-z_]*embedder|[A-Za-z_]*_embed(ding)?s?)\."

#: Extra default exclusions per architecture (class name prefix → fnmatch patterns).
ARCH_EXTRA_EXCLUDES: dict[str, tuple[str, ...]] = {
    "Flux": (),
    "SD3": (),
    "PixArt": (),
    "Sana": (),
    "QwenImage": (),
    "Wan": ("*.norm_added_q*", "*.norm_added_k*"),
    "Bert": ("pooler.*",),
}


@dataclasses.dataclass
class Selection:
    """The outcome of :func:`select_layers`.

    Attributes:
        kinds: Qualified name → ``"w4a4"`` or ``"w4a16"``, in module order.
        skipped: Qualified name → why it stays 16-bit (only for layers that were candidates or
            matched a pattern, plus every non-multiple-of-64 shape).
        blocks: Block name (``"transformer_blocks.3"``, or ``""`` for layers outside blocks)
            → its selected layer names, in module order (the unit of streaming and resume).
        act_handling: Layer → the activation handling a target requires of it (one
            :class:`~svdq_format.spec.KSegment` for the whole layer, or several: ``k_segments``);
            layers not listed get the quantizer's own choice.
    """

    kinds: dict[str, str]
    skipped: dict[str, str]
    blocks: dict[str, list[str]]
    act_handling: dict[str, tuple[KSegment, ...]] = dataclasses.field(default_factory=dict)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_adaln(name: str) -> bool:
    """Whether a linear's name looks like an AdaLN modulation projection."""
    return any(re.search(p, name) for p in ADALN_PATTERNS)


def select_layers(
    model: nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weight_only: bool = False,
    target: str = "svdquant",
    precision: str = "int4",
) -> Selection:
    """Decide, for every ``nn.Linear`` of ``model``, whether and how to quantize it.

    Args:
        model: The model (any ``nn.Module``; diffusers transformers get sensible defaults).
        include: Patterns of extra layers to quantize (e.g. ``"proj_out"``).
        exclude: Patterns of layers to keep 16-bit (e.g. ``"*.ff_context.*"``).
        weight_only: Make every selected layer W4A16.
        target: ``"svdquant"`` or ``"nunchaku"`` (see the module doc).
        precision: W4A4 precision (the Nunchaku target shifts int4 activations only).

    Returns:
        The :class:`Selection`.
    """
    cls = type(model).__name__
    extra_ex = next((v for k, v in ARCH_EXTRA_EXCLUDES.items() if cls.startswith(k)), ())
    prefixes = [name for name, _ in block_containers(model)]
    kinds: dict[str, str] = {}
    skipped: dict[str, str] = {}
    blocks: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        block = ""
        for p in prefixes:
            if name.startswith(f"{p}."):
                idx = name[len(p) + 1 :].split(".", 1)[0]
                block = f"{p}.{idx}"
                break
        adaln = is_adaln(name)
        wanted = bool(block) or adaln
        if _matches(name, include):
            wanted = True
        if not wanted:
            continue
        if _matches(name, exclude):
            skipped[name] = "excluded by pattern"
            continue
        if _matches(name, extra_ex) and not _matches(name, include):
            skipped[name] = f"kept 16-bit by the {cls} defaults"
            continue
        if re.search(EMBEDDER_PATTERN, name) and not _matches(name, include):
            skipped[name] = "embedder: kept 16-bit"
            continue
        if mod.in_features % MIN_GROUP:
            skipped[name] = f"in_features {mod.in_features} is not a multiple of {MIN_GROUP}: kept 16-bit"
            continue
        if target == "nunchaku" and adaln and not nunchaku_weight_only(name) and not _matches(name, include):
            skipped[name] = "Nunchaku keeps this modulation layer 16-bit (--target nunchaku)"
            continue
        kinds[name] = "w4a16" if (adaln or weight_only) else "w4a4"
        blocks.setdefault(block, []).append(name)
    handling = nunchaku_act_handling(model, kinds, precision) if target == "nunchaku" else {}
    return Selection(kinds, skipped, blocks, handling)
