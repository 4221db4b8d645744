"""Nunchaku key dialects ↔ diffusers module names (reference: nunchaku.md §1.3, §2.4, §4.1).

Three dialects ship on the Hub:

* ``flux-cpp`` — FLUX/SANA files for the C++ model: block-local module names (``qkv_proj``,
  ``mlp_fc1``, ``out_proj_context``, ...) and C++ tensor names (``lora_down``, ``lora_up``,
  ``smooth``, ``smooth_orig``).
* ``sdxl`` — diffusers module names (with fused ``to_qkv``) and C++ tensor names.
* ``native`` — Qwen-Image / Z-Image / FLUX-V2 files: diffusers-like module names with fused
  ``to_qkv`` / ``add_qkv_proj`` and Python tensor names (``proj_down``, ``proj_up``,
  ``smooth_factor``, ``smooth_factor_orig``).

Inside this package every Nunchaku key is first brought to *native* module names with
*canonical* tensor roles (our names: ``lora_down``, ``lora_up``, ``smooth``, ``smooth_orig``);
the mapping from there to diffusers modules (splitting q|k|v, FLUX single-block ``proj_out``)
is done against the model (:mod:`converters.nunchaku.importer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from svdq_format.errors import UnsupportedError

__all__ = [
    "DIALECTS",
    "LAYER_ROLES",
    "FUSED",
    "REBUILT_FUSED",
    "REBUILT_PLAIN",
    "ADANORM_SPLITS",
    "detect_dialect",
    "to_native",
    "from_native",
    "adanorm_splits",
    "unquantized_to_stock",
    "stock_to_unquantized",
]

DIALECTS = ("flux-cpp", "sdxl", "native")

#: Canonical role → (C++ tensor name, native tensor name).
_ROLE_NAMES = {
    "lora_down": ("lora_down", "proj_down"),
    "lora_up": ("lora_up", "proj_up"),
    "smooth": ("smooth", "smooth_factor"),
    "smooth_orig": ("smooth_orig", "smooth_factor_orig"),
}
#: Every tensor role a quantized Nunchaku layer can have (canonical names).
LAYER_ROLES = frozenset(
    {"qweight", "wscales", "wzeros", "bias", "wtscale", "wcscales", *_ROLE_NAMES}
)

#: FLUX C++ module names inside ``transformer_blocks.{i}.`` → native names.
_FLUX_DOUBLE = {
    "qkv_proj": "attn.to_qkv",
    "qkv_proj_context": "attn.add_qkv_proj",
    "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj",
    "mlp_context_fc2": "ff_context.net.2",
    "norm_q": "attn.norm_q",
    "norm_k": "attn.norm_k",
    "norm_added_q": "attn.norm_added_q",
    "norm_added_k": "attn.norm_added_k",
}
#: ... and inside ``single_transformer_blocks.{i}.``.
_FLUX_SINGLE = {
    "qkv_proj": "attn.to_qkv",
    "out_proj": "attn.to_out",
    "mlp_fc1": "mlp_fc1",
    "mlp_fc2": "mlp_fc2",
    "norm_q": "attn.norm_q",
    "norm_k": "attn.norm_k",
}
_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$")

#: Fused native module → its diffusers members, in row order.
FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
}

#: Modules Nunchaku's model classes rebuild, by name suffix. Z-Image runs ``feed_forward``
#: (``w2(silu(w1 x) * w3 x)``) as a diffusers SwiGLU ``FeedForward``: ``net.0.proj`` rows are
#: [value = w3; gate = w1], ``net.2`` is ``w2``.
REBUILT_FUSED = {"feed_forward.net.0.proj": ("feed_forward.w3", "feed_forward.w1")}
REBUILT_PLAIN = {"feed_forward.net.2": "feed_forward.w2"}

#: AWQ modulation linears whose rows Nunchaku interleaves (``view(splits, N/splits).T``) and
#: whose "scale" chunks (1 and splits-2) carry a baked ``+1`` in the bias.
ADANORM_SPLITS = {
    "norm1.linear": 6,
    "norm1_context.linear": 6,
    "norm.linear": 3,
    "img_mod.1": 6,
    "txt_mod.1": 6,
}


def detect_dialect(keys: Iterable[str]) -> str:
    """Guess the dialect of a Nunchaku file from its tensor names.

    Raises:
        UnsupportedError: no quantized layer in a known dialect.
    """
    keys = list(keys)
    ends = {k.rsplit(".", 1)[-1] for k in keys}
    has_cpp_roles = bool(ends & {"lora_down", "smooth"})
    has_native_roles = bool(ends & {"proj_down", "smooth_factor"})
    if has_native_roles and not has_cpp_roles:
        return "native"
    if has_cpp_roles and not has_native_roles:
        cpp_modules = any(
            (m := _BLOCK.match(k)) and m.group(3).split(".")[0] in _FLUX_DOUBLE for k in keys
        )
        return "flux-cpp" if cpp_modules else "sdxl"
    raise UnsupportedError(
        "unknown Nunchaku dialect: no quantized layer with lora_down/smooth (C++ names) or "
        "proj_down/smooth_factor (native names) found"
        if not (has_cpp_roles or has_native_roles)
        else "unknown Nunchaku dialect: the file mixes C++ and native tensor names"
    )


def _split_role(key: str) -> tuple[str, str]:
    module, _, role = key.rpartition(".")
    return module, role


def to_native(key: str, dialect: str) -> str:
    """A Nunchaku tensor key → native module name + canonical role (``prefix.role``)."""
    if dialect not in DIALECTS:
        raise UnsupportedError(f"unknown Nunchaku dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    module, role = _split_role(key)
    idx = 1 if dialect == "native" else 0
    for canon, names in _ROLE_NAMES.items():
        if role == names[idx]:
            role = canon
            break
    if dialect == "flux-cpp":
        m = _BLOCK.match(module + ".")
        if m:
            table = _FLUX_SINGLE if m.group(1) == "single_transformer_blocks" else _FLUX_DOUBLE
            rest = m.group(3)
            for cpp in sorted(table, key=len, reverse=True):
                if rest == cpp + "." or rest.startswith(cpp + "."):
                    rest = table[cpp] + rest[len(cpp):]
                    break
            module = f"{m.group(1)}.{m.group(2)}.{rest}".rstrip(".")
    return f"{module}.{role}" if module else role


def from_native(key: str, dialect: str) -> str:
    """Inverse of :func:`to_native`: native module + canonical role → the dialect's key."""
    if dialect not in DIALECTS:
        raise UnsupportedError(f"unknown Nunchaku dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    module, role = _split_role(key)
    if role in _ROLE_NAMES:
        role = _ROLE_NAMES[role][1 if dialect == "native" else 0]
    if dialect == "flux-cpp":
        m = _BLOCK.match(module + ".")
        if m:
            table = _FLUX_SINGLE if m.group(1) == "single_transformer_blocks" else _FLUX_DOUBLE
            rest = m.group(3)
            for cpp, native in sorted(table.items(), key=lambda kv: len(kv[1]), reverse=True):
                if rest == native + "." or rest.startswith(native + "."):
                    rest = cpp + rest[len(native):]
                    break
            module = f"{m.group(1)}.{m.group(2)}.{rest}".rstrip(".")
    return f"{module}.{role}" if module else role


def unquantized_to_stock(extras: dict[str, torch.Tensor], model_has: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Dense (16-bit) tensors of rebuilt modules → the stock modules' tensors (rows split).

    E.g. Z-Image refiners left unquantized (``skip_refiners``):
    ``feed_forward.net.0.proj.weight`` → ``feed_forward.w3.weight`` + ``feed_forward.w1.weight``.
    ``model_has(name)`` tells whether the model has that module.
    """
    out = {}
    for key, t in extras.items():
        module, _, role = key.rpartition(".")
        done = False
        for suffix, members in list(REBUILT_FUSED.items()) + [(s, (m,)) for s, m in REBUILT_PLAIN.items()]:
            if (module == suffix or module.endswith("." + suffix)) and not model_has(module):
                base = module[: -len(suffix)]
                if all(model_has(base + m) for m in members):
                    for m, part in zip(members, t.chunk(len(members), dim=0)):
                        out[f"{base}{m}.{role}"] = part.contiguous()
                    done = True
                    break
        if not done:
            out[key] = t
    return out


def stock_to_unquantized(extras: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Inverse of :func:`unquantized_to_stock`; also says whether any module was rebuilt."""
    out, rebuilt = dict(extras), False
    for suffix, members in list(REBUILT_FUSED.items()) + [(s, (m,)) for s, m in REBUILT_PLAIN.items()]:
        for key in list(out):
            module, _, role = key.rpartition(".")
            if not (module == members[0] or module.endswith("." + members[0])):
                continue
            base = module[: -len(members[0])]
            keys = [f"{base}{m}.{role}" for m in members]
            if all(k in out for k in keys):
                out[f"{base}{suffix}.{role}"] = torch.cat([out.pop(k) for k in keys], dim=0)
                rebuilt = True
    return out, rebuilt


def adanorm_splits(module: str) -> int:
    """Row-interleave factor of an AWQ modulation layer (1: not a modulation layer)."""
    for suffix, splits in ADANORM_SPLITS.items():
        if module == suffix or module.endswith("." + suffix):
            return splits
    return 1
