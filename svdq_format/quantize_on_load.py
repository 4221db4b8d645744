"""Quantize a dense checkpoint while diffusers loads it (data-free), one input group at a time.

``FluxTransformer2DModel.from_pretrained(dense, quantization_config=SVDQuantConfig(precision="int4",
rank=32))`` runs here, through :class:`~svdq_format.diffusers.SVDQuantizer`'s hooks:

1. **Before any weight is read** (``_process_model_before_weight_loading``): the options are
   checked (:class:`OnLoadOptions`, at ``SVDQuantConfig(...)`` already), every ``include`` /
   ``exclude`` pattern must match a linear of the model, the layer plan comes from the quantizer
   plug-in (which linears, W4A4 or weight-only W4A16, their input groups: the same defaults as
   ``svdq quantize``), and every planned tensor must be in the checkpoint's safetensors files
   with the model's shape (headers only; the loading core's checks,
   :func:`~svdq_format.checkpoint.check_key_sets` and :func:`~svdq_format.checkpoint.check_shape`).
2. **Each shard** (``maybe_update_state_dict``): the planned weights and biases in the shard's
   state dict become meta placeholders, so diffusers never touches their memory-mapped pages.
3. **Each planned tensor** (``check_if_quantized_param`` / ``create_quantized_param``): once every
   tensor of an input group (q/k/v read one input and share one smoothing vector) has been handed
   over, the group's dense weights are read from the files onto the compute device (the layers'
   target device unless :attr:`OnLoadOptions.device` says otherwise; straight to GPU memory
   through a pinned ring on CUDA), quantized by the plug-in, and the ``nn.Linear`` modules are
   replaced by :class:`~svdq_format.linear.SVDQLinear` on their target device. So host and GPU
   memory hold the quantized layers so far plus one input group's dense weights, never the
   dense model.
4. **After loading** (``_process_model_after_weight_loading``): :meth:`OnLoadQuantization.finish`
   checks every planned layer was quantized and returns the manifest, with the provenance
   ``quantizer.method = "data-free"`` (:class:`~svdq_format.spec.QuantizerInfo`).

The per-layer math (smoothing from the weights alone, randomised SVD, clipping search) is the
quantizer's (``converters.quantize``); ``svdq_format`` imports nothing of ours, so the plug-in is
found by name (:data:`LAYER_QUANTIZER`), as the ``svdq`` CLI finds its subcommands
(docs/design.md, "Registration").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .checkpoint import check_key_sets, check_shape
from .device_read import read_to_device
from .errors import TensorError, UnsupportedError
from .io import SafetensorsHeader, TensorReader, read_header
from .linear import SVDQLinear
from .lora.types import RANK_MULTIPLE  # low-rank ranks are multiples of it (the kernels' granularity)
from .model import model_metadata, set_submodule
from .spec import FLOAT_DTYPES, PRECISIONS, QUANTIZER_KEY, FormatMetadata, QuantizerInfo, dtype_name

__all__ = [
    "LAYER_QUANTIZER",
    "RANK_MULTIPLE",
    "OnLoadOptions",
    "LayerPlan",
    "LayerQuantizer",
    "load_layer_quantizer",
    "OnLoadQuantization",
]

#: ``module:attribute`` of the layer quantizer plug-in (a :class:`LayerQuantizer` class).
LAYER_QUANTIZER = "converters.quantize.data_free:DataFreeQuantizer"


def _bad(reason: str) -> UnsupportedError:
    return UnsupportedError(f"SVDQuantConfig: {reason}")


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) and p for p in items):
        raise _bad(f"{what} must be shell patterns (non-empty strings), got {value!r}")
    return items


@dataclasses.dataclass(frozen=True)
class OnLoadOptions:
    """How to quantize a dense checkpoint while it loads: the options of ``SVDQuantConfig(...)``.

    Every option is checked here, so a bad one fails before the model is built, in one line
    (:class:`~svdq_format.errors.UnsupportedError`).

    Attributes:
        precision: ``"int4"`` (group 64) or ``"nvfp4"`` (group 16).
        rank: Rank of the low-rank branch of W4A4 layers: a multiple of 16, 0 for none.
        w4a16_rank: Rank of weight-only (W4A16: AdaLN modulation) layers, a multiple of 16.
        weight_only: Make every selected layer W4A16.
        include: Shell patterns (:mod:`fnmatch`) of extra linears to quantize; each must match.
        exclude: Shell patterns of linears to keep 16-bit (wins over ``include``); each must match.
        smoothing: Choose a smoothing vector from the weights alone (else ``s = 1``).
        clip_search: int4: per-group clipping search on the residual (else absmax / 7).
        refine_iters: Low-rank refinement iterations (re-fit ``L1·L2`` to ``Ŵ − Q(R)``).
        seed: Seed of every random choice (randomised SVD, the search's synthetic inputs).
        device: Where the per-layer math runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``); default:
            where each layer is loaded (``device_map``; the CPU without one).
    """

    precision: str = "int4"
    rank: int = 32
    w4a16_rank: int = 0
    weight_only: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    smoothing: bool = True
    clip_search: bool = True
    refine_iters: int = 3
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise _bad(f"precision {self.precision!r} is not one svdquant has (one of {', '.join(PRECISIONS)})")
        for name in ("rank", "w4a16_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(f"{name} must be an integer >= 0, got {value!r}")
            if value % RANK_MULTIPLE:
                near = max(RANK_MULTIPLE, round(value / RANK_MULTIPLE) * RANK_MULTIPLE)
                raise _bad(f"{name} {value} is not a multiple of {RANK_MULTIPLE} (the kernels' low-rank "
                           f"granularity); use e.g. {near}")
        for name in ("weight_only", "smoothing", "clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("refine_iters", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(f"{name} must be an integer >= 0, got {value!r}")
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise _bad(f"device {self.device!r} is not a torch device") from None
            object.__setattr__(self, "device", str(device))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> OnLoadOptions:
        """Build from keyword options, naming an unknown one."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise _bad(f"unknown option {unknown[0]!r} (known: {', '.join(names)})")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists); ``from_kwargs(**to_json())`` gives the same options."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What the layer quantizer will quantize in a model.

    Attributes:
        kinds: Module name → ``"w4a4"`` or ``"w4a16"``, in module order.
        groups: Input groups (linears reading one input, quantized together with one smoothing
            vector); together they hold every name of ``kinds`` once.
        skipped: Module name → why it stays 16-bit (candidates and pattern matches only).
    """

    kinds: dict[str, str]
    groups: list[tuple[str, ...]]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


class LayerQuantizer(Protocol):
    """The per-layer quantizer a plug-in provides (``converters.quantize.data_free``)."""

    #: ``quantizer.method`` of what it makes (e.g. ``"data-free"``).
    method: str

    def plan(self, model: nn.Module, options: OnLoadOptions) -> LayerPlan:
        """The layers to quantize in ``model`` (on the meta device: shapes only)."""
        ...

    def settings(self, options: OnLoadOptions) -> dict[str, Any]:
        """Every setting it quantizes with (recorded in the checkpoint's provenance)."""
        ...

    def quantize(self, group: Sequence[str], weights: Mapping[str, torch.Tensor],
                 biases: Mapping[str, torch.Tensor | None], kinds: Mapping[str, str],
                 options: OnLoadOptions) -> dict[str, SVDQLinear]:
        """Quantize one input group (weights on the compute device, in the compute dtype)."""
        ...


def load_layer_quantizer(spec: str = LAYER_QUANTIZER) -> LayerQuantizer:
    """Instantiate the plug-in named ``module:Class``.

    Raises:
        UnsupportedError: the plug-in is not installed.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnsupportedError(f"quantizing while loading needs svdquant's quantizer ({module_name}), which "
                               f"could not be imported: {exc}") from None
    quantizer: LayerQuantizer = getattr(module, attr)()
    return quantizer


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _check_patterns(model: nn.Module, options: OnLoadOptions) -> None:
    names = _linear_names(model)
    for what, patterns in (("include", options.include), ("exclude", options.exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                example = f" (its linears are named like {names[0]!r})" if names else ""
                raise _bad(f"{what} pattern {p!r} matches no linear layer of {type(model).__name__}{example}")


def _device(device: Any) -> torch.device:
    """diffusers' target device (``"cpu"``, an int GPU index, a string or a device) as a device."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return torch.device("cpu" if device is None else device)


class OnLoadQuantization:
    """The state of one quantize-while-loading run (what :class:`~svdq_format.diffusers.SVDQuantizer`
    delegates to when ``pre_quantized`` is false).

    Args:
        options: The checked options.
        progress: Show a progress bar (tqdm) over the layers.
        quantizer: The layer quantizer (default: the plug-in, :func:`load_layer_quantizer`).
    """

    def __init__(self, options: OnLoadOptions, *, progress: bool = True,
                 quantizer: LayerQuantizer | None = None) -> None:
        self.options = options
        self.quantizer = quantizer if quantizer is not None else load_layer_quantizer()
        self.dtype = torch.bfloat16
        self.progress = progress
        self.plan: LayerPlan | None = None
        self._file = "checkpoint"
        self._where: dict[str, SafetensorsHeader] = {}  # planned tensor key → the file holding it
        self._needs: dict[str, tuple[str, ...]] = {}  # layer → its tensor keys
        self._group: dict[str, tuple[str, ...]] = {}  # layer → its input group
        self._arrived: set[str] = set()
        self._target: dict[str, torch.device] = {}
        self._done: set[str] = set()
        self._bar: Any = None

    # -- before loading ---------------------------------------------------------------------

    def torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype (``torch_dtype``; bfloat16 when none is given, as FLUX ships)."""
        dtype = torch.bfloat16 if torch_dtype is None else torch_dtype
        if dtype_name(dtype) not in FLOAT_DTYPES:
            raise _bad(f"torch_dtype {dtype} is not one of {', '.join(FLOAT_DTYPES)}")
        self.dtype = dtype
        return dtype

    def check_device_map(self, device_map: Any) -> None:
        """Refuse offloading to disk (the layers are built where they are loaded)."""
        if isinstance(device_map, Mapping) and "disk" in {str(d) for d in device_map.values()}:
            raise _bad("device_map offloads to disk, which quantizing while loading does not support: "
                       "give a device (e.g. device_map='cuda') or none (CPU)")

    def prepare(self, model: nn.Module, files: Sequence[str]) -> LayerPlan:
        """Plan the run on the (meta-device) model and check the checkpoint holds every planned
        tensor; reads headers only."""
        _check_patterns(model, self.options)
        if not files:
            raise UnsupportedError("quantizing while loading needs from_pretrained's checkpoint files (a model "
                                   "directory or Hub repo; from_single_file is not supported)")
        if not all(str(f).endswith(".safetensors") for f in files):
            raise UnsupportedError(f"{files[0]}: quantizing while loading reads safetensors checkpoints only")
        self._file = str(files[0])
        plan = self.quantizer.plan(model, self.options)
        if not plan.kinds:
            raise _bad(f"no linear layer of {type(model).__name__} to quantize (include/exclude/weight_only "
                       "leave nothing)")
        grouped = [n for g in plan.groups for n in g]
        if sorted(grouped) != sorted(plan.kinds):
            raise UnsupportedError(f"{type(self.quantizer).__name__}: its input groups do not cover its layers")
        for f in files:
            header = read_header(f)
            for key in header.tensors:
                self._where.setdefault(key, header)
        for name in plan.kinds:
            module = model.get_submodule(name)
            keys = (f"{name}.weight",) + ((f"{name}.bias",) if getattr(module, "bias", None) is not None else ())
            self._needs[name] = keys
        # the loading core's checks (svdq_format.checkpoint): every planned tensor stored, in its model shape
        planned = [k for keys in self._needs.values() for k in keys]
        check_key_sets(planned, {k: self._where[k].path for k in planned if k in self._where}, where=self._file,
                       model_name=type(model).__name__)
        for key in planned:
            check_shape(self._where[key].path, key, self._where[key].tensors[key].shape,
                        model.get_parameter(key).shape)
        self._group = {n: tuple(g) for g in plan.groups for n in g}
        self.plan = plan
        return plan

    # -- while loading ----------------------------------------------------------------------

    def placeholders(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The shard's state dict with every planned tensor replaced by a meta placeholder of its
        shape and dtype (diffusers then never reads those pages; we read them ourselves)."""
        return {k: torch.empty_like(v, device="meta") if self.wants(k) and isinstance(v, torch.Tensor) else v
                for k, v in state_dict.items()}

    def wants(self, key: str) -> bool:
        """Whether ``key`` is a tensor of a planned layer not yet quantized."""
        name = key.rpartition(".")[0]
        return name in self._needs and name not in self._done and key in self._needs[name]

    def receive(self, model: nn.Module, key: str, target_device: Any) -> None:
        """diffusers hands over one planned tensor (as a placeholder); quantize its input group
        once the group is complete."""
        name = key.rpartition(".")[0]
        self._arrived.add(key)
        self._target[name] = _device(target_device)
        group = self._group[name]
        if all(k in self._arrived for m in group for k in self._needs[m]):
            self._quantize(model, group)

    def _read(self, keys: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k].path, []).append(k)
        out: dict[str, torch.Tensor] = {}
        for names in by_file.values():
            header = self._where[names[0]]
            if device.type == "cuda":
                out.update(read_to_device(header, device, names=names))
            else:
                with TensorReader(header) as reader:
                    out.update({k: reader.get_tensor(k).to(device) for k in names})
        return out

    @torch.no_grad()
    def _quantize(self, model: nn.Module, group: tuple[str, ...]) -> None:
        assert self.plan is not None
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.plan.kinds), desc="svdquant: quantizing", unit="layer",
                             disable=not self.progress)
        compute = torch.device(self.options.device) if self.options.device else self._target[group[0]]
        raw = self._read([k for m in group for k in self._needs[m]], compute)
        weights = {m: raw.pop(f"{m}.weight").to(self.dtype) for m in group}
        biases = {m: (raw.pop(f"{m}.bias").to(self.dtype) if f"{m}.bias" in raw else None) for m in group}
        kinds = {m: self.plan.kinds[m] for m in group}
        layers = self.quantizer.quantize(group, weights, biases, kinds, self.options)
        del raw, weights, biases
        for name in group:
            layer = layers[name]
            linear = model.get_submodule(name)
            if not isinstance(layer, SVDQLinear) or (layer.in_features, layer.out_features) != (
                    linear.in_features, linear.out_features):
                raise UnsupportedError(f"{type(self.quantizer).__name__}: returned no matching SVDQLinear for {name}")
            set_submodule(model, name, layer.to(self._target[name]))
            self._done.add(name)
        self._bar.update(len(group))

    # -- after loading ----------------------------------------------------------------------

    def finish(self, model: nn.Module) -> FormatMetadata:
        """Check every planned layer was quantized; the manifest with the data-free provenance."""
        assert self.plan is not None
        if self._bar is not None:
            self._bar.close()
        left = [n for n in self.plan.kinds if n not in self._done]
        if left:
            raise TensorError(self._file, f"{left[0]}.weight", f"never handed over by diffusers while loading: "
                              f"{len(left)} layers not quantized")
        settings = {**self.options.to_json(), **self.quantizer.settings(self.options)}
        info = QuantizerInfo(method=self.quantizer.method, options=settings)
        return model_metadata(model, extra={QUANTIZER_KEY: info.to_json()})
