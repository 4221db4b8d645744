"""The SVDQuant checkpoint format, versions 1–2, as Python types (normative text: docs/format.md).

This module holds the constants of the format, the per-layer manifest entry
(:class:`LayerSpec`) and the file-level metadata (:class:`FormatMetadata`), and turns them into
and out of the JSON string stored in every file's safetensors ``__metadata__`` under the key
``"svdquant"`` (and in ``config.json``'s ``quantization_config`` for model directories).

Compatibility rules (docs/format.md §7.3): a reader refuses a ``format_version`` newer than
:data:`FORMAT_VERSION` and a listed ``features`` entry it does not implement (naming both);
unknown *optional* fields are ignored, so later additive changes keep the version; a required
field that is missing or of the wrong JSON type is an error. Writers give a file the lowest
version its content needs (:meth:`FormatMetadata.required_version`): a file without per-segment
layers stays version 1, which every reader reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from . import jsonsafe
from .errors import ManifestError, VersionError
from .packing import GROUP_SIZES

__all__ = [
    "FORMAT_VERSION",
    "FEATURES",
    "LAYOUT",
    "QUANT_METHOD",
    "METADATA_KEY",
    "PRECISIONS",
    "KINDS",
    "GROUP_SIZE",
    "FLOAT_DTYPES",
    "Precision",
    "Kind",
    "KSegment",
    "LayerSpec",
    "FormatMetadata",
    "QUANTIZER_KEY",
    "QUANTIZATION_METHODS",
    "QuantizerInfo",
    "tensor_names",
    "expected_tensors",
    "COMPUTE_ROLES",
    "MAX_ABS_VALUE",
    "MAX_SMOOTH",
    "dtype_name",
    "dtype_from_name",
]

#: The newest format version this library reads (and writes, for files that need it).
FORMAT_VERSION = 2
#: Format features (listed in a file's ``features``) → the format version that introduced them.
#: ``k_segments``: a layer whose input channels are split into segments with their own activation
#: handling (and nvfp4 tensor scale), docs/format.md §7.4.
FEATURES: dict[str, int] = {"k_segments": 2}
#: Name of the (only) on-disk layout of version 1: row-major, two codes per byte, low nibble first.
LAYOUT = "rowmajor-nibble-lo-first"
#: Value of ``quant_method`` in ``config.json``'s ``quantization_config``.
QUANT_METHOD = "svdquant"
#: Key of the JSON string in the safetensors ``__metadata__`` of every file we write.
METADATA_KEY = "svdquant"

Precision = Literal["int4", "nvfp4"]
Kind = Literal["w4a4", "w4a16"]
PRECISIONS: tuple[str, ...] = ("int4", "nvfp4")
KINDS: tuple[str, ...] = ("w4a4", "w4a16")
#: Group size along K, fixed by the precision (one table, kept in packing.py).
GROUP_SIZE: dict[str, int] = GROUP_SIZES
#: The 16/32-bit float dtypes allowed for smooth, lora_down, lora_up, bias (the compute dtype).
FLOAT_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
#: Key of the optional, informative provenance object of the metadata (docs/format.md §7.2).
QUANTIZER_KEY = "quantizer"
#: Values of ``quantizer.method``: ``"calibrated"`` (chosen on captured activations: ``svdq
#: quantize``) or ``"data-free"`` (from the weights alone: quantized while loading).
QUANTIZATION_METHODS: tuple[str, ...] = ("calibrated", "data-free")

_TORCH_DTYPES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "uint8": "uint8",
    "float8_e4m3fn": "float8_e4m3fn",
}


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the names used in the manifest)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16``; raises ``KeyError`` for names outside the format."""
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


#: Largest magnitude accepted for a layer's dense values (low-rank branch, bias, weight and tensor
#: scales) and ``act_shift``: fp16's largest value. Beyond it a 16-bit compute dtype overflows,
#: and no real checkpoint comes near it (docs/format.md §9).
MAX_ABS_VALUE = 65504.0
#: Smoothing factors must lie in ``[1/MAX_SMOOTH, MAX_SMOOTH]`` (x / s must stay finite).
MAX_SMOOTH = 2.0**40

