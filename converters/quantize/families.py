"""Model families from module structure: the repeated blocks and the role of every linear.

Nothing here is a per-class recipe. A model is read as a diffusion transformer (or text
encoder) is built:

* **Blocks** are the repeated ``nn.ModuleList``\\ s of identical blocks (one class, each holding
  linears and an attention module), innermost first: FLUX's ``transformer_blocks`` /
  ``single_transformer_blocks``, HiDream's ``double_stream_blocks`` / ``single_stream_blocks``,
  Wan's ``blocks``, the ``transformer_blocks`` inside each of an SDXL UNet's
  ``Transformer2DModel``\\ s, T5's ``encoder.block``. When no list holds attention, lists of
  identical blocks of linears count (a plain MLP stack).
* **Roles** of the linears (:func:`linear_roles`):

  - inside a block, **W4A4**, except
  - **AdaLN modulation** → **W4A16**: a linear owned by a normalisation or modulation module
    (``AdaLayerNormZero.linear``, ``CogVideoXLayerNormZero.linear``, ``MochiRMSNormZero.linear``,
    ``Modulation.lin`` ...) or named like one (``adaLN_modulation``, ``img_mod``): its input is the
    conditioning vector, one row per sample, so 4-bit activations would save nothing and cost
    accuracy;
  - **video temporal layers** (in a block list named ``temporal*``, Latte) → **W4A16**: they mix
    the frames of one position, where activation error shows as flicker;
  - **embedders inside a block** (DiT's per-block timestep embedder) → kept 16-bit;
  - outside the blocks everything stays **16-bit** (patch / text / time embedders, the final
    projection), except the final AdaLN modulation (``norm_out.linear``,
    ``final_layer.adaLN_modulation``) → **W4A16**.

:data:`TESTED_FAMILIES` lists the classes the tests and ``benchmarks/families.py`` run; any
other architecture gets the same derivation and one warning naming what was guessed
(:func:`guessed_summary`).
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

__all__ = [
    "ADALN_PATTERNS",
    "EMBEDDER_PATTERN",
    "TESTED_FAMILIES",
    "LayerRole",
    "block_lists",
    "guessed_summary",
    "is_tested",
    "linear_roles",
]

#: Regular expressions (searched in the qualified name) of AdaLN modulation linears, for the
#: linears outside the blocks and those a structural test cannot see (a ``Sequential``).
ADALN_PATTERNS: tuple[str, ...] = (
    r"(^|\.)norm1(_context)?\.linear$",
    r"(^|\.)norm2(_context)?\.linear$",
    r"(^|\.)norm\.linear$",
    r"(^|\.)norm_out\.linear$",
    r"(^|\.)(img|txt)_mod\.\d+$",
    r"(^|\.)adaLN_modulation(\.\d+)?$",
)

#: Regular expression of embedder linears inside blocks (e.g. DiT's per-block timestep/label
#: embedders ``norm1.emb.timestep_embedder.linear_1``): kept 16-bit like every embedder.
EMBEDDER_PATTERN = r"(^|\.)(emb|[A-Za-z_]*embedder|[A-Za-z_]*_embed(ding)?s?)\."

#: Module names of modulation projections (one path component, case-insensitive).
_MODULATION_NAME = re.compile(r"(?i)^(ada_?ln\w*|\w*_mod|mod|modulation|\w*_modulation)$")

#: Class-name fragments of the modules whose linears compute a modulation from the
#: conditioning vector (AdaLN variants, modulation modules).
_MODULATION_OWNER = re.compile(r"Norm|Modulation")

#: Block lists whose blocks mix frames (video temporal attention).
_TEMPORAL = re.compile(r"(?i)temporal")

#: Class names of the architectures the family tests quantize, reload, save and (where diffusers
#: has a LoRA loader) load a LoRA into: ``tests/test_families.py`` checks this list is exactly
#: what it runs. Others get the structural defaults plus one warning.
TESTED_FAMILIES: frozenset[str] = frozenset({
    # diffusers denoisers
    "AllegroTransformer3DModel", "AuraFlowTransformer2DModel", "BriaTransformer2DModel",
    "ChromaTransformer2DModel", "ChronoEditTransformer3DModel", "CogVideoXTransformer3DModel",
    "CogView3PlusTransformer2DModel", "CogView4Transformer2DModel", "DiTTransformer2DModel",
    "EasyAnimateTransformer3DModel", "ErnieImageTransformer2DModel", "Flux2Transformer2DModel",
    "FluxTransformer2DModel", "HeliosTransformer3DModel", "HiDreamImageTransformer2DModel", "HunyuanDiT2DModel",
    "HunyuanVideo15Transformer3DModel", "HunyuanVideoTransformer3DModel", "JoyImageEditTransformer3DModel",
    "LTX2VideoTransformer3DModel", "LTXVideoTransformer3DModel", "LatteTransformer3DModel",
    "LongCatAudioDiTTransformer", "LongCatImageTransformer2DModel", "Lumina2Transformer2DModel",
    "MochiTransformer3DModel", "MotifVideoTransformer3DModel", "NucleusMoEImageTransformer2DModel",
    "OvisImageTransformer2DModel", "PRXTransformer2DModel", "PixArtTransformer2DModel",
    "QwenImageTransformer2DModel", "SD3Transformer2DModel", "SanaTransformer2DModel",
    "SanaVideoTransformer3DModel", "SkyReelsV2Transformer3DModel", "StableAudio3DiTModel",
    "UNet2DConditionModel", "WanTransformer3DModel", "WanVACETransformer3DModel", "ZImageTransformer2DModel",
    # transformers text encoders
    "BertModel", "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel",
})


@dataclasses.dataclass(frozen=True)
class LayerRole:
    """How one linear is quantized by default, and why.

    Attributes:
        kind: ``"w4a4"``, ``"w4a16"`` or ``"keep"`` (16-bit).
        why: One phrase (goes to ``fidelity.json["skipped"]`` for kept layers).
        block: The block holding it (``"transformer_blocks.3"``) or ``""``.
    """

    kind: str
    why: str
    block: str


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or "Attn" in name or isinstance(module, nn.MultiheadAttention)


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's lists of repeated blocks, ``(qualified name, ModuleList)``, in module order.

    A list counts when its entries are all of one class, are not single layers, and each holds
    a linear; when some lists hold attention modules, only those count; of nested lists the
    innermost count (an SDXL UNet's ``down_blocks.1.attentions.0.transformer_blocks``, not
    ``down_blocks.1.attentions``).
    """
    found: list[tuple[str, nn.ModuleList, bool]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod) or len({type(c) for c in mod}) != 1:
            continue
        if isinstance(mod[0], nn.Linear) or not all(any(isinstance(m, nn.Linear) for m in c.modules()) for c in mod):
            continue
        found.append((name, mod, all(any(_is_attention(m) for m in c.modules()) for c in mod)))
    if any(att for _, _, att in found):
        found = [f for f in found if f[2]]
    names = [n for n, _, _ in found]
    return [(n, m) for n, m, _ in found if not any(o.startswith(f"{n}.") for o in names)]


