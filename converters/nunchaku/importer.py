"""Import a Nunchaku single-file SVDQuant checkpoint into an SVDQuant model directory.

Flow (docs/interop.md has the tables):

1. read the file and its header (``config`` = the diffusers config, ``quantization_config``);
2. bring every key to native module names and canonical roles (:mod:`converters.nunchaku.names`);
3. undo the kernel tiling of each quantized layer and cut the 128-padding
   (:mod:`converters.nunchaku.layout`), sizes taken from the diffusers model built on the meta
   device from the config;
4. map to diffusers modules: fused q|k|v split into ``to_q``/``to_k``/``to_v`` (shared
   ``smooth`` and ``lora_down``, rows of the rest), FLUX single-block ``out_proj`` + ``mlp_fc2``
   concatenated along K into one ``proj_out`` (a format-2 layer with ``k_segments`` when the two
   halves' activation handling or nvfp4 tensor scales differ: int4 files always, whose MLP half
   runs on GELU-shifted unsigned activations);
5. un-bake: nvfp4 ``wtscale · wcscales`` → our fp32 ``wtscale`` per member; the fc2 GELU shift
   with unsigned codes → ``act_shift``/``act_unsigned`` (the stored bias already holds the
   correction, so it is kept); AWQ modulation rows de-interleaved and the baked ``+1`` removed
   from the scale chunks' bias; AWQ zero points → signed codes (plus an exact low-rank
   correction when the zero is not an integer multiple of the scale);
6. write ``config.json`` (with ``quantization_config``) and
   ``diffusion_pytorch_model.safetensors``, then validate the directory.

Errors about a tensor of the Nunchaku file name it as the file writes it (``…qkv_proj.qweight``),
not by its converted name.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format import jsonsafe, packing
from svdq_format.checkpoint import check_config, validate
from svdq_format.commit import DirectoryWrite
from svdq_format.errors import FormatError, SVDQError, UnsupportedError
from svdq_format.io import atomic_write, producer_info, read_header, refuse_pickle, save_file
from svdq_format.linear import SVDQLinear
from svdq_format.model import CONFIG_NAME, FILES_KEY, WEIGHTS_NAME, is_weight_file, write_record
from svdq_format.outputs import check_output
from svdq_format.spec import FormatMetadata, KSegment

from . import layout as L
from .awq import awq_to_ours
from .common import (
    EXACT_BIAS_KEY,
    GELU_SHIFT,
    build_skeleton,
    find_linear,
    is_gelu_fc2,
    lora_down,
    lora_up,
    new_layer,
    tensor_scale,
)
from .names import (
    FUSED,
    LAYER_ROLES,
    REBUILT_FUSED,
    REBUILT_PLAIN,
    adanorm_splits,
    detect_dialect,
    to_native,
    unquantized_to_stock,
)

__all__ = ["import_nunchaku", "read_nunchaku", "NunchakuFile"]



@dataclasses.dataclass
class NunchakuFile:
    """A Nunchaku checkpoint read into memory.

    Attributes:
        path: The file.
        tensors: Every tensor, under native module names and canonical roles.
        metadata: The safetensors header strings.
        config: The diffusers model config (``metadata["config"]``).
        dialect: ``flux-cpp``, ``sdxl`` or ``native``.
        file_keys: Native key → the key as written in the file (for messages).
    """

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any]
    dialect: str
    file_keys: dict[str, str] = dataclasses.field(default_factory=dict)

    def file_key(self, key: str) -> str:
        """``key`` (native module name + canonical role) as the file writes it."""
        if key in self.file_keys:
            return self.file_keys[key]
        prefix, _, role = key.rpartition(".")  # a role the file lacks: the layer's prefix as written
        known = self.file_keys.get(f"{prefix}.qweight")
        return f"{known.rpartition('.')[0]}.{role}" if known else key

    def file_prefix(self, prefix: str) -> str:
        """A layer's native prefix as the file writes it."""
        return self.file_key(f"{prefix}.qweight").rpartition(".")[0]


