"""Read LoRA files in the formats people publish and normalise them to one canonical form.

Sources: a ``.safetensors`` file, a directory (PEFT ``adapter_config.json`` +
``adapter_model.safetensors``, diffusers ``pytorch_lora_weights.safetensors``, or one
``.safetensors`` file), a Hub repo id, or an in-memory state dict. Pickles (``.bin``, ``.pt``,
``.ckpt``) are refused.

Formats (detected from the keys, normalised by diffusers' own code wherever it has a
converter): diffusers/PEFT (``lora_A``/``lora_B`` with ``lora_adapter_metadata`` or
``adapter_config.json``, or ``.alpha`` keys), kohya / sd-scripts and ComfyUI (``lora_unet_*``,
``diffusion_model.*``, ``.alpha``; LyCORIS LoCon is the same key scheme), "mixture"
(``lora_transformer_*``), XLabs (``*.processor.*``), BFL control LoRAs (``query_norm.scale``),
fal Kontext (PEFT-wrapped BFL names). DoRA, LoKr, LoHa, (IA)³ and Tucker LoCon are refused
with :class:`~svdq_format.errors.LoRAError` — never silently skipped.

The canonical result is a :class:`~svdq_format.lora.LoraAdapter`: diffusers module names →
``A [r, K]``, ``B [N, r]``, per-rank unit scale (``alpha/r``, ``alpha/√r`` for rsLoRA, 1 when
the format bakes alpha in).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from svdq_format import jsonsafe
from svdq_format.errors import LoRAError
from svdq_format.lora import LoraAdapter, LoraDelta
from svdq_format.outputs import inside_directory

from .patterns import ModulePattern, compile_patterns, first_match

__all__ = [
    "RawLora",
    "NormalizedLora",
    "read_lora",
    "mmap_safetensors",
    "detect_format",
    "normalize_lora",
    "PICKLE_SUFFIXES",
]

#: File suffixes refused because loading them would unpickle (execute) untrusted data.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_CONFIG = "adapter_config.json"
_DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"

# Key fragments of adapter types that are not plain low-rank factors.
_UNSUPPORTED = (
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("lokr_", "LyCORIS LoKr"),
    ("hada_", "LyCORIS LoHa"),
    ("lora_mid", "LyCORIS LoCon with a Tucker (lora_mid) factor"),
    ("ia3", "(IA)3"),
    (".oft_", "OFT"),
    (".boft_", "BOFT"),
)

# Keys that diffusers' Flux converters drop with only a log line; nonzero ones become
# "unmatched" in our report instead (never a silent skip).
_DIFFUSERS_DROPS = (".diff_b", ".diff", "t5xxl", "position_embedding", "text_projection")


@dataclass
class RawLora:
    """A LoRA state dict as read from its source.

    Attributes:
        state_dict: Tensor name → tensor, as stored.
        config: PEFT ``LoraConfig`` fields (from ``adapter_config.json`` or
            ``lora_adapter_metadata``), or ``None``.
        path: The file it came from (``"<dict>"`` for in-memory input).
        peft_dir: Whether it came from a PEFT adapter directory (keys ``base_model.model.*``).
    """

    state_dict: dict[str, torch.Tensor]
    config: Optional[dict[str, Any]]
    path: str
    peft_dir: bool = False


@dataclass
class NormalizedLora:
    """Result of :func:`normalize_lora`.

    Attributes:
        adapter: The canonical adapter.
        format: Detected format name.
        dropped: Source keys that cannot be represented (nonzero full diffs, T5 keys, ...).
        skipped: Keys for other pipeline components (text encoders), not for the transformer.
    """

    adapter: LoraAdapter
    format: str
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoRAError(f"{path}: pickled checkpoints are refused (they can execute code); convert it to .safetensors")


def mmap_safetensors(
    path: str, *, device: Optional[torch.device] = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read-only, zero-copy tensors of a safetensors file (memory-mapped) and its metadata.

    The header is fully checked first (:func:`svdq_format.io.read_header`: lengths, JSON,
    dtypes, offsets tiling the data, truncation). Tensors share the file's page cache; callers
    copy what they keep (concatenation does). With a CUDA ``device`` the whole file is read
    onto it instead (:func:`svdq_format.device_read.read_to_device`: threaded reads, pinned
    staging, one allocation), so everything downstream runs on the GPU.

    Raises:
        LoRAError: the container is broken or truncated.
    """
    import mmap
    import warnings

    from svdq_format.errors import FormatError
    from svdq_format.io import read_header

    try:
        header = read_header(path)
    except FormatError as exc:
        where = f"; {exc.key}" if exc.key else ""
        raise LoRAError(f"{path}: cannot read safetensors file ({exc.reason}{where})") from None
    if device is not None and torch.device(device).type == "cuda":
        from svdq_format.device_read import read_to_device

        try:
            return read_to_device(header, device), dict(header.metadata)
        except FormatError as exc:
            raise LoRAError(f"{path}: cannot read safetensors file ({exc.reason})") from None
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mapping is read-only; we never write through it
        for name, e in header.tensors.items():
            dtype = getattr(torch, e.dtype)
            numel = math.prod(e.shape)
            if numel == 0 or mm is None:
                out[name] = torch.empty(e.shape, dtype=dtype)
                continue
            t = torch.frombuffer(mm, dtype=torch.uint8, count=e.end - e.begin, offset=header.data_start + e.begin)
            out[name] = t.view(dtype).view(e.shape)
    return out, dict(header.metadata)