def tensor_names(prefix: str) -> dict[str, str]:
    """The full tensor keys of one quantized linear, by role (see docs/format.md §2)."""
    return {
        role: f"{prefix}.{role}"
        for role in ("qweight", "wscales", "wtscale", "smooth", "lora_down", "lora_up", "bias")
    }


@dataclasses.dataclass(frozen=True)
class KSegment:
    """One segment of a layer's input channels with its own activation handling (format 2, §7.4).

    Attributes:
        size: Number of consecutive input channels, a positive multiple of the group size.
        act_shift: This segment's ``act_shift`` (``x̂ = (x + act_shift) / s`` on its channels).
        act_unsigned: int4 only: this segment's activations use unsigned codes 0..15.
    """

    size: int
    act_shift: float = 0.0
    act_unsigned: bool = False

    def to_json(self) -> dict[str, Any]:
        """``{"size": …}`` plus the non-default activation fields."""
        out: dict[str, Any] = {"size": self.size}
        if self.act_shift:
            out["act_shift"] = self.act_shift
        if self.act_unsigned:
            out["act_unsigned"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str | None = None, file: str | None = None) -> KSegment:
        """Parse one ``k_segments`` entry (types only; :meth:`LayerSpec.check` checks values)."""
        if not isinstance(obj, Mapping):
            raise ManifestError(file, where, f"k_segments entries must be JSON objects, got {_jtype(obj)}")
        size: Any = obj.get("size")
        if not _is_int(size):
            raise ManifestError(file, where, f"k_segments entry field 'size' must be int, got {_jtype(size)}")
        shift = obj.get("act_shift", 0.0)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool):
            raise ManifestError(file, where, f"k_segments entry field 'act_shift' must be number, got {_jtype(shift)}")
        unsigned = obj.get("act_unsigned", False)
        if not isinstance(unsigned, bool):
            raise ManifestError(
                file, where, f"k_segments entry field 'act_unsigned' must be boolean, got {_jtype(unsigned)}"
            )
        return cls(size=size, act_shift=float(shift), act_unsigned=unsigned)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Manifest entry of one quantized linear layer ``y = x Wᵀ + b`` (W is N×K).

    Attributes:
        kind: ``"w4a4"`` (weights and activations 4-bit, the SVDQuant layer) or ``"w4a16"``
            (weights 4-bit, activations kept in the compute dtype).
        precision: ``"int4"`` (signed codes, 16-bit scale per 64 along K) or ``"nvfp4"`` (E2M1
            codes, e4m3 scale per 16 along K, one fp32 tensor scale).
        in_features: K, a multiple of :attr:`group_size`.
        out_features: N.
        rank: r, the rank of the 16-bit low-rank branch (0: no branch, no tensors).
        dtype: Compute dtype name: dtype of ``smooth``, ``lora_down``, ``lora_up``, ``bias`` and
            of the layer's output.
        has_bias: Whether ``<prefix>.bias`` is stored.
        fused_from: For a layer made by concatenating several linears that share one input
            along N (q|k|v), the original module names in order; empty otherwise.
        split_sizes: Output sizes of the fused members (sums to ``out_features``).
        act_shift: Constant added to the input before smoothing and quantization,
            ``x̂ = (x + act_shift) / s`` (w4a4 only; 0 normally). Used for inputs that follow a
            GELU (bounded below by −0.171875) together with ``act_unsigned``.
        act_unsigned: int4 w4a4 only: activations use unsigned codes 0..15 with scale
            ``absmax / 15`` (negative x̂ clamp to 0) instead of signed −8..7.
        k_segments: Format 2 (feature ``k_segments``): the input channels split into two or
            more consecutive segments, each with its own ``act_shift`` / ``act_unsigned`` (then
            the layer-level ones stay 0 / false) and, for nvfp4, its own tensor scale
            (``wtscale`` has one element per segment). Empty: one handling for all of K.
    """

    kind: str
    precision: str
    in_features: int
    out_features: int
    rank: int
    dtype: str = "bfloat16"
    has_bias: bool = False
    fused_from: tuple[str, ...] = ()
    split_sizes: tuple[int, ...] = ()
    act_shift: float = 0.0
    act_unsigned: bool = False
    k_segments: tuple[KSegment, ...] = ()

    @property
    def features(self) -> frozenset[str]:
        """The format features (:data:`FEATURES`) this entry uses."""
        return frozenset({"k_segments"}) if self.k_segments else frozenset()

    @property
    def segment_sizes(self) -> tuple[int, ...]:
        """Input channels per segment: ``(in_features,)`` for a layer without ``k_segments``."""
        return tuple(seg.size for seg in self.k_segments) if self.k_segments else (self.in_features,)

    @property
    def group_size(self) -> int:
        """Quantization group size along K: 64 for int4, 16 for nvfp4."""
        return GROUP_SIZE[self.precision]

    @property
    def num_groups(self) -> int:
        """K / group_size."""
        return self.in_features // self.group_size

    def check(self, *, where: str | None = None, file: str | None = None) -> None:
        """Raise :class:`ManifestError` if the entry is not self-consistent."""

        def bad(reason: str) -> ManifestError:
            return ManifestError(file, where, reason)

        if self.kind not in KINDS:
            raise bad(f"unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.precision not in PRECISIONS:
            raise bad(
                f"unknown precision {self.precision!r} (expected one of {', '.join(PRECISIONS)})"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise bad(f"unknown dtype {self.dtype!r} (expected one of {', '.join(FLOAT_DTYPES)})")
        for name in ("in_features", "out_features", "rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0 or value > 2**31:
                raise bad(f"{name} must be an integer in [0, 2^31], got {value!r}")
        if self.in_features == 0 or self.out_features == 0:
            raise bad("in_features and out_features must be positive")
        if self.in_features % self.group_size:
            raise bad(
                f"in_features {self.in_features} is not a multiple of the {self.precision} "
                f"group size {self.group_size}"
            )
        if self.rank > min(self.in_features, self.out_features) + 4096:
            raise bad(f"rank {self.rank} is absurd for a {self.out_features}x{self.in_features} layer")
        if (
            not isinstance(self.act_shift, (int, float))
            or isinstance(self.act_shift, bool)
            or not math.isfinite(self.act_shift)
        ):
            raise bad(f"act_shift must be a finite number, got {self.act_shift!r}")
        if abs(self.act_shift) > MAX_ABS_VALUE:
            raise bad(f"act_shift {self.act_shift!r} is absurd (beyond ±{MAX_ABS_VALUE:g}, fp16's range)")
        if not isinstance(self.act_unsigned, bool):
            raise bad(f"act_unsigned must be a boolean, got {self.act_unsigned!r}")
        if (self.act_unsigned or self.act_shift) and self.kind != "w4a4":
            raise bad("act_shift/act_unsigned only apply to w4a4 layers")
        if self.act_unsigned and self.precision != "int4":
            raise bad("act_unsigned is only defined for int4")
        if self.k_segments:
            self._check_segments(bad)
        if bool(self.fused_from) != bool(self.split_sizes):
            raise bad("fused_from and split_sizes must be given together")
        if self.fused_from:
            if len(self.fused_from) != len(self.split_sizes):
                raise bad("fused_from and split_sizes differ in length")
            if any(not _is_int(s) or s <= 0 for s in self.split_sizes):
                raise bad("split_sizes must be positive integers")
            if sum(self.split_sizes) != self.out_features:
                raise bad(
                    f"split_sizes sum to {sum(self.split_sizes)}, not out_features "
                    f"{self.out_features}"
                )

    def _check_segments(self, bad: Any) -> None:
        if self.kind != "w4a4":
            raise bad("k_segments only apply to w4a4 layers")
        if self.act_shift or self.act_unsigned:
            raise bad("a layer with k_segments gives act_shift/act_unsigned per segment, not for the whole layer")
        if len(self.k_segments) < 2:
            raise bad("k_segments must list two or more segments (one is the plain layer)")
        for i, seg in enumerate(self.k_segments):
            if not isinstance(seg, KSegment):
                raise bad(f"k_segments[{i}] is not a segment")
            if not _is_int(seg.size) or seg.size <= 0 or seg.size % self.group_size:
                raise bad(
                    f"k_segments[{i}].size {seg.size!r} is not a positive multiple of the {self.precision} "
                    f"group size {self.group_size}"
                )
            if (
                not isinstance(seg.act_shift, (int, float))
                or isinstance(seg.act_shift, bool)
                or not math.isfinite(seg.act_shift)
            ):
                raise bad(f"k_segments[{i}].act_shift must be a finite number, got {seg.act_shift!r}")
            if not isinstance(seg.act_unsigned, bool):
                raise bad(f"k_segments[{i}].act_unsigned must be a boolean, got {seg.act_unsigned!r}")
            if seg.act_unsigned and self.precision != "int4":
                raise bad(f"k_segments[{i}]: act_unsigned is only defined for int4")
        total = sum(seg.size for seg in self.k_segments)
        if total != self.in_features:
            raise bad(f"k_segments sizes sum to {total}, not in_features {self.in_features}")

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (optional fields omitted when empty)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "precision": self.precision,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "dtype": self.dtype,
            "has_bias": self.has_bias,
        }
        if self.fused_from:
            out["fused_from"] = list(self.fused_from)
            out["split_sizes"] = list(self.split_sizes)
        if self.act_shift:
            out["act_shift"] = self.act_shift
        if self.act_unsigned:
            out["act_unsigned"] = True
        if self.k_segments:
            out["k_segments"] = [seg.to_json() for seg in self.k_segments]
        return out

    @classmethod
    def from_json(
        cls, obj: Any, *, where: str | None = None, file: str | None = None
    ) -> LayerSpec:
        """Parse and check one manifest entry; unknown keys are ignored."""
        if not isinstance(obj, Mapping):
            raise ManifestError(file, where, f"layer entry must be a JSON object, got {_jtype(obj)}")
        required = {
            "kind": str,
            "precision": str,
            "in_features": int,
            "out_features": int,
            "rank": int,
            "dtype": str,
            "has_bias": bool,
        }
        values: dict[str, Any] = {}
        for name, typ in required.items():
            if name not in obj:
                raise ManifestError(file, where, f"missing field {name!r}")
            value = obj[name]
            ok = isinstance(value, bool) if typ is bool else (
                _is_int(value) if typ is int else isinstance(value, typ)
            )
            if not ok:
                raise ManifestError(
                    file, where, f"field {name!r} must be {typ.__name__}, got {_jtype(value)}"
                )
            values[name] = value
        fused = obj.get("fused_from", [])
        sizes = obj.get("split_sizes", [])
        if not isinstance(fused, list) or not all(isinstance(f, str) for f in fused):
            raise ManifestError(file, where, "fused_from must be a list of strings")
        if not isinstance(sizes, list) or not all(_is_int(s) for s in sizes):
            raise ManifestError(file, where, "split_sizes must be a list of integers")
        shift = obj.get("act_shift", 0.0)
        if not isinstance(shift, (int, float)) or isinstance(shift, bool):
            raise ManifestError(file, where, f"field 'act_shift' must be number, got {_jtype(shift)}")
        unsigned = obj.get("act_unsigned", False)
        if not isinstance(unsigned, bool):
            raise ManifestError(file, where, f"field 'act_unsigned' must be boolean, got {_jtype(unsigned)}")
        segments = obj.get("k_segments", [])
        if not isinstance(segments, list):
            raise ManifestError(file, where, f"field 'k_segments' must be array, got {_jtype(segments)}")
        spec = cls(
            fused_from=tuple(fused),
            split_sizes=tuple(sizes),
            act_shift=float(shift),
            act_unsigned=unsigned,
            k_segments=tuple(KSegment.from_json(seg, where=where, file=file) for seg in segments),
            **values,
        )
        spec.check(where=where, file=file)
        if "group_size" in obj and obj["group_size"] != spec.group_size:
            raise ManifestError(
                file,
                where,
                f"group_size {obj['group_size']!r} does not match precision {spec.precision} "
                f"(which fixes {spec.group_size})",
            )
        return spec


def expected_tensors(spec: LayerSpec) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Tensor role → (allowed dtype names, shape) for one layer, exactly as docs/format.md §2."""
    n, k, r, g = spec.out_features, spec.in_features, spec.rank, spec.num_groups
    out: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
        "qweight": (("uint8",), (n, k // 2)),
        "smooth": ((spec.dtype,), (k,)),
    }
    if spec.precision == "int4":
        out["wscales"] = (("bfloat16", "float16"), (n, g))
    else:
        out["wscales"] = (("float8_e4m3fn",), (n, g))
        out["wtscale"] = (("float32",), (len(spec.k_segments),) if spec.k_segments else ())
    if r > 0:
        out["lora_down"] = ((spec.dtype,), (r, k))
        out["lora_up"] = ((spec.dtype,), (n, r))
    if spec.has_bias:
        out["bias"] = ((spec.dtype,), (n,))
    return out


@dataclasses.dataclass(frozen=True)
class QuantizerInfo:
    """How a checkpoint was quantized: the optional ``"quantizer"`` object of the metadata.

    Informative only (the tensors mean the same whatever made them), so a reader never refuses a
    file for it: an absent or malformed object reads as ``None``, unknown keys are kept.

    Attributes:
        method: One of :data:`QUANTIZATION_METHODS`, or another string a later writer used.
            Objects written before the field existed (by the calibrated quantizer, the only one
            then) have none and read as ``"calibrated"``.
        options: The quantizer's settings (rank, precision, smoothing, ...), as it wrote them.
        calibration: Where the calibration inputs came from (calibrated only).
        extra: Any other keys of the object, kept as they are.
    """

    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored under :data:`QUANTIZER_KEY`."""
        out: dict[str, Any] = dict(self.extra)
        out["method"] = self.method
        out["options"] = dict(self.options)
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    @classmethod
    def from_json(cls, obj: Any) -> QuantizerInfo | None:
        """Read the object leniently: ``None`` when it is absent or not an object."""
        if not isinstance(obj, Mapping):
            return None
        method = obj.get("method", "calibrated")
        options = obj.get("options")
        calibration = obj.get("calibration")
        return cls(
            method=method if isinstance(method, str) else "calibrated",
            options=dict(options) if isinstance(options, Mapping) else {},
            calibration=dict(calibration) if isinstance(calibration, Mapping) else None,
            extra={k: v for k, v in obj.items() if k not in ("method", "options", "calibration")},
        )


#: The roles of an SVDQ layer held in its compute dtype (``LayerSpec.dtype``): a load in another
#: compute dtype casts them; the 4-bit codes and their scales never are.
COMPUTE_ROLES: frozenset[str] = frozenset({"smooth", "lora_down", "lora_up", "bias"})


@dataclasses.dataclass
class FormatMetadata:
    """File-level SVDQuant metadata: what the ``"svdquant"`` JSON string holds.

    Attributes:
        layers: Layer prefix → manifest entry, for every quantized linear in the file.
        format_version: Integer schema version the metadata was read with (a writer gives the
            file :meth:`required_version` instead: the lowest version its content needs).
        layout: Named on-disk layout (:data:`LAYOUT`).
        producer: Who wrote the file, e.g. ``{"name": "svdquant", "version": "0.1.0"}``.
        extra: Further JSON-able fields (base model, quantizer settings, ...); kept on
            read, written back unchanged.
    """

    layers: dict[str, LayerSpec]
    format_version: int = FORMAT_VERSION
    layout: str = LAYOUT
    producer: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def quantizer(self) -> QuantizerInfo | None:
        """How the checkpoint was quantized (the optional ``"quantizer"`` object), if recorded."""
        return QuantizerInfo.from_json(self.extra.get(QUANTIZER_KEY))

    @property
    def features(self) -> list[str]:
        """The format features (:data:`FEATURES`) the layers use, sorted."""
        return sorted(set().union(*(spec.features for spec in self.layers.values())))

    def required_version(self) -> int:
        """The lowest ``format_version`` that expresses these layers: 1 unless a feature needs more."""
        return max([1] + [FEATURES[f] for f in self.features])

    def to_json(self) -> dict[str, Any]:
        """The JSON object (``quant_method`` included), layers sorted by name; ``format_version``
        is :meth:`required_version` and ``features`` lists what the layers use (omitted if none)."""
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "features"}
        out.update(
            {
                "quant_method": QUANT_METHOD,
                "format_version": self.required_version(),
                "layout": self.layout,
                "producer": dict(self.producer),
                "layers": {name: self.layers[name].to_json() for name in sorted(self.layers)},
            }
        )
        if self.features:
            out["features"] = self.features
        return out

    def dumps(self) -> str:
        """Compact, deterministic JSON text (what goes into ``__metadata__``)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: Any, *, file: str | None = None) -> FormatMetadata:
        """Parse the JSON object; refuses newer versions and unknown layouts."""
        if not isinstance(obj, Mapping):
            raise ManifestError(file, METADATA_KEY, f"metadata must be a JSON object, got {_jtype(obj)}")
        version = obj.get("format_version")
        if version is None:
            raise ManifestError(file, "format_version", "missing")
        if not _is_int(version) or version < 1:
            raise ManifestError(file, "format_version", f"must be a positive integer, got {version!r}")
        features = obj.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ManifestError(file, "features", "must be a list of strings")
        unknown = [f for f in features if f not in FEATURES]
        if version > FORMAT_VERSION:
            uses = f" (features: {', '.join(features)})" if features else ""
            raise VersionError(
                file,
                "format_version",
                f"file has format_version {version}{uses}, this svdquant reads up to {FORMAT_VERSION}: "
                "upgrade svdquant (pip install -U svdquant)",
            )
        if unknown:
            raise VersionError(
                file,
                "features",
                f"file uses format feature {', '.join(map(repr, unknown))}, which this svdquant does not implement "
                f"(it knows {', '.join(sorted(FEATURES))}): upgrade svdquant (pip install -U svdquant)",
            )
        method = obj.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ManifestError(file, "quant_method", f"expected {QUANT_METHOD!r}, got {method!r}")
        layout = obj.get("layout")
        if layout != LAYOUT:
            raise ManifestError(file, "layout", f"unknown layout {layout!r} (expected {LAYOUT!r})")
        producer = obj.get("producer", {})
        if not isinstance(producer, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in producer.items()
        ):
            raise ManifestError(file, "producer", "must be an object of strings")
        layers_obj = obj.get("layers")
        if not isinstance(layers_obj, Mapping):
            raise ManifestError(file, "layers", f"must be a JSON object, got {_jtype(layers_obj)}")
        layers = {
            str(name): LayerSpec.from_json(entry, where=str(name), file=file)
            for name, entry in layers_obj.items()
        }
        for name, spec in layers.items():
            for feature in sorted(spec.features):
                if feature not in features or version < FEATURES[feature]:
                    raise ManifestError(
                        file,
                        name,
                        f"uses {feature}, which needs format_version >= {FEATURES[feature]} and {feature!r} in "
                        f"the file's features (has format_version {version}, features {features})",
                    )
        known = {"quant_method", "format_version", "layout", "producer", "layers", "features"}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(
            layers=layers,
            format_version=int(version),
            layout=str(layout),
            producer=dict(producer),
            extra=extra,
        )

    @classmethod
    def loads(cls, text: str, *, file: str | None = None) -> FormatMetadata:
        """Parse the JSON text stored under ``__metadata__["svdquant"]``."""
        try:
            obj = jsonsafe.loads(text)  # duplicate keys, NaN/Infinity, deep nesting refused
        except ValueError as exc:
            raise ManifestError(file, METADATA_KEY, f"metadata is not valid JSON ({exc})") from None
        return cls.from_json(obj, file=file)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number" if not (isinstance(value, float) and math.isnan(value)) else "NaN"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, Mapping) else type(value).__name__