def _block_of(name: str, lists: list[tuple[str, nn.ModuleList]]) -> tuple[str, str]:
    for prefix, _ in lists:
        if name.startswith(f"{prefix}."):
            return f"{prefix}.{name[len(prefix) + 1:].split('.', 1)[0]}", prefix
    return "", ""


def _is_modulation(model: nn.Module, name: str) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if _MODULATION_OWNER.search(type(parent).__name__):
        return True
    parts = name.split(".")
    own = parts[-2] if leaf.isdigit() and len(parts) > 1 else leaf  # Sequential(SiLU, Linear): ``img_mod.1``
    if _MODULATION_NAME.match(own) or (parent_name and _MODULATION_NAME.match(parent_name.rpartition(".")[2])):
        return True
    return any(re.search(p, name) for p in ADALN_PATTERNS)


def linear_roles(model: nn.Module) -> dict[str, LayerRole]:
    """The default role of every ``nn.Linear`` of ``model`` (module order); see the module doc."""
    lists = block_lists(model)
    roles: dict[str, LayerRole] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        block, container = _block_of(name, lists)
        if not block:
            if any(re.search(p, name) for p in ADALN_PATTERNS):
                roles[name] = LayerRole("w4a16", "final AdaLN modulation (conditioning-vector input)", "")
            else:
                roles[name] = LayerRole("keep", "outside the repeated blocks (embedder or final projection)", "")
        elif re.search(EMBEDDER_PATTERN, name):
            roles[name] = LayerRole("keep", "embedder: kept 16-bit", block)
        elif _is_modulation(model, name):
            roles[name] = LayerRole("w4a16", "AdaLN modulation (conditioning-vector input)", block)
        elif _TEMPORAL.search(container):
            roles[name] = LayerRole("w4a16", "video temporal layer (mixes frames)", block)
        else:
            roles[name] = LayerRole("w4a4", "inside a repeated block", block)
    return roles


def is_tested(model: nn.Module) -> bool:
    """Whether ``model``'s class is one the family tests cover."""
    return type(model).__name__ in TESTED_FAMILIES


def guessed_summary(model: nn.Module, roles: dict[str, LayerRole] | None = None) -> str:
    """One line: the blocks found and how many linears got each role (for the unknown-model warning)."""
    roles = linear_roles(model) if roles is None else roles
    lists = block_lists(model)
    where = ", ".join(f"{n} ({len(m)})" for n, m in lists) or "none"
    count = {k: sum(r.kind == k for r in roles.values()) for k in ("w4a4", "w4a16", "keep")}
    return (f"blocks: {where}; {count['w4a4']} linears W4A4, {count['w4a16']} W4A16 (AdaLN modulation / "
            f"temporal), {count['keep']} kept 16-bit (embedders, final projection)")
