"""Calibration: model inputs in, bounded per-layer activation statistics out.

Inputs (:class:`CalibrationSet`, a list of keyword-argument dicts for ``model(**sample)``):

* a safetensors file of captured transformer inputs (:func:`load_calibration`, written by
  :func:`save_calibration` or :func:`capture_inputs`);
* a diffusers pipeline + prompts (:func:`capture_pipeline_inputs`: transformer inputs captured
  across the denoising steps);
* synthetic inputs shaped from the model config (:func:`synthetic_calibration`; lower quality,
  a warning says so).

Statistics (:func:`collect_stats`): forward hooks on the selected linears record, per layer, the
per-input-channel absmax and a bounded random subsample of input rows (a reservoir kept by
random keys from a seeded generator, so the result is deterministic and memory is bounded no
matter how many tokens flow through). Layers that read the very same input tensor (q/k/v) are
recorded as one *input group*. The model can be streamed block by block onto the device
(``offload=True``) so a model larger than device memory still calibrates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

__all__ = [
    "CalibrationSet",
    "LayerStats",
    "CalibrationStats",
    "load_calibration",
    "save_calibration",
    "synthetic_calibration",
    "capture_inputs",
    "capture_pipeline_inputs",
    "collect_stats",
    "block_containers",
]

_META_KEY = "svdq_calibration"
_SEP = "::"

#: A calibration sample: keyword arguments of the model's forward (tensors, nested dicts, scalars).
Sample = dict[str, Any]


@dataclasses.dataclass
class CalibrationSet:
    """Model inputs used for calibration.

    Attributes:
        samples: Keyword-argument dicts, one forward call each.
        source: Where they came from (``"synthetic"``, a file name, ``"pipeline"``).
    """

    samples: list[Sample]
    source: str = "samples"

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


# --------------------------------------------------------------------------- files


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], static: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").contiguous()
    elif isinstance(value, Mapping):
        static[prefix] = {"__dict__": sorted(value)}
        for k, v in value.items():
            _flatten(f"{prefix}{_SEP}{k}", v, tensors, static)
    elif value is None or isinstance(value, (bool, int, float, str)):
        static[prefix] = value
    else:
        raise QuantizationError(f"calibration input {prefix!r}: cannot store a {type(value).__name__}")


def save_calibration(samples: Iterable[Sample], path: str | os.PathLike[str]) -> Path:
    """Write calibration samples to a safetensors file (atomic).

    Tensor ``name`` of sample ``i`` is stored as ``"{i:05d}::name"`` (nested dicts add
    ``"::key"``); non-tensor values (``None``, numbers, strings) go to the header metadata.
    """
    from safetensors.torch import save_file

    from svdq_format.io import atomic_write

    tensors: dict[str, torch.Tensor] = {}
    static: dict[str, Any] = {}
    n = 0
    for i, sample in enumerate(samples):
        for name, value in sample.items():
            _flatten(f"{i:05d}{_SEP}{name}", value, tensors, static)
        n = i + 1
    meta = {_META_KEY: json.dumps({"version": 1, "num_samples": n, "static": static})}
    p = Path(path)
    atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return p


def load_calibration(path: str | os.PathLike[str]) -> CalibrationSet:
    """Read a file written by :func:`save_calibration` (checks every tensor is finite).

    Raises:
        QuantizationError: missing/unreadable file, not a calibration file, or NaN/inf values
            (naming the file and tensor).
    """
    from safetensors import safe_open

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise QuantizationError(f"{p}: calibration file not found")
    try:
        handle_cm = safe_open(p, framework="pt", device="cpu")
        with handle_cm as handle:
            meta = handle.metadata() or {}
            if _META_KEY not in meta:
                raise QuantizationError(f"{p}: not a calibration file (no {_META_KEY!r} metadata)")
            info = json.loads(meta[_META_KEY])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except QuantizationError:
        raise
    except Exception as exc:  # safetensors / JSON errors
        raise QuantizationError(f"{p}: cannot read calibration file ({exc})") from None
    samples: list[Sample] = [{} for _ in range(int(info.get("num_samples", 0)))]
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantizationError(f"{p}: {key}: calibration data contains NaN or inf")
    entries = [(k, v, True) for k, v in tensors.items()] + [
        (k, v, False) for k, v in info.get("static", {}).items()
    ]
    for key, value, _is_tensor in sorted(entries, key=lambda e: e[0].count(_SEP)):
        parts = key.split(_SEP)
        try:
            target = samples[int(parts[0])]
        except (ValueError, IndexError):
            raise QuantizationError(f"{p}: {key}: bad calibration key") from None
        for part in parts[1:-1]:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and "__dict__" in value:
            target.setdefault(parts[-1], {})
        else:
            target[parts[-1]] = value
    if not samples:
        raise QuantizationError(f"{p}: calibration file holds no samples")
    return CalibrationSet(samples, source=os.path.basename(p))


# --------------------------------------------------------------------------- capture


@contextlib.contextmanager
def capture_inputs(module: nn.Module, *, max_samples: int | None = None) -> Iterator[list[Sample]]:
    """Record the keyword inputs of every ``module(...)`` call inside the ``with`` block.

    Positional arguments are mapped to parameter names of ``module.forward``. Tensors are
    copied to the CPU. Yields the list that fills up (at most ``max_samples`` entries).
    """
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    out: list[Sample] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if max_samples is not None and len(out) >= max_samples:
            return
        sample: Sample = dict(zip(params, args))
        sample.update(kwargs)

        def cpu(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().to("cpu").clone()
            if isinstance(v, Mapping):
                return {k: cpu(x) for k, x in v.items()}
            return v

        out.append({k: cpu(v) for k, v in sample.items() if k != "return_dict"})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


def capture_pipeline_inputs(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    calls: Sequence[Mapping[str, Any]] | None = None,
    num_inference_steps: int = 8,
    max_samples: int = 32,
    seed: int = 0,
    **pipe_kwargs: Any,
) -> CalibrationSet:
    """Run a diffusers pipeline and capture its transformer's inputs at every denoising step.

    Args:
        pipe: A diffusers pipeline with a ``.transformer``.
        prompts: Text prompts (each becomes one call with ``prompt=``).
        calls: Instead of prompts, keyword arguments of each pipeline call (e.g.
            ``{"class_labels": [3]}`` for class-conditional pipelines).
        num_inference_steps: Denoising steps per call.
        max_samples: Samples kept in total, spread evenly over calls and steps.
        seed: Seed of each call's generator (``seed + call index``).
        **pipe_kwargs: Passed to every call (e.g. ``height``, ``width``, ``guidance_scale``).
    """
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise QuantizationError(f"{type(pipe).__name__} has no .transformer to calibrate")
    todo = [dict(c) for c in calls] if calls else [{"prompt": p} for p in (prompts or [])]
    if not todo:
        raise QuantizationError("no prompts given for calibration")
    per_call = max(1, math.ceil(max_samples / len(todo)))
    samples: list[Sample] = []
    for i, kwargs in enumerate(todo):
        if len(samples) >= max_samples:
            break
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        with capture_inputs(transformer) as got, torch.no_grad():
            pipe(**kwargs, num_inference_steps=num_inference_steps, generator=gen, **pipe_kwargs)
        stride = max(1, len(got) // per_call)
        samples.extend(got[::stride][:per_call])
    return CalibrationSet(samples[:max_samples], source="pipeline")


# --------------------------------------------------------------------------- synthetic


def synthetic_calibration(
    model: nn.Module,
    num_samples: int = 8,
    *,
    seed: int = 0,
    image_tokens: int | None = None,
    text_tokens: int | None = None,
    warn: bool = True,
) -> CalibrationSet:
    """Random inputs shaped from a diffusers transformer's config (Flux, SD3, PixArt, Sana).

    Real captured inputs calibrate better; this exists for benchmarks, smoke tests and when no
    pipeline is at hand (a warning says so).

    Args:
        model: The diffusers transformer.
        num_samples: Number of forward calls (batch 1 each).
        seed: Seed of the generator.
        image_tokens: Image tokens per sample (a square number; default 256).
        text_tokens: Text tokens per sample (default 64).

    Raises:
        QuantizationError: the architecture has no synthetic input recipe.
    """
    cfg = dict(getattr(model, "config", {}) or {})
    cls = type(model).__name__
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    img = image_tokens or 256
    txt = text_tokens or 64
    side = int(round(math.sqrt(img)))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def t() -> torch.Tensor:
        return torch.rand(1, generator=gen)

    samples: list[Sample] = []
    for _ in range(num_samples):
        if cls.startswith("Flux"):
            rows = torch.arange(side).repeat_interleave(side)
            cols = torch.arange(side).repeat(side)
            img_ids = torch.stack([torch.zeros(side * side), rows.float(), cols.float()], dim=-1)
            s: Sample = {
                "hidden_states": randn(1, side * side, cfg["in_channels"]),
                "encoder_hidden_states": randn(1, txt, cfg["joint_attention_dim"]),
                "pooled_projections": randn(1, cfg["pooled_projection_dim"]),
                "timestep": t().to(dtype),
                "img_ids": img_ids.to(dtype),
                "txt_ids": torch.zeros(txt, 3, dtype=dtype),
            }
            if cfg.get("guidance_embeds"):
                s["guidance"] = (1.0 + 4.0 * t()).to(dtype)
        elif cls.startswith("SD3"):
            p = cfg["patch_size"]
            s = {
                "hidden_states": randn(1, cfg["in_channels"], side * p, side * p),
                "encoder_hidden_states": randn(1, txt, cfg["joint_attention_dim"]),
                "pooled_projections": randn(1, cfg["pooled_projection_dim"]),
                "timestep": (1000 * t()).to(dtype),
            }
        elif cls.startswith("PixArt") or cls.startswith("Sana"):
            p = cfg["patch_size"]
            s = {
                "hidden_states": randn(1, cfg["in_channels"], side * p, side * p),
                "encoder_hidden_states": randn(1, txt, cfg["caption_channels"]),
                "timestep": (1000 * t()).long() if cls.startswith("PixArt") else (1000 * t()).to(dtype),
            }
            if cls.startswith("PixArt"):
                s["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        else:
            raise QuantizationError(
                f"no synthetic calibration recipe for {cls}; capture real inputs "
                "(--calibration FILE.safetensors or --prompts)"
            )
        samples.append(s)
    if warn:
        warnings.warn(
            "calibrating on synthetic random inputs: quantization quality will be lower than "
            "with captured inputs (--calibration FILE or --prompts)",
            UserWarning,
            stacklevel=2,
        )
    return CalibrationSet(samples, source="synthetic")


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class LayerStats:
    """Bounded activation statistics of one linear's input.

    Attributes:
        absmax: Per-input-channel max |x| ``[K]`` (float32).
        rows: A random subsample of input rows ``[m, K]`` (m ≤ the row budget), capture dtype.
        keys: The reservoir keys of ``rows`` (smallest keys are kept).
        count: Number of rows seen.
        minval: Smallest input value seen (decides unsigned activation codes after a GELU).
    """

    absmax: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    count: int = 0
    minval: float = float("-inf")


@dataclasses.dataclass
class CalibrationStats:
    """Statistics of every selected layer plus the input groups (layers sharing one input)."""

    layers: dict[str, LayerStats]
    groups: list[list[str]]
    samples: int = 0
    #: Seconds the calibration pass took (kept so a resumed run reports the full time).
    seconds: float = 0.0

    def group_of(self, name: str) -> list[str]:
        """The input group containing ``name`` (``[name]`` when it shares with nobody)."""
        for g in self.groups:
            if name in g:
                return g
        return [name]

    # ---- persistence (resume)
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to a safetensors file (atomic)."""
        from safetensors.torch import save_file

        from svdq_format.io import atomic_write

        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        mins: dict[str, float] = {}
        for name, st in self.layers.items():
            mins[name] = st.minval
            tensors[f"{name}{_SEP}absmax"] = st.absmax.contiguous()
            tensors[f"{name}{_SEP}rows"] = st.rows.contiguous()
            tensors[f"{name}{_SEP}keys"] = st.keys.contiguous()
            counts[name] = st.count
        meta = {"svdq_stats": json.dumps({"groups": self.groups, "counts": counts, "mins": mins, "samples": self.samples,
                                          "seconds": self.seconds})}
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as h:
            info = json.loads((h.metadata() or {})["svdq_stats"])
            layers = {
                name: LayerStats(
                    h.get_tensor(f"{name}{_SEP}absmax"),
                    h.get_tensor(f"{name}{_SEP}rows"),
                    h.get_tensor(f"{name}{_SEP}keys"),
                    int(count),
                    float(info.get("mins", {}).get(name, float("-inf"))),
                )
                for name, count in info["counts"].items()
            }
        return cls(layers, [list(g) for g in info["groups"]], int(info.get("samples", 0)),
                   float(info.get("seconds", 0.0)))