def _resolve(source: str | os.PathLike[str]) -> str:
    """A local file, or ``org/repo/[sub/]file.safetensors`` fetched with huggingface_hub."""
    p = os.fspath(source)
    if os.path.exists(p):
        return p
    parts = p.split("/")
    if len(parts) >= 3 and p.endswith(".safetensors"):
        from huggingface_hub import hf_hub_download

        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    raise FileNotFoundError(2, "No such file (nor an org/repo/file.safetensors Hub path)", p)


def read_nunchaku(
    source: str | os.PathLike[str], *, dialect: str | None = None, config: Mapping[str, Any] | None = None
) -> NunchakuFile:
    """Read a Nunchaku single file (local path or ``org/repo/file.safetensors``).

    Raises:
        FormatError: not a safetensors file, or no diffusers config in the header (pass
            ``config=`` for files without one).
        UnsupportedError: unknown dialect.
    """
    from safetensors import safe_open

    path = _resolve(source)
    refuse_pickle(path)  # a .bin/.pt checkpoint: refused with an explanation, never unpickled
    header = read_header(path)  # our header checks before safetensors maps the file
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            raw = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise FormatError(path, None, f"not a readable safetensors file ({exc})") from None
    if config is None:
        if "config" not in metadata:
            raise FormatError(path, "config", "no diffusers config in the header (pass config=)")
        try:
            config = jsonsafe.loads(metadata["config"])
        except ValueError as exc:
            raise FormatError(path, "config", f"not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise FormatError(path, "config", "not a JSON object")
        check_config(config, {k: e.shape for k, e in header.tensors.items()}, file=f"{path}: config")
    dialect = dialect or detect_dialect(raw)
    file_keys = {to_native(k, dialect): k for k in raw}
    tensors = {native: raw[k] for native, k in file_keys.items()}
    return NunchakuFile(path, tensors, metadata, dict(config), dialect, file_keys)


# --------------------------------------------------------------------------- helpers


def _trim_rank(down: torch.Tensor | None, up: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Drop rank columns that contribute nothing (zero padding, other members' blocks)."""
    if down is None or up is None:
        return None, None
    keep = (down != 0).any(dim=1) & (up != 0).any(dim=0)
    return down[keep].contiguous(), up[:, keep].contiguous()


@dataclasses.dataclass
class _Layer:
    """One W4A4 layer un-tiled (canonical order, real sizes)."""

    precision: str
    qweight: torch.Tensor  # our packed codes, uint8 [N, K/2]
    wscales: torch.Tensor  # [N, G]
    alpha: float | None
    wcscales: torch.Tensor | None  # [N] or None
    smooth: torch.Tensor
    smooth_orig: torch.Tensor | None
    down: torch.Tensor | None  # [r, K]
    up: torch.Tensor | None  # [N, r]
    bias: torch.Tensor | None


def _untile(nf: NunchakuFile, name: str, t: Mapping[str, torch.Tensor], n: int, k: int) -> _Layer:
    """Layer ``name`` (native prefix) un-tiled; errors name its tensors as the file writes them."""
    file = nf.path

    def bad(reason: str) -> FormatError:
        return FormatError(file, nf.file_key(f"{name}.qweight"), reason)

    q = t["qweight"]
    if q.dtype not in (torch.int8, torch.uint8) or q.ndim != 2:
        raise bad(f"expected int8 [N, K/2], got {q.dtype} {list(q.shape)}")
    n_pad, k_pad = q.shape[0], 2 * q.shape[1]
    if (n_pad, k_pad) != (L.round_up(n, L.TILE_N), L.round_up(k, L.TILE_K)):
        raise bad(f"packed shape {list(q.shape)} is not the {n}x{k} layer of the model padded to 128")
    for role in ("wscales", "smooth"):
        if role not in t:
            raise FormatError(file, nf.file_key(f"{name}.{role}"), "missing")
    ws = t["wscales"]
    precision = "nvfp4" if ws.dtype == torch.float8_e4m3fn else "int4"
    g = packing.GROUP_SIZES[precision]
    try:
        qweight = L.qweight_to_rowmajor(q)[:n, : k // 2]
        if precision == "nvfp4":
            wscales = L.unpack_micro_scales(ws)[:n, : k // g]
        else:
            wscales = L.unpack_scales(ws)[:n, : k // g]
        smooth = L.unpack_vector(t["smooth"])[:k]
        smooth_orig = L.unpack_vector(t["smooth_orig"])[:k] if "smooth_orig" in t else None
        bias = L.unpack_vector(t["bias"])[:n] if "bias" in t else None
        wc = L.unpack_vector(t["wcscales"])[:n] if "wcscales" in t and t["wcscales"].numel() else None
        down = up = None
        if "lora_down" in t and t["lora_down"].shape[-1] > 0:
            down = L.unpack_lora_down(t["lora_down"])[:, :k]
            up = L.unpack_lora_up(t["lora_up"])[:n]
    except (ValueError, RuntimeError, KeyError) as exc:
        raise bad(f"tensor shapes do not fit the Nunchaku tiling ({exc})") from None
    alpha = float(t["wtscale"].float().reshape(-1)[0]) if "wtscale" in t else None
    return _Layer(precision, qweight, wscales.contiguous(), alpha, wc, smooth, smooth_orig, down, up, bias)


def _member_tscale(lay: _Layer, rows: slice, where: str) -> float | None:
    """Our fp32 ``wtscale`` of rows ``rows``: Nunchaku's ``alpha`` × the (constant) wcscales.
    ``where``: ``"<file>: layer <name as in the file>"``."""
    wc = lay.wcscales
    if lay.precision == "int4":
        if wc is not None and not bool((wc.float() == 1).all()):
            raise UnsupportedError(f"{where}: int4 with per-channel wcscales != 1 cannot be expressed")
        if lay.alpha not in (None, 1.0):
            raise UnsupportedError(f"{where}: int4 with wtscale {lay.alpha} cannot be expressed")
        return None
    alpha = torch.tensor(lay.alpha if lay.alpha is not None else 1.0, dtype=torch.float32)
    if wc is None:
        return float(alpha)
    part = wc[rows].float()
    if not bool((part == part[0]).all()):
        raise UnsupportedError(
            f"{where}: wcscales vary within one output group; our nvfp4 layers have "
            "one tensor scale per layer"
        )
    return float(alpha * part[0])


# --------------------------------------------------------------------------- main


def _rebuilt(model: nn.Module, name: str, file: str) -> tuple[str, Any] | None:
    """A module Nunchaku's model class rebuilt (Z-Image SwiGLU) → its stock members, if present."""
    for suffix, members in REBUILT_FUSED.items():
        if name == suffix or name.endswith("." + suffix):
            base = name[: -len(suffix)]
            if all(find_linear(model, base + m) is not None for m in members):
                return ("fused", [base + m for m in members])
    for suffix, member in REBUILT_PLAIN.items():
        if name == suffix or name.endswith("." + suffix):
            if find_linear(model, name[: -len(suffix)] + member) is not None:
                return ("plain", name[: -len(suffix)] + member)
    return None


def _plan_targets(model: nn.Module, names: list[str], nf: NunchakuFile) -> dict[str, tuple[str, Any]]:
    """Native layer name → (how, detail) where how ∈ plain | fused | kconcat_attn | kconcat_mlp."""
    plan: dict[str, tuple[str, Any]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        pre = parent + "." if parent else ""
        file = f"{nf.path}: layer {nf.file_prefix(name)}"  # messages name the layer as the file writes it
        rebuilt = _rebuilt(model, name, nf.path)
        if find_linear(model, name) is not None:
            plan[name] = ("plain", name)
        elif rebuilt is not None:
            plan[name] = rebuilt
        elif leaf in FUSED and all(find_linear(model, pre + m) is not None for m in FUSED[leaf]):
            plan[name] = ("fused", [pre + m for m in FUSED[leaf]])
        elif name.startswith("single_transformer_blocks.") and leaf in ("mlp_fc1",):
            block = name.rsplit(".", 1)[0]
            if find_linear(model, block + ".proj_mlp") is None:
                raise UnsupportedError(f"{file}: model has no {block}.proj_mlp")
            plan[name] = ("plain", block + ".proj_mlp")
        elif name.startswith("single_transformer_blocks.") and (name.endswith(".attn.to_out") or leaf == "mlp_fc2"):
            block = name.split(".attn.to_out")[0] if name.endswith(".attn.to_out") else parent
            if find_linear(model, block + ".proj_out") is None:
                raise UnsupportedError(f"{file}: model has no {block}.proj_out")
            plan[name] = ("kconcat_attn" if name.endswith(".attn.to_out") else "kconcat_mlp", block + ".proj_out")
        else:
            raise UnsupportedError(f"{file}: no matching module in {type(model).__name__} (unknown layer name)")
    return plan


def import_nunchaku(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dialect: str | None = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Nunchaku single-file checkpoint into an SVDQuant model directory.

    Args:
        source: A local ``.safetensors`` file or a Hub path ``org/repo/file.safetensors``.
        out_dir: Directory to write (``config.json`` + ``diffusion_pytorch_model.safetensors``).
        dialect: ``"flux-cpp"``, ``"sdxl"`` or ``"native"``; detected when omitted.
        config: The diffusers model config, for files whose header has none.
        overwrite: Replace the model of a non-empty ``out_dir`` (else refused,
            :func:`svdq_format.outputs.check_output`).

    Returns:
        The output directory (validated).

    Raises:
        FormatError: a malformed or incomplete file (names the key).
        UnsupportedError: something the format cannot express (names the layer).
        OutputError: ``out_dir`` is or overlaps ``source``, is a file, or is a non-empty
            directory without ``overwrite``.
    """
    check_output(out_dir, [source], directory=True, overwrite=overwrite)
    nf = read_nunchaku(source, dialect=dialect, config=config)
    file = nf.path
    model = build_skeleton(nf.config, file=file)
    prefixes = sorted(k[: -len(".qweight")] for k in nf.tensors if k.endswith(".qweight"))
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in nf.tensors.items():
        prefix, _, role = key.rpartition(".")
        if prefix in groups and role in LAYER_ROLES:
            groups[prefix][role] = tensor
        else:
            extras[key] = tensor
    exact_bias = _read_exact_biases(nf.metadata, file)
    plan = _plan_targets(model, prefixes, nf)

    layers: dict[str, SVDQLinear] = {}
    record: dict[str, Any] = {"dialect": nf.dialect, "smooth_fused": [], "adanorm": {}, "k_segmented": {}}
    kparts: dict[str, dict[str, tuple[str, SVDQLinear]]] = {}
    for name in prefixes:
        how, target = plan[name]
        t = groups[name]
        where = f"{file}: layer {nf.file_prefix(name)}"  # the layer as the file writes it
        if t["qweight"].dtype == torch.int32:  # AWQ W4A16
            if how != "plain":
                raise UnsupportedError(f"{where}: AWQ layer maps to a {how} target")
            mod = _linear(model, target)
            layers[target] = awq_to_ours(name, t, mod.out_features, mod.in_features, exact_bias.get(name), file)
            if adanorm_splits(name) > 1:
                record["adanorm"][target] = adanorm_splits(name)
            continue
        if how == "fused":
            mods = [_linear(model, m) for m in target]
            n, k = sum(m.out_features for m in mods), mods[0].in_features
        elif how.startswith("kconcat"):
            proj_out = _linear(model, target)
            block = target.rsplit(".", 1)[0]
            k_mlp = _linear(model, block + ".proj_mlp").out_features
            n = proj_out.out_features
            k = k_mlp if how == "kconcat_mlp" else proj_out.in_features - k_mlp
        else:
            mod = _linear(model, target)
            n, k = mod.out_features, mod.in_features
        lay = _untile(nf, name, t, n, k)
        dtype = lay.smooth.dtype
        if lay.smooth_orig is not None and not torch.equal(lay.smooth_orig, lay.smooth):
            record["smooth_fused"].append(name)
        shifted = lay.precision == "int4" and (how == "kconcat_mlp" or (how == "plain" and is_gelu_fc2(model, target)))
        members = target if how == "fused" else [target]
        sizes = [_linear(model, m).out_features for m in members] if how == "fused" else [n]
        offset = 0
        for member, size in zip(members, sizes):
            rows = slice(offset, offset + size)
            offset += size
            down, up = _trim_rank(lay.down, None if lay.up is None else lay.up[rows])
            bias = None if lay.bias is None else lay.bias[rows]
            if how.startswith("kconcat"):
                bias = lay.bias  # resolved when both halves are known
            elif _linear(model, member).bias is None:
                if bias is not None and bool((bias != 0).any()):
                    raise UnsupportedError(f"{where}: non-zero bias for {member}, which has none")
                bias = None
            elif bias is None:
                bias = torch.zeros(size, dtype=dtype)
            tscale = _member_tscale(lay, rows, where)
            try:
                new = new_layer(
                    precision=lay.precision, kind="w4a4", qweight=lay.qweight[rows], wscales=lay.wscales[rows],
                    wtscale=tscale, smooth=lay.smooth, down=down, up=up, bias=bias, dtype=dtype,
                    act_shift=GELU_SHIFT if shifted else 0.0, act_unsigned=shifted,
                )
            except (SVDQError, RuntimeError) as exc:  # dtypes/shapes our format does not allow
                raise UnsupportedError(f"{where}: {exc}") from None
            if how.startswith("kconcat"):
                kparts.setdefault(target, {})[how] = (name, new)
            else:
                layers[member] = new
    for target, parts in kparts.items():
        if set(parts) != {"kconcat_attn", "kconcat_mlp"}:
            (name_x, _), = parts.values()
            raise FormatError(file, nf.file_key(f"{name_x}.qweight"),
                              f"only one half of the FLUX single-block {target} is quantized in the file")
        (name_a, a), (name_b, b) = parts["kconcat_attn"], parts["kconcat_mlp"]
        where = f"{file}: layers {nf.file_prefix(name_a)} + {nf.file_prefix(name_b)}"
        layers[target] = _merge_k(a, b, has_bias=_linear(model, target).bias is not None, where=where)
        if layers[target].k_segments:
            record["k_segmented"][target] = [nf.file_prefix(name_a), nf.file_prefix(name_b)]

    extras = unquantized_to_stock(extras, lambda m: find_linear(model, m) is not None)
    expected = _expected_extras(model, layers, record)
    _check_extras(extras, expected, file)
    extra_meta = {
        "source": {
            "format": "nunchaku",
            "file": os.path.basename(file),
            "dialect": nf.dialect,
            "model_class": nf.metadata.get("model_class"),
            "quantization_config": _loads_or_none(nf.metadata.get("quantization_config")),
        },
        "nunchaku": {k: v for k, v in record.items() if v},
    }
    out = Path(out_dir)
    with DirectoryWrite(out) as w:  # one unit: staged, config.json committed last, old weights removed
        save_file(layers, w.path(WEIGHTS_NAME), metadata=extra_meta,
                  extra_tensors={k: extras[k] for k in sorted(extras)}, seal=True)
        meta = FormatMetadata(layers={k: v.spec for k, v in layers.items()}, producer=producer_info(),
                              extra=extra_meta)
        cfg = {k: v for k, v in nf.config.items() if k != "quantization_config"}
        cfg["quantization_config"] = {**meta.to_json(), FILES_KEY: write_record(w, [WEIGHTS_NAME])}
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        atomic_write(w.path(CONFIG_NAME), lambda tmp: Path(tmp).write_text(text))
        w.commit([WEIGHTS_NAME], config=CONFIG_NAME, stale=is_weight_file)
    validate(out)
    return out


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """:func:`find_linear` for a module the import relies on (found by :func:`_plan_targets`)."""
    mod = find_linear(model, name)
    assert mod is not None, name
    return mod


def _merge_k(a: SVDQLinear, b: SVDQLinear, *, has_bias: bool, where: str) -> SVDQLinear:
    """Concatenate two layers along K into one exact layer: ``y = A x_a + B x_b``.

    A plain layer when both halves have the same activation handling (and nvfp4 tensor scale);
    else a format-2 layer with ``k_segments`` (one segment per half, each with its own shift,
    unsigned codes and tensor scale).
    """
    if (a.precision, a.dtype, a.wscales.dtype) != (b.precision, b.dtype, b.wscales.dtype):
        raise UnsupportedError(
            f"{where}: the two halves of proj_out differ in precision or dtypes "
            f"({a.precision}/{a.dtype}/{a.wscales.dtype} vs {b.precision}/{b.dtype}/{b.wscales.dtype})"
        )
    n, ka, kb = a.out_features, a.in_features, b.in_features
    same = (a.act_shift, a.act_unsigned) == (b.act_shift, b.act_unsigned) and (
        a.precision != "nvfp4" or torch.equal(tensor_scale(a), tensor_scale(b))
    )
    segments = () if same else (KSegment(ka, a.act_shift, a.act_unsigned), KSegment(kb, b.act_shift, b.act_unsigned))
    down: torch.Tensor | None
    up: torch.Tensor | None
    if a.rank and b.rank and a.rank == b.rank and torch.equal(lora_up(a), lora_up(b)):
        down = torch.cat([lora_down(a), lora_down(b)], dim=1)
        up = lora_up(a)
    elif a.rank or b.rank:
        ra, rb = a.rank, b.rank
        down = torch.zeros(ra + rb, ka + kb, dtype=a.dtype)
        if ra:
            down[:ra, :ka] = lora_down(a)
        if rb:
            down[ra:, ka:] = lora_down(b)
        ups = [lora_up(x) for x in (a, b) if x.rank]
        up = torch.cat(ups, dim=1)
    else:
        down = up = None
    bias = None
    if has_bias:
        zero = torch.zeros(n, dtype=a.dtype)
        ba = zero if a.bias is None else a.bias
        bb = zero if b.bias is None else b.bias
        bias = (ba.float() + bb.float()).to(a.dtype)
        if not torch.equal(bias.float(), ba.float() + bb.float()):
            raise UnsupportedError(f"{where}: both halves of proj_out have biases whose sum rounds in {a.dtype}")
    elif any(x.bias is not None and bool((x.bias != 0).any()) for x in (a, b)):
        raise UnsupportedError(f"{where}: proj_out has no bias in the model, but the file's halves do")
    qweight = torch.cat([a.qweight, b.qweight], dim=1)  # K_a is even: bytes never straddle
    wtscale: float | list[float] | None = None
    if a.precision == "nvfp4":
        wtscale = [float(tensor_scale(a)), float(tensor_scale(b))] if segments else float(tensor_scale(a))
    return new_layer(
        precision=a.precision, kind=a.kind, qweight=qweight, wscales=torch.cat([a.wscales, b.wscales], dim=1),
        wtscale=wtscale, smooth=torch.cat([a.smooth, b.smooth]), down=down, up=up, bias=bias, dtype=a.dtype,
        act_shift=0.0 if segments else a.act_shift, act_unsigned=False if segments else a.act_unsigned,
        k_segments=segments,
    )


def _expected_extras(
    model: nn.Module, layers: Mapping[str, SVDQLinear], record: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    owned = set(layers)
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] not in owned
    }


def _check_extras(extras: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], file: str) -> None:
    missing = sorted(set(expected) - set(extras))
    unexpected = sorted(set(extras) - set(expected))
    if missing:
        raise FormatError(file, missing[0], f"missing from the Nunchaku file ({len(missing)} model tensors missing)")
    if unexpected:
        raise FormatError(file, unexpected[0], f"not a tensor of the model ({len(unexpected)} unexpected)")
    for k, t in extras.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise FormatError(file, k, f"shape {list(t.shape)}, model expects {list(expected[k].shape)}")


def _read_exact_biases(metadata: Mapping[str, str], file: str) -> dict[str, torch.Tensor]:
    text = metadata.get(EXACT_BIAS_KEY)
    if not text:
        return {}
    try:
        obj = jsonsafe.loads(text)
        out = {}
        for name, entry in obj.items():
            raw = bytearray(base64.b64decode(entry["data"]))
            out[name] = torch.frombuffer(raw, dtype=getattr(torch, entry["dtype"])).clone()
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(file, EXACT_BIAS_KEY, f"malformed ({exc})") from None


def _loads_or_none(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return jsonsafe.loads(text)
    except ValueError:
        return text