def _read_safetensors(
    path: str, device: Optional[torch.device] = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _refuse_pickle(path)
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: not a .safetensors file")
    sd, meta = mmap_safetensors(path, device=device)
    if not sd:
        raise LoRAError(f"{path}: the file holds no tensors")
    return sd, meta


def metadata_json_object(raw: str, path: str, key: str) -> dict[str, Any]:
    """The JSON object stored as safetensors metadata ``key`` of ``path``.

    Raises:
        LoRAError: ``<path>: <key>: not valid JSON`` / ``not a JSON object``.
    """
    try:
        obj = jsonsafe.loads(raw)
    except ValueError as exc:
        raise LoRAError(f"{path}: {key}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LoRAError(f"{path}: {key}: not a JSON object")
    return obj


def _peft_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``: a JSON object (duplicate keys, NaN and deep nesting refused).

    Raises:
        LoRAError: ``<path>: not valid JSON (<why>)`` / ``not a JSON object``.
    """
    try:
        obj = jsonsafe.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoRAError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LoRAError(f"{path}: not a JSON object")
    return obj


def _config_from_metadata(meta: Mapping[str, str], path: str) -> Optional[dict[str, Any]]:
    raw = meta.get(_METADATA_KEY)
    if not raw:
        return None
    cfg = metadata_json_object(raw, path, _METADATA_KEY)
    # pipeline-level files prefix fields per component ("transformer.r"); keep the transformer's
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg


def _pick_file(d: Path, weight_name: Optional[str]) -> Path:
    if weight_name:
        inside = inside_directory(d, weight_name)
        if inside is None:
            raise LoRAError(f"{d}: weight_name {weight_name!r} leaves the LoRA directory")
        p = inside
        if not p.is_file():
            raise LoRAError(f"{d}: no file {weight_name!r}")
        return p
    for name in (_PEFT_WEIGHTS, _DIFFUSERS_WEIGHTS):
        if (d / name).is_file():
            return d / name
    files = sorted(p for p in d.iterdir() if p.suffix == ".safetensors")
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        hint = f" (only pickles: {', '.join(pickles)}; refused)" if pickles else ""
        raise LoRAError(f"{d}: no .safetensors LoRA file{hint}")
    raise LoRAError(f"{d}: several .safetensors files ({', '.join(p.name for p in files)}); pass weight_name")


def _read_dir(d: Path, weight_name: Optional[str], device: Optional[torch.device] = None) -> RawLora:
    f = _pick_file(d, weight_name)
    sd, meta = _read_safetensors(str(f), device)
    cfg = _config_from_metadata(meta, str(f))
    peft = False
    if (d / _PEFT_CONFIG).is_file():
        cfg = _peft_config(d / _PEFT_CONFIG)
        peft = True
    return RawLora(sd, cfg, str(f), peft_dir=peft)


def read_lora(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    weight_name: Optional[str] = None,
    revision: Optional[str] = None,
    device: Optional[torch.device] = None,
) -> RawLora:
    """Read a LoRA from a file, a directory, a Hub repo id or a state dict.

    Args:
        source: ``.safetensors`` file, directory, ``owner/name`` Hub repo, or a dict.
        weight_name: File name inside a directory or repo when it holds several.
        revision: Hub revision.
        device: A CUDA device reads the file straight onto it (the model's device: planning
            and merging then run there); ``None`` memory-maps it on the CPU.

    Raises:
        LoRAError: missing/corrupt/truncated file, pickle, or no LoRA file found.
    """
    if isinstance(source, Mapping):
        sd = dict(source)
        if not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LoRAError("<dict>: every value must be a tensor")
        return RawLora(sd, None, "<dict>")
    path = os.fspath(source)
    p = Path(path)
    if p.is_file():
        sd, meta = _read_safetensors(path, device)
        cfg = _config_from_metadata(meta, path)
        cfg_file = p.parent / _PEFT_CONFIG
        peft = p.name == _PEFT_WEIGHTS and cfg_file.is_file()
        if peft:
            cfg = _peft_config(cfg_file)
        return RawLora(sd, cfg, path, peft_dir=peft)
    if p.is_dir():
        return _read_dir(p, weight_name, device)
    _refuse_pickle(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) and not path.endswith(".safetensors"):
        return _read_hub(path, weight_name=weight_name, revision=revision, device=device)
    raise LoRAError(f"{path}: no such file or directory")


def _read_hub(repo_id: str, *, weight_name: Optional[str], revision: Optional[str],
              device: Optional[torch.device] = None) -> RawLora:
    from huggingface_hub import snapshot_download

    if weight_name and inside_directory(".", weight_name) is None:
        raise LoRAError(f"{repo_id}: weight_name {weight_name!r} leaves the repository")
    patterns = [weight_name] if weight_name else ["*.safetensors"]
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns + [_PEFT_CONFIG])
    except Exception as exc:
        raise LoRAError(f"{repo_id}: cannot download from the Hub ({' '.join(str(exc).split())[:200]})") from None
    return _read_dir(Path(local), weight_name, device)


# --------------------------------------------------------------------------- detection


def _check_supported(sd: Mapping[str, torch.Tensor], path: str) -> None:
    for key in sd:
        for frag, kind in _UNSUPPORTED:
            if frag in key:
                raise LoRAError(f"{path}: {key}: unsupported adapter type {kind} (only plain low-rank LoRA/LoCon)")
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise LoRAError(f"{path}: {key}: not a tensor")
        if not (t.is_floating_point()):
            raise LoRAError(f"{path}: {key}: dtype {str(t.dtype).removeprefix('torch.')} is not a float type")


def detect_format(sd: Mapping[str, torch.Tensor], *, peft_dir: bool = False) -> str:
    """The format name of a LoRA state dict (same order of checks as diffusers' Flux loader)."""
    keys = list(sd)
    if peft_dir and not any(
        k.startswith("base_model.model.double_blocks") or k.startswith("base_model.model.single_blocks") for k in keys
    ):
        return "peft"
    if any(".lora_down.weight" in k for k in keys):
        if any(k.startswith("lora_transformer_") for k in keys):
            return "mixture"
        if any(k.startswith("diffusion_model.") for k in keys):
            return "comfyui"
        return "kohya"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any("base_model" in k for k in keys):
        return "fal-kontext"
    return "diffusers"


# --------------------------------------------------------------------------- normalisation


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _diffusers_normalise(sd: dict[str, torch.Tensor], path: str) -> tuple[dict, Optional[dict], list[str]]:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    cap = _Capture()
    log = logging.getLogger("diffusers.loaders")
    log.addHandler(cap)
    try:
        out, alphas = FluxLoraLoaderMixin.lora_state_dict(sd, return_alphas=True)
    except LoRAError:
        raise
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise LoRAError(f"{path}: diffusers cannot convert this LoRA ({type(exc).__name__}: {first})") from None
    finally:
        log.removeHandler(cap)
    leftovers = []
    for msg in cap.messages:
        if "Unsupported keys" in msg or "unsupported" in msg.lower():
            leftovers.extend(re.findall(r"'([^']+)'", msg) or [msg])
    return out, alphas, leftovers


def _strip_component(key: str) -> str:
    for prefix in ("transformer.", "unet."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


#: Largest ``|lora_alpha|`` accepted: the largest fp16 value (a bigger alpha makes a scale that
#: no 16-bit compute dtype holds; real adapters use alphas of a few hundred at most).
MAX_LORA_ALPHA = 65504.0


def _alpha_number(value: Any, path: str, key: str) -> float:
    """An alpha (or rank) from a file as a finite float within ±:data:`MAX_LORA_ALPHA`.

    Raises:
        LoRAError: ``<path>: <key>: ...`` — not a number, not finite, or out of range.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise LoRAError(f"{path}: {key}: must be one number, got a tensor of shape {list(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoRAError(f"{path}: {key}: must be a number, got {type(value).__name__} {str(value)[:40]!r}")
    x = float(value) if abs(value) < 1e300 else math.inf
    if not math.isfinite(x) or abs(x) > MAX_LORA_ALPHA:
        raise LoRAError(f"{path}: {key}: {str(value)[:40]} is not finite or beyond ±{MAX_LORA_ALPHA:g}")
    return x


def _unit_scale(module: str, rank: int, config: Optional[Mapping[str, Any]],
                alphas: Optional[Mapping[str, Any]], *, path: str,
                patterns: Sequence[tuple[ModulePattern, object]] = ()) -> float:
    """``alpha/r`` (``alpha/√r`` with rsLoRA); 1 when the format carries no alpha.

    ``patterns``: the config's compiled ``alpha_pattern`` (:func:`compile_patterns`). Every
    alpha is checked (:func:`_alpha_number`).
    """
    alpha: Any = None
    key = "lora_alpha"
    rslora = False
    if config:
        rslora = bool(config.get("use_rslora", False))
        alpha = first_match(patterns, module)
        key = f"alpha_pattern[{module}]"
        if alpha is None:
            alpha, key = config.get("lora_alpha"), "lora_alpha"
            if alpha is None:  # PEFT default lora_alpha=8 applies only with a real PEFT config
                alpha, key = config.get("r", rank), "r"
    elif alphas:
        a = alphas.get(f"{module}.alpha")
        key = f"{module}.alpha"
        if a is None:
            a = Counter(_alpha_number(v, path, k) for k, v in alphas.items()).most_common(1)[0][0]
        alpha = a
    if alpha is None:
        return 1.0
    x = _alpha_number(alpha, path, key)
    return x / math.sqrt(rank) if rslora else x / rank


def _fix_final_layer(fmt: str, source: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor],
                     path: str) -> dict[str, float]:
    """Correct two slips of diffusers' Flux converters (diffusers 0.42) on the final layer.

    * kohya/ComfyUI: the ``final_layer`` ``.alpha`` keys are consumed but never applied, so
      ``proj_out``/``norm_out.linear`` would get scale 1 instead of ``alpha/r``. Returns the
      missing per-target factors.
    * BFL control / fal Kontext: the ``[shift, scale] → [scale, shift]`` swap of
      ``final_layer.adaLN_modulation.1`` is applied to ``lora_A``'s *rank* rows as well as to
      ``lora_B``'s output rows, which changes ``B·A``; ``lora_A`` is put back as stored.
    """
    fixes: dict[str, float] = {}
    if fmt in ("kohya", "comfyui"):
        flat = {k.replace("diffusion_model.", "lora_unet_").replace(".", "_"): v for k, v in source.items()}
        for src, target in (("lora_unet_final_layer_linear", "proj_out"),
                            ("lora_unet_final_layer_adaLN_modulation_1", "norm_out.linear")):
            alpha, down = flat.get(f"{src}_alpha"), flat.get(f"{src}_lora_down_weight")
            if alpha is not None and down is not None and down.ndim == 2:
                fixes[target] = _alpha_number(alpha, path, f"{src}.alpha") / down.shape[0]
    elif fmt in ("bfl-control", "fal-kontext"):
        prefix = "base_model.model." if fmt == "fal-kontext" else ""
        a = source.get(f"{prefix}final_layer.adaLN_modulation.1.lora_A.weight")
        key = "transformer.norm_out.linear.lora_A.weight"
        if a is not None and key in out:
            out[key] = a
    return fixes


def normalize_lora(raw: RawLora, *, adapter_name: str) -> NormalizedLora:
    """Turn a :class:`RawLora` into the canonical :class:`~svdq_format.lora.LoraAdapter`.

    Raises:
        LoRAError: unsupported adapter type (DoRA/LoKr/LoHa/...), non-float or non-finite
            tensors, keys diffusers cannot convert, or A/B pairs that do not fit together.
    """
    path = raw.path
    sd = dict(raw.state_dict)
    _check_supported(sd, path)
    sd = {
        k: (v.to(torch.bfloat16) if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else v) for k, v in sd.items()
    }
    fmt = detect_format(sd, peft_dir=raw.peft_dir)
    config = dict(raw.config) if raw.config else None
    if config and config.get("use_dora"):
        raise LoRAError(f"{path}: unsupported adapter type DoRA (use_dora in its config)")
    if config and str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{path}: unsupported PEFT adapter type {config.get('peft_type')!r}")

    dropped: list[str] = []
    for k in list(sd):
        if k.endswith((".diff", ".diff_b")) or any(frag in k for frag in _DIFFUSERS_DROPS[2:]):
            t = sd.pop(k)
            if bool((t != 0).any()):
                dropped.append(k)
    alphas: Optional[dict] = None
    extra_scale: dict[str, float] = {}
    if fmt == "peft":
        sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    else:
        if not sd:
            raise LoRAError(f"{path}: no LoRA tensors left ({len(dropped)} unsupported keys: {', '.join(dropped[:3])})")
        source = sd
        sd, alphas, leftovers = _diffusers_normalise(dict(sd), path)
        dropped.extend(leftovers)
        extra_scale = _fix_final_layer(fmt, source, sd, path)
        if fmt in ("kohya", "comfyui", "mixture", "xlabs", "bfl-control", "fal-kontext"):
            alphas = None  # folded into the weights by diffusers' converters
            config = None
    skipped = sorted(k for k in sd if k.startswith(("text_encoder.", "text_encoder_2.")))
    # the denoiser's prefix: "transformer." (DiTs) or "unet." (SD / SDXL UNet LoRAs in diffusers' format)
    sd = {_strip_component(k): v for k, v in sd.items() if k not in skipped}
    if alphas:
        alphas = {_strip_component(k): v for k, v in alphas.items() if not k.startswith("text_encoder")}
    if sd and not any(".lora_A." in k or ".lora_B." in k for k in sd) and any("lora" in k for k in sd):
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        sd = convert_unet_state_dict_to_peft(sd)

    patterns = compile_patterns(config.get("alpha_pattern"), where=f"{path}: alpha_pattern") if config else []
    deltas: dict[str, LoraDelta] = {}
    params: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.(weight|bias)", k)
        if m:
            modules.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = v
        elif fmt == "bfl-control" and k.endswith(".weight") and ".norm" in k:
            params[k] = v
        else:
            dropped.append(k)
    for mod, parts in modules.items():
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a is None or b is None:
            raise LoRAError(
                f"{path}: {mod}: has {'lora_B' if a is None else 'lora_A'} "
                f"without {'lora_A' if a is None else 'lora_B'}"
            )
        if "lora_A.bias" in parts:
            raise LoRAError(f"{path}: {mod}.lora_A.bias: a bias on lora_A is not supported")
        if a.ndim != 2 or b.ndim != 2:
            raise LoRAError(
                f"{path}: {mod}: lora_A/lora_B must be 2-D linear factors, got {list(a.shape)} and {list(b.shape)} "
                "(conv LoRAs are not supported)"
            )
        if a.shape[0] != b.shape[1]:
            raise LoRAError(f"{path}: {mod}: rank mismatch: lora_A has rank {a.shape[0]}, lora_B has rank {b.shape[1]}")
        r = int(a.shape[0])
        if r == 0:
            raise LoRAError(f"{path}: {mod}: rank 0")
        scale = _unit_scale(mod, r, config, alphas, path=path, patterns=patterns) * extra_scale.get(mod, 1.0)
        deltas[mod] = LoraDelta(
            a, b, torch.full((r,), scale, dtype=torch.float32, device=a.device), parts.get("lora_B.bias")
        )
    adapter = LoraAdapter(name=adapter_name, deltas=deltas, params=params, source=path)
    return NormalizedLora(adapter, fmt, sorted(set(dropped)), skipped)