#: Names of ``nn.ModuleList`` attributes that hold a model's repeated blocks.
_BLOCK_LISTS = (
    "transformer_blocks", "single_transformer_blocks", "joint_transformer_blocks", "blocks",
    "layers", "layer", "h", "noise_refiner", "context_refiner",
)


def block_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's lists of repeated blocks, ``(qualified name, ModuleList)``, in module order.

    Known attribute names first (``transformer_blocks``, ``single_transformer_blocks``,
    ``blocks``, ``layer``, ...); nested ones (``encoder.layer``) are found too.
    """
    out: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rpartition(".")[2] in _BLOCK_LISTS and len(mod):
            if not any(name.startswith(f"{prev}.") for prev, _ in out):
                out.append((name, mod))
    return out


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


@contextlib.contextmanager
def block_offload(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Keep blocks on the CPU and move each onto ``device`` only while it runs.

    Everything outside the block lists (embedders, norms, final layers) lives on ``device``
    for the duration. Restores the CPU placement afterwards.
    """
    blocks = [b for _, lst in block_containers(model) for b in lst]
    block_ids = {id(b) for b in blocks}
    handles = []
    moved: list[nn.Module] = []

    def place_rest(mod: nn.Module) -> None:
        for child in mod.children():
            if id(child) in block_ids:
                continue
            if isinstance(child, nn.ModuleList) and any(id(c) in block_ids for c in child):
                continue
            if any(id(m) in block_ids for m in child.modules()):
                place_rest(child)
            else:
                child.to(device)
                moved.append(child)
        for pname, param in list(mod.named_parameters(recurse=False)):
            param.data = param.data.to(device)
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None:
                setattr(mod, bname, buf.to(device))

    def load(mod: nn.Module, _args: tuple) -> None:
        mod.to(device)

    def unload(mod: nn.Module, _args: tuple, _out: Any) -> None:
        mod.to("cpu")

    place_rest(model)
    for b in blocks:
        handles.append(b.register_forward_pre_hook(load))
        handles.append(b.register_forward_hook(unload))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.to("cpu")


