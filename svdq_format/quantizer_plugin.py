"""What the diffusers and transformers quantizer plug-ins share (one implementation for both).

:class:`MetadataConfigMixin` is the ``quantization_config`` whose JSON is the format metadata
(:class:`~svdq_format.spec.FormatMetadata`): construction from the JSON fields, ``to_dict``,
equality, iteration, ``repr``. :class:`PreQuantizedMixin` holds the quantizer properties that
are the same in both libraries. The helpers below are the steps both plug-ins take alike:
refusing what a quantized model cannot be loaded or saved as, dequantizing, marking a model as
quantized. :mod:`svdq_format.diffusers` and :mod:`svdq_format.transformers` add what differs
(each library's base class, its hooks and its ``save_pretrained``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from torch import nn

from .errors import UnsupportedError
from .model import set_submodule, svdq_modules
from .spec import FormatMetadata

__all__ = ["MetadataConfigMixin", "PreQuantizedMixin", "config_metadata", "refuse_dense_load",
           "refuse_save_options", "dequantize", "mark_quantized"]


def config_metadata(layers: dict[str, Any] | None, format_version: int, layout: str,
                    producer: dict[str, str] | None, quant_method: Any, extra: dict[str, Any]) -> FormatMetadata:
    """The format metadata a ``quantization_config``'s fields describe (validated).

    Raises:
        ManifestError / VersionError: the metadata is invalid or too new.
    """
    obj = dict(extra)
    obj.update(quant_method=str(getattr(quant_method, "value", quant_method)), format_version=format_version,
               layout=layout, producer=dict(producer or {}), layers=dict(layers or {}))
    return FormatMetadata.from_json(obj, file="quantization_config")

_Config = TypeVar("_Config", bound="MetadataConfigMixin")


class MetadataConfigMixin:
    """A ``quantization_config`` holding the format metadata in :attr:`metadata` (its JSON)."""

    metadata: FormatMetadata

    @classmethod
    def from_metadata(cls: type[_Config], meta: FormatMetadata) -> _Config:
        """The config describing ``meta``."""
        return cls(**meta.to_json())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``quantization_config``."""
        return self.metadata.to_json()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        # the same plug-in's config (either may be a subclass of the other) describing the same JSON
        same_kind = isinstance(other, type(self)) or isinstance(self, type(other))
        return same_kind and isinstance(other, MetadataConfigMixin) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        n = len(self.metadata.layers)
        return f"{type(self).__name__}(format_version={self.metadata.format_version}, layers={n})"


class PreQuantizedMixin:
    """Quantizer properties the same in both libraries: an SVDQuant model is not trainable and
    compiles (its SVDQ layers are plain torch ops or registered custom ops)."""

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def refuse_dense_load(kwargs: dict[str, Any], message: str) -> None:
    """Refuse a quantizer asked to quantize a dense model while loading (``pre_quantized=False``).

    Raises:
        UnsupportedError: ``message``.
    """
    if not kwargs.get("pre_quantized", True):
        raise UnsupportedError(message)


def refuse_save_options(*, safe_serialization: bool, variant: str | None) -> None:
    """Refuse the ``save_pretrained`` options an svdquant model cannot be saved with.

    Raises:
        UnsupportedError: not safetensors, or a weights variant (one line).
    """
    if not safe_serialization:
        raise UnsupportedError("svdquant models are saved as safetensors only (safe_serialization=True)")
    if variant is not None:
        raise UnsupportedError(f"variant={variant!r} is not supported for svdquant models")


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every SVDQ layer of ``model`` by its dense ``nn.Linear`` and drop our ``save_pretrained``."""
    for name, layer in svdq_modules(model).items():
        set_submodule(model, name, layer.to_linear())
    model.__dict__.pop("save_pretrained", None)
    return model


def mark_quantized(model: nn.Module, quantizer: Any, method: Any) -> None:
    """Set what ``from_pretrained`` leaves on a quantized model: ``is_quantized``,
    ``quantization_method`` and ``hf_quantizer``."""
    # setattr: nn.Module types its attributes as tensors and submodules
    setattr(model, "is_quantized", True)
    setattr(model, "quantization_method", method)
    setattr(model, "hf_quantizer", quantizer)
