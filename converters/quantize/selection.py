"""Which linears get quantized, and how (W4A4, weight-only W4A16, or kept 16-bit).

The defaults come from the module structure (:mod:`converters.quantize.families`): every
``nn.Linear`` inside the repeated blocks → **W4A4**; AdaLN modulation linears (owned by a
normalisation / modulation module, or named ``norm_out.linear``, ``adaLN_modulation`` ...) and
video temporal layers → **W4A16**; embedders and everything else outside the blocks stay 16-bit;
linears whose ``in_features`` is not a multiple of 64 stay 16-bit, with a note. A class that is
not in :data:`~converters.quantize.families.TESTED_FAMILIES` gets the same defaults and one
warning naming what was guessed.

``include`` / ``exclude`` are shell-style patterns (:mod:`fnmatch`) on qualified module names;
``include`` adds layers, ``exclude`` removes them (exclude wins).

``target="nunchaku"`` (:mod:`converters.quantize.targets`) keeps the modulation layers Nunchaku
holds in 16 bits (``norm_out.linear``) unquantized and records the activation handling Nunchaku's
kernels apply (:attr:`Selection.act_handling`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Sequence

from torch import nn

from svdq_format.spec import KSegment

from .families import ADALN_PATTERNS, EMBEDDER_PATTERN, guessed_summary, is_tested, linear_roles
from .targets import nunchaku_act_handling, nunchaku_weight_only

__all__ = ["ADALN_PATTERNS", "EMBEDDER_PATTERN", "Selection", "select_layers", "MIN_GROUP", "is_adaln"]

#: Every quantized K must be a multiple of this (int4 group; kernels tile K by 64).
MIN_GROUP = 64


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
    import re

    return any(re.search(p, name) for p in ADALN_PATTERNS)


def select_layers(
    model: nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weight_only: bool = False,
    warn_unknown: bool = True,
    target: str = "svdquant",
    precision: str = "int4",
) -> Selection:
    """Decide, for every ``nn.Linear`` of ``model``, whether and how to quantize it.

    Args:
        model: The model (any ``nn.Module``; the defaults come from its structure).
        include: Patterns of extra layers to quantize (e.g. ``"proj_out"``).
        exclude: Patterns of layers to keep 16-bit (e.g. ``"*.ff_context.*"``).
        weight_only: Make every selected layer W4A16.
        warn_unknown: For an architecture the family tests do not cover, one ``UserWarning``
            naming the blocks and roles that were guessed.
        target: ``"svdquant"`` or ``"nunchaku"`` (see the module doc).
        precision: W4A4 precision (the Nunchaku target shifts int4 activations only).

    Returns:
        The :class:`Selection`.
    """
    roles = linear_roles(model)
    if warn_unknown and not is_tested(model):
        warnings.warn(f"{type(model).__name__} is not an architecture svdquant was tested on; guessed "
                      f"{guessed_summary(model, roles)}. Check fidelity.json; --include/--exclude adjust it",
                      UserWarning, stacklevel=2)
    kinds: dict[str, str] = {}
    skipped: dict[str, str] = {}
    blocks: dict[str, list[str]] = {}
    for name, role in roles.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, nn.Linear)
        wanted = role.kind != "keep" or role.block != ""  # (16-bit layers inside blocks are reported)
        included = _matches(name, include)
        if not (wanted or included):
            continue
        if _matches(name, exclude):
            skipped[name] = "excluded by pattern"
            continue
        if role.kind == "keep" and not included:
            skipped[name] = role.why
            continue
        if mod.in_features % MIN_GROUP:
            skipped[name] = f"in_features {mod.in_features} is not a multiple of {MIN_GROUP}: kept 16-bit"
            continue
        if target == "nunchaku" and role.kind == "w4a16" and not nunchaku_weight_only(name) and not included:
            skipped[name] = "Nunchaku keeps this modulation layer 16-bit (--target nunchaku)"
            continue
        kinds[name] = "w4a16" if (role.kind == "w4a16" or weight_only) else "w4a4"
        blocks.setdefault(role.block, []).append(name)
    handling = nunchaku_act_handling(model, kinds, precision) if target == "nunchaku" else {}
    return Selection(kinds, skipped, blocks, handling)
