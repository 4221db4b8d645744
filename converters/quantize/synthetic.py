"""Synthetic calibration inputs derived from a model's own forward signature and config.

No per-class recipe: every argument of ``model.forward`` is filled by what its *name* means in
diffusers' conventions (``hidden_states`` the noisy latent, ``encoder_hidden_states*`` text
embeddings, ``timestep``, ``pooled_projections``, ``img_ids`` / ``txt_ids`` positions,
``*_mask`` masks, ``img_shapes``, ``num_frames`` / ``height`` / ``width``, size conditions ...)
with the sizes the *config* gives (``in_channels``, ``joint_attention_dim`` /
``caption_channels`` / ``text_embed_dim`` ..., ``patch_size``, ``pooled_projection_dim``,
``guidance_embeds``, text-length limits).

The one thing a name does not say is the latent's layout: packed tokens ``[B, N, C]`` (FLUX,
LTX), an image ``[B, C, H, W]`` (SD3, PixArt, Lumina), a video ``[B, C, F, H, W]`` (Wan,
HunyuanVideo, Mochi), frames first ``[B, F, C, H, W]`` (CogVideoX), a channels-first sequence
``[B, C, N]`` (audio) or a list of per-sample latents (Z-Image, whose forward annotates a list).
It is found by trying them in that order on a forward that stops after the first repeated block
(before it, when that block is still on the meta device): the first layout the model accepts is
used; when none fits at the requested size, half and a quarter of it are tried (position tables
shorter than the request). Text masks are all ones; optional ones are left out only when the model fails with them.

Timesteps are drawn in ``[0, 1]`` when the model scales them itself (its forward multiplies by
1000, a ``t_scale``-like config entry, a ``Timesteps`` module with ``scale``), else in
``[0, 1000)``.

A required argument no rule knows, or a model no layout fits, raises
:class:`~svdq_format.errors.QuantizationError` with one line saying which and why.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from .stats import to_device

__all__ = ["InputPlan", "plan_inputs", "synthetic_samples"]

#: Names of the latent argument, in order of preference.
LATENT_NAMES = ("hidden_states", "sample", "x", "latents")
#: Layouts tried for the latent, in order.
LAYOUTS = ("tokens", "image", "video", "frames-first", "sequence", "list")
#: Config keys giving the latent's channels.
_CHANNEL_KEYS = ("in_channels", "in_dim", "io_channels", "latent_dim", "in_chans")
#: Config keys giving the text embedding width, in order of preference (the caption width
#: before any projection first, the attention width last).
_TEXT_KEYS = ("caption_channels", "joint_attention_dim", "text_embed_dim", "text_dim", "cap_feat_dim",
              "text_in_dim", "llm_features_dim", "context_in_dim", "text_hidden_dim", "dit_text_dim",
              "cond_token_dim", "text_encoder_dim", "cross_attention_dim", "hidden_size", "dim")
#: Config keys that fix the text length the model expects (a learned position table).
_TEXT_LEN_KEYS = ("max_text_seq_length", "text_len", "max_sequence_length")
#: Config keys of the pooled text embedding width.
_POOLED_KEYS = ("pooled_projection_dim", "text_emb_dim", "pooled_embed_dim", "global_cond_dim")
#: Config keys that bound the latent's side (in latent pixels / patches).
_SIDE_LIMIT_KEYS = ("pos_embed_max_size", "sample_width", "sample_height")
_FRAME_LIMIT_KEYS = ("sample_frames",)
#: Config keys that fix the number of latent frames (a learned temporal position table).
_FRAME_KEYS = ("video_length",)

_TEXT_NAME = re.compile(r"^(encoder_hidden_states(_t5|_llama\w*|_\d+)?|cap_feats|text_bth)$")
_IMAGE_COND_NAME = re.compile(r"^(image_embeds|encoder_hidden_states_image)$")
_MASK_NAME = re.compile(r"(^|_)(mask|masks)$|^encoder_mask$|_mask_\w+$|^text_embedding_mask\w*$")
_TIMESTEP_NAME = re.compile(r"^(timestep|timesteps|t|timestep_r|r_timestep)$")


class _Reached(Exception):
    """Raised by the probe's hook when the forward reaches the first repeated block."""


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """How the synthetic samples of a model are shaped.

    Attributes:
        latent: Name of the latent argument.
        layout: One of :data:`LAYOUTS`.
        frames: Latent frames (1 for images).
        height: Latent height (latent pixels, a multiple of the patch size).
        width: Latent width.
        text_tokens: Text tokens per sample.
        unit_timesteps: Timesteps in ``[0, 1]`` (the model scales them) instead of ``[0, 1000)``.
        masks: Optional text masks are passed (all ones) too, not only the required ones (some
            models need the optional ones; Latte's fail with one when frames > 1).
    """

    latent: str
    layout: str
    frames: int
    height: int
    width: int
    text_tokens: int
    unit_timesteps: bool
    masks: bool = True

    def describe(self) -> str:
        """One phrase, e.g. ``hidden_states as video [B, C, F, H, W] 2x16x16, 64 text tokens``."""
        shape = {"tokens": "[B, N, C]", "image": "[B, C, H, W]", "video": "[B, C, F, H, W]",
                 "frames-first": "[B, F, C, H, W]", "sequence": "[B, C, N]",
                 "list": "list of [C, F, H, W]"}[self.layout]
        return (f"{self.latent} as {self.layout} {shape} {self.frames}x{self.height}x{self.width}, "
                f"{self.text_tokens} text tokens")