def collect_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    calibration: Iterable[Sample],
    *,
    max_rows: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    offload: bool = False,
    progress: bool = False,
) -> CalibrationStats:
    """Run the calibration inputs through the model and gather per-layer statistics.

    Args:
        model: The (unquantized) model.
        layers: The linears to observe, by qualified name.
        calibration: Forward keyword dicts.
        max_rows: Row budget per layer (the subsample kept for the smoothing search).
        seed: Seed of the row sampler.
        device: Where the forward runs (default: where the model is).
        offload: Stream blocks onto ``device`` one at a time (model stays on the CPU).
        progress: Show a tqdm bar per sample.

    Raises:
        QuantizationError: NaN/inf activations (naming the layer and sample).
    """
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, LayerStats] = {}
    groups: list[list[str]] = []
    state: dict[str, Any] = {"last": None, "sample": 0, "first": True}
    placed: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            k = x.shape[-1]
            flat = x.detach().reshape(-1, k)
            amax = flat.abs().amax(dim=0).float()
            lo = float(flat.amin())
            if not bool(torch.isfinite(amax).all()):
                raise QuantizationError(
                    f"layer {name}: NaN or inf activations in calibration sample {state['sample']}"
                )
            if state["first"] and name not in placed:
                placed.add(name)
                if state["last"] is not None and state["last"][0] is x:
                    groups[-1].append(name)
                else:
                    groups.append([name])
                state["last"] = (x,)
            m = flat.shape[0]
            keys = torch.rand(m, generator=gen)
            take = min(m, max_rows)
            top = torch.topk(keys, take, largest=False)
            new_rows = flat[top.indices.to(flat.device)].to("cpu")
            st = stats.get(name)
            if st is None:
                stats[name] = LayerStats(amax.cpu(), new_rows, top.values, m, lo)
                return
            st.minval = min(st.minval, lo)
            st.absmax = torch.maximum(st.absmax, amax.cpu())
            all_keys = torch.cat([st.keys, top.values])
            all_rows = torch.cat([st.rows, new_rows])
            keep = torch.topk(all_keys, min(max_rows, all_keys.numel()), largest=False).indices
            keep = keep.sort().values
            st.keys, st.rows, st.count = all_keys[keep], all_rows[keep], st.count + m

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in layers.items()]
    samples = list(calibration)
    if not samples:
        raise QuantizationError("calibration set is empty")
    if device is None:
        device = next(model.parameters()).device
    ctx = block_offload(model, device) if offload else contextlib.nullcontext()
    try:
        from tqdm.auto import tqdm

        with ctx, torch.no_grad():
            for i, sample in enumerate(tqdm(samples, desc="calibration", unit="sample", disable=not progress)):
                state["sample"] = i
                model(**_to(sample, device))
                state["first"] = False
                state["last"] = None
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in stats]
    if missing:
        warnings.warn(f"{len(missing)} selected layers never ran during calibration (e.g. {missing[0]})",
                      UserWarning, stacklevel=2)
    groups = [[n for n in g if n in stats] for g in groups]
    return CalibrationStats(stats, [g for g in groups if g], samples=len(samples))