def _config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    try:
        return dict(cfg)
    except (TypeError, ValueError):
        return {}


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return None


def _int(v: Any) -> int | None:
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _patch(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(temporal, spatial)`` patch size."""
    p = cfg.get("patch_size", cfg.get("all_patch_size"))
    pt = cfg.get("patch_size_t", cfg.get("all_f_patch_size"))
    if isinstance(p, (list, tuple)):
        if len(p) == 3:
            return int(p[0]), int(p[2])
        p = p[-1] if p else 1
    spatial = int(p) if isinstance(p, (int, float)) and p else 1
    temporal = _int(pt) or 1
    return temporal, spatial


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(type(model).forward)
    return {n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _unit_timesteps(model: nn.Module, cfg: Mapping[str, Any]) -> bool:
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        src = ""
    if re.search(r"\bt(imesteps?)?\b[^\n]*\*\s*1000\b", src):
        return True
    if any("scale" in k and isinstance(v, (int, float)) and v >= 100 for k, v in cfg.items()
           if k.startswith(("t_", "timestep"))):
        return True
    return any(type(m).__name__ == "Timesteps" and float(getattr(m, "scale", 1)) >= 100 for m in model.modules())


def _has_module(model: nn.Module, fragment: str) -> bool:
    return any(fragment in name for name, _ in model.named_modules())


def plan_inputs(model: nn.Module, *, image_tokens: int = 256, text_tokens: int = 64) -> InputPlan:
    """Find how to shape the synthetic inputs of ``model`` (see the module doc).

    Args:
        model: A diffusers denoiser (its weights may be on the meta device inside the blocks).
        image_tokens: Latent tokens per sample after patching (a square number for images).
        text_tokens: Text tokens per sample (a config text-length limit overrides it).

    Raises:
        QuantizationError: one line: no latent argument, a required argument without a rule, or
            no layout the model accepts (with the last error).
    """
    cls = type(model).__name__
    params = _forward_params(model)
    latent = next((n for n in LATENT_NAMES if n in params), None)
    if latent is None:
        raise QuantizationError(
            f"{cls}: cannot synthesize calibration inputs: its forward has no latent argument "
            f"({', '.join(LATENT_NAMES)}); capture real inputs (--calibration FILE or --prompts)")
    cfg = _config(model)
    cap = _int(_first(cfg, _TEXT_LEN_KEYS))
    txt = cap if cap else text_tokens
    unit = _unit_timesteps(model, cfg)
    pt, p = _patch(cfg)
    side = max(1, int(round(math.sqrt(image_tokens))))
    limit = _int(_first(cfg, _SIDE_LIMIT_KEYS))
    if limit:
        side = min(side, max(1, limit // p if cfg.get("pos_embed_max_size") is None else limit))
    frames = pt * 2
    flimit = _int(_first(cfg, _FRAME_LIMIT_KEYS))
    if flimit:
        frames = min(frames, max(1, flimit))
    frames = _int(_first(cfg, _FRAME_KEYS)) or frames
    tries: list[InputPlan] = []
    layouts = list(LAYOUTS)
    if "list" in str(params[latent].annotation).lower():  # ``x: list[torch.Tensor]`` (Z-Image)
        layouts.remove("list")
        layouts.insert(0, "list")
    # the requested size first; then smaller ones, for position tables shorter than the request
    for shrink in (1, 2, 4):
        sd, td = max(1, side // shrink), (txt if cap else max(1, txt // shrink))
        for masks in (True, False):
            for layout in layouts:
                f = 1 if layout in ("tokens", "image", "sequence") else frames
                s = sd * (1 if layout in ("tokens", "sequence") else p)
                tries.append(InputPlan(latent, layout, f, s, s, td, unit, masks))
    errors: list[str] = []
    for plan in tries:
        sample = build_sample(model, plan, torch.Generator().manual_seed(0))
        try:
            _probe(model, sample)
        except Exception as exc:
            if plan.masks and len(errors) < len(layouts):  # (the first size's errors tell why)
                errors.append(f"{plan.layout}: {_one_line(exc)}")
            continue
        return plan
    raise QuantizationError(
        f"{cls}: cannot synthesize calibration inputs: no latent layout fits its forward "
        f"({'; '.join(errors)[:300]}); capture real inputs (--calibration FILE or --prompts)")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}"


def _probe(model: nn.Module, sample: Mapping[str, Any]) -> None:
    """Run ``model(**sample)`` through its first repeated block (up to it when that block's weights
    are on the meta device, as with ``--offload disk``; the whole forward when it has no blocks)."""
    from .families import block_lists

    lists = block_lists(model)
    first = lists[0][1][0] if lists else None

    def stop(*_args: Any) -> None:
        raise _Reached

    handle = None
    if first is not None:
        if any(p.is_meta for p in first.parameters()):
            handle = first.register_forward_pre_hook(stop)
        else:
            handle = first.register_forward_hook(stop)
    device = _device(model)
    try:
        with torch.no_grad():
            model(**to_device(sample, device))
    except _Reached:
        pass
    finally:
        if handle is not None:
            handle.remove()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_sample(model: nn.Module, plan: InputPlan, gen: torch.Generator) -> dict[str, Any]:
    """One forward's keyword arguments for ``model`` shaped by ``plan`` (batch 1).

    Raises:
        QuantizationError: a required argument that no rule fills.
    """
    cls = type(model).__name__
    cfg = _config(model)
    params = _forward_params(model)
    dtype = _dtype(model)
    _, p = _patch(cfg)
    f, h, w, txt = plan.frames, plan.height, plan.width, plan.text_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def rand() -> float:
        return float(torch.rand(1, generator=gen))

    channels = _int(_first(cfg, _CHANNEL_KEYS))
    if channels is None:
        raise QuantizationError(f"{cls}: cannot synthesize calibration inputs: the config names no latent channels "
                                f"({', '.join(_CHANNEL_KEYS)})")
    gh, gw = (h, w) if plan.layout in ("tokens", "sequence") else (h // p, w // p)  # token grid
    tokens = f * gh * gw
    layout_shape: dict[str, tuple[int, ...]] = {
        "tokens": (1, tokens, channels), "image": (1, channels, h, w), "video": (1, channels, f, h, w),
        "frames-first": (1, f, channels, h, w), "sequence": (1, channels, tokens), "list": (channels, f, h, w)}
    out: dict[str, Any] = {}
    latent = randn(*layout_shape[plan.layout])
    out[plan.latent] = [latent] if plan.layout == "list" else latent

    text_dims = _text_dims(cfg)
    text_inputs = [n for n in params if _TEXT_NAME.match(n)]
    t = rand()
    rules: dict[str, Callable[[], Any]] = {}
    for i, name in enumerate(text_inputs):
        # a second text input only where the config gives its width (or the forward requires it)
        if i < len(text_dims) or (text_dims and params[name].default is inspect.Parameter.empty):
            rules[name] = _text_rule(name, text_dims[min(i, len(text_dims) - 1)], cfg, txt, plan, randn)
    for name in params:
        if name in rules or name == plan.latent:
            continue
        required = params[name].default is inspect.Parameter.empty
        rule = _rule(name, cfg, model, plan, tokens, (gh, gw), txt, t, randn, required)
        if rule is not None:
            rules[name] = rule
    for name, param in params.items():
        if name == plan.latent or name == "return_dict":
            continue
        required = param.default is inspect.Parameter.empty
        if _MASK_NAME.search(name) and not required and not plan.masks:
            continue  # an optional mask left out means "everything visible"
        rule = rules.get(name)
        if rule is not None:
            value = rule()
            if value is not _SKIP:
                out[name] = value
        elif required:
            raise QuantizationError(
                f"{cls}: cannot synthesize calibration inputs: no rule for its required forward argument "
                f"{name!r}; capture real inputs (--calibration FILE or --prompts)")
    return out


_SKIP = object()
#: Audio latent tokens of a synthetic audio-video sample.
_AUDIO_TOKENS = 8


def _text_dims(cfg: Mapping[str, Any]) -> list[int]:
    for k in _TEXT_KEYS:
        v = cfg.get(k)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            return [int(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool):
            dims = [v]
            for extra in ("text_embed_2_dim", "cross_attention_dim_t5"):  # a second text encoder
                if isinstance(cfg.get(extra), int):
                    dims.append(int(cfg[extra]))
            return dims
    return []


def _text_rule(name: str, dim: int, cfg: Mapping[str, Any], txt: int, plan: InputPlan,
               randn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
    def make() -> Any:
        n = txt
        if name.endswith("_t5") and isinstance(cfg.get("text_len_t5"), int):
            n = int(cfg["text_len_t5"])
        stacked = next((v for k, v in cfg.items() if k.endswith("_layers") and isinstance(v, (list, tuple))
                        and k.split("_")[0] in name), None)
        if stacked is not None:  # per-layer hidden states of an LLM encoder: [layers, B, T, D]
            return randn(len(stacked), 1, n, dim)
        if plan.layout == "list":
            return [randn(n, dim)]
        return randn(1, n, dim)
    return make


def _rule(name: str, cfg: Mapping[str, Any], model: nn.Module, plan: InputPlan, tokens: int,
          grid: tuple[int, int], txt: int, t: float, randn: Callable[..., torch.Tensor],
          required: bool) -> Callable[[], Any] | None:
    dtype = _dtype(model)
    f, gh, gw = plan.frames, grid[0], grid[1]
    if _TIMESTEP_NAME.match(name) and not (name in ("timestep_r", "r_timestep") and not required):
        value = t if plan.unit_timesteps else 1000.0 * t
        return lambda: torch.tensor([value], dtype=dtype)
    if name in ("pooled_projections", "pooled_embeds", "global_hidden_states", "pooled_text_embeds"):
        dim = _int(_first(cfg, _POOLED_KEYS))
        return None if dim is None else (lambda: randn(1, dim))
    if name == "guidance":
        wanted = cfg.get("guidance_embeds")
        if wanted is None:
            wanted = _has_module(model, "guidance")
        g = 1.0 + 4.0 * t
        return (lambda: torch.tensor([g], dtype=dtype)) if wanted else (lambda: _SKIP)
    if name in ("img_ids", "txt_ids"):
        axes = cfg.get("axes_dims_rope") or cfg.get("axes_dim") or (0, 0, 0)
        n_axes = len(axes) if isinstance(axes, (list, tuple)) else 3
        if name == "txt_ids":
            return lambda: torch.zeros(txt, n_axes, dtype=dtype)

        def img_ids() -> torch.Tensor:
            ids = torch.zeros(f, gh, gw, n_axes)
            ids[..., 0] = torch.arange(f).view(f, 1, 1) if f > 1 else 0
            ids[..., 1] = torch.arange(gh).view(1, gh, 1)
            ids[..., 2] = torch.arange(gw).view(1, 1, gw)
            return ids.reshape(-1, n_axes).to(dtype)
        return img_ids
    if _MASK_NAME.search(name):
        if name in ("attention_mask", "hidden_states_masks", "image_noise_mask"):
            return None  # masks over the latent tokens: the default (none) means "all visible"
        n = int(cfg["text_len_t5"]) if name.endswith("_t5") and isinstance(cfg.get("text_len_t5"), int) else txt
        return lambda: torch.ones(1, n, dtype=torch.bool)
    if _IMAGE_COND_NAME.match(name):  # image conditioning (I2V): only when the config has its width
        dim = _int(_first(cfg, ("image_embed_dim", "image_dim", "image_proj_dim")))
        n = _int(cfg.get("pos_embed_seq_len")) or 4
        return None if dim is None else (lambda: randn(1, n, dim))
    if name == "control_hidden_states":  # VACE / control latents: the latent's layout and grid
        ch = _int(_first(cfg, ("vace_in_channels", "control_in_channels")))
        if ch is None:
            return None
        shape = {"video": (1, ch, f, plan.height, plan.width), "image": (1, ch, plan.height, plan.width),
                 "frames-first": (1, f, ch, plan.height, plan.width), "tokens": (1, tokens, ch)}.get(plan.layout)
        return None if shape is None else (lambda: randn(*shape))
    if name == "audio_hidden_states":  # audio-video models: audio latent tokens
        ch = _int(cfg.get("audio_in_channels"))
        return None if ch is None else (lambda: randn(1, _AUDIO_TOKENS, ch))
    if name == "audio_encoder_hidden_states":
        dim = _int(_first(cfg, ("audio_caption_channels", "caption_channels")))
        return None if dim is None else (lambda: randn(1, txt, dim))
    if name == "audio_num_frames":
        return lambda: _AUDIO_TOKENS
    if name == "img_shapes":
        return lambda: [[(f, gh, gw)]]
    if name == "num_frames":
        return lambda: f
    if name == "height":
        return lambda: gh
    if name == "width":
        return lambda: gw
    if name in ("original_size", "target_size"):
        return lambda: torch.tensor([[gh * 8.0 * _patch(cfg)[1], gw * 8.0 * _patch(cfg)[1]]], dtype=dtype)
    if name == "crop_coords":
        return lambda: torch.zeros(1, 2, dtype=dtype)
    if name == "text_lens":
        return lambda: torch.tensor([txt])
    if name == "image_meta_size":
        return lambda: torch.tensor([[gh * 8.0, gw * 8.0, gh * 8.0, gw * 8.0, 0.0, 0.0]], dtype=dtype)
    if name == "style":
        return lambda: torch.zeros(1, dtype=torch.long)
    if name == "class_labels":
        classes = _int(_first(cfg, ("num_embeds_ada_norm", "num_class_embeds", "num_classes")))
        if classes is None:
            return None
        label = int(t * classes) % classes
        return lambda: torch.tensor([label])
    if name == "added_cond_kwargs":
        return lambda: _added_cond(cfg, randn, dtype, gh, gw)
    return None


def _added_cond(cfg: Mapping[str, Any], randn: Callable[..., torch.Tensor], dtype: torch.dtype,
                gh: int, gw: int) -> Any:
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + (sizes, crop) ids
        total = _int(cfg.get("projection_class_embeddings_input_dim")) or 0
        per = _int(cfg.get("addition_time_embed_dim")) or 0
        size = float(gh * 8)
        return {"text_embeds": randn(1, total - 6 * per),
                "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]], dtype=dtype)}
    if cfg.get("use_additional_conditions"):  # PixArt-α: resolution and aspect ratio
        return {"resolution": torch.tensor([[gh * 8.0, gw * 8.0]], dtype=dtype),
                "aspect_ratio": torch.tensor([[1.0]], dtype=dtype)}
    return {"resolution": None, "aspect_ratio": None}


def synthetic_samples(model: nn.Module, num_samples: int, *, seed: int = 0, image_tokens: int = 256,
                      text_tokens: int = 64) -> tuple[InputPlan, list[dict[str, Any]]]:
    """``num_samples`` random forward inputs for ``model`` and the plan that shaped them."""
    plan = plan_inputs(model, image_tokens=image_tokens, text_tokens=text_tokens)
    gen = torch.Generator().manual_seed(seed)
    return plan, [build_sample(model, plan, gen) for _ in range(num_samples)]
