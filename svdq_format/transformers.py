"""transformers integration: ``quant_method: "svdquant"`` for every transformers model class.

A pipeline's text encoders (T5, CLIP, Qwen2.5-VL, Gemma ...) are transformers models. Importing
:mod:`svdq_format` registers :class:`SVDQuantHfConfig` and :class:`SVDQuantHfQuantizer` into
transformers' quantizer registry (``transformers.quantizers.auto``: ``AUTO_QUANTIZER_MAPPING`` /
``AUTO_QUANTIZATION_CONFIG_MAPPING``, the registry ``register_quantizer`` fills), lazily, when
transformers' registry is first imported — as :mod:`svdq_format.diffusers` does for diffusers
(:mod:`svdq_format._autoregister`). After that the usual calls work::

    import svdq_format  # noqa: F401  (registers the backend)
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained("out/text_encoder_2")   # SVDQ linears, bit-exact codes
    encoder.save_pretrained("again/")                                # the svdquant layout again

and ``DiffusionPipeline.from_pretrained`` loads a pipeline whose text encoders were quantized.

Loading is driven by ``config.json``'s ``quantization_config`` (the format metadata with the
manifest): before any weight is read the named linears become
:class:`~svdq_format.linear.SVDQLinear` on the meta device, every shard header is checked
against its manifest and the checkpoint's keys must match the model's exactly (missing or
unexpected tensors raise :class:`~svdq_format.errors.TensorError`); transformers then reads the
tensors. 4-bit codes and scales keep their stored dtypes (also where the model keeps modules in
float32, T5's ``wo``); the SVDQ layers compute in the loading dtype. ``save_pretrained`` writes
``model.safetensors`` (or shards + index) in the svdquant layout (one layer never straddles two
shards, each shard carries its layers' manifest) and ``config.json``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import quantizer_plugin as plugin
from .checkpoint import check_key_sets, check_manifests_agree, read_checkpoint_files, with_compute_dtype
from .errors import UnsupportedError
from .io import aligned
from .linear import SVDQLinear
from .model import TRANSFORMERS_WEIGHTS_NAME, replace_linears
from .model import save_pretrained as save
from .spec import COMPUTE_ROLES, FLOAT_DTYPES, FORMAT_VERSION, LAYOUT, QUANT_METHOD, FormatMetadata, dtype_name

__all__ = ["SVDQuantHfConfig", "SVDQuantHfQuantizer", "register", "attach_quantizer", "save_pretrained",
           "no_dense_weight"]

class SVDQuantHfConfig(plugin.MetadataConfigMixin, QuantizationConfigMixin):
    """The ``quantization_config`` of an SVDQuant transformers model: the format metadata.

    Same JSON as diffusers' :class:`~svdq_format.diffusers.SVDQuantConfig` (docs/format.md):
    ``quant_method``, ``format_version``, ``layout``, ``producer``, ``layers`` and extra fields,
    validated on construction.

    Raises:
        ManifestError / VersionError: the metadata is invalid or too new.
    """

    def __init__(
        self,
        layers: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        layout: str = LAYOUT,
        producer: dict[str, str] | None = None,
        quant_method: str = QUANT_METHOD,
        **extra: Any,
    ) -> None:
        self.metadata = plugin.config_metadata(layers, format_version, layout, producer, quant_method, extra)
        # transformers types quant_method as its own QuantizationMethod enum; the registry key is a str
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]


class SVDQuantHfQuantizer(plugin.PreQuantizedMixin, HfQuantizer):
    """transformers quantizer for pre-quantized SVDQuant checkpoints (loading and saving).

    Quantizing while loading is not supported: quantize with the svdquant converters
    (``svdq quantize PIPELINE OUT --components text_encoder_2``) and load the result.
    """

    requires_calibration = True
    quantization_config: SVDQuantHfConfig

    def __init__(self, quantization_config: SVDQuantHfConfig, **kwargs: Any) -> None:
        plugin.refuse_dense_load(kwargs, "svdquant cannot quantize a model while loading it: quantize it with the "
                                 "svdquant converters (svdq quantize) and load the result")
        super().__init__(quantization_config, **kwargs)
        self._compute_dtype: str | None = None
        self._dtypes: dict[str, torch.dtype] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to check: the reference backend runs everywhere."""

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The loading dtype becomes the compute dtype of the SVDQ layers (their smooth, low-rank
        and bias tensors are cast to it; 4-bit codes and scales never are)."""
        if isinstance(dtype, torch.dtype) and dtype_name(dtype) in FLOAT_DTYPES:
            self._compute_dtype = dtype_name(dtype)
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # the loading core's checks (svdq_format.checkpoint); transformers reads the tensors itself
        meta = self.quantization_config.metadata
        files = [os.fspath(f) for f in kwargs.get("checkpoint_files") or [] if isinstance(f, (str, os.PathLike))]
        where = files[0] if files else "quantization_config"
        stored: dict[str, str] | None = None
        if files and all(f.endswith(".safetensors") for f in files):
            headers, files_meta = read_checkpoint_files(files)
            check_manifests_agree(where, meta.layers, files_meta.layers)
            stored = {key: entry.dtype for h in headers for key, entry in h.tensors.items()}
        replace_linears(model, with_compute_dtype(meta.layers, self._compute_dtype), device="meta", file=where)
        no_dense_weight(model)
        # the dtype each SVDQ tensor loads in: compute tensors in the compute dtype, the rest as stored
        self._dtypes = {}
        for name, mod in model.named_modules():
            if isinstance(mod, SVDQLinear):
                for role, t in mod.state_dict().items():
                    key = f"{name}.{role}"
                    keep = stored is not None and key in stored and role not in COMPUTE_ROLES
                    self._dtypes[key] = getattr(torch, stored[key]) if keep and stored is not None else t.dtype
        if stored is not None:  # (tied copies are not stored: transformers ties them again)
            expected = set(model.state_dict()) - (_tied_copies(model) - set(stored))
            check_key_sets(expected, dict.fromkeys(stored, where), where=where, model_name=type(model).__name__)
        return model

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """SVDQ tensors load in their layer's dtypes (also inside modules kept in float32)."""
        targets = getattr(converter, "target_patterns", None) or []
        own = self._dtypes.get(targets[0]) if len(targets) == 1 else None
        return own if own is not None else super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # 64-byte aligned tensors (SVDQ layers and the 16-bit rest): BLAS rounds exactly as on the
        # saved model (bit-identical outputs); transformers may hand out views of a mapped file
        with torch.no_grad():
            for mod in model.modules():
                for role, t in list(mod._buffers.items()):
                    if t is not None:
                        mod._buffers[role] = aligned(t)
                for p in mod._parameters.values():
                    if p is not None and p.data_ptr() % 64:
                        p.data = p.data.clone()
        _install_save_pretrained(model)
        return model

    def is_serializable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return plugin.dequantize(model)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], *, is_main_process: bool = True,
                    max_shard_size: int | str = "5GB", safe_serialization: bool = True, variant: str | None = None,
                    push_to_hub: bool = False, **kwargs: Any) -> None:
    """``PreTrainedModel.save_pretrained`` for SVDQuant models: ``config.json`` (with
    ``quantization_config``) and ``model.safetensors`` (or shards + index) in the svdquant layout."""
    plugin.refuse_save_options(safe_serialization=safe_serialization, variant=variant)
    if push_to_hub:
        raise UnsupportedError("push_to_hub: save, then svdq push (svdq_format.hub.push_to_hub)")
    if not is_main_process:
        return
    config: Any = getattr(model, "config")
    cfg = json.loads(config.to_json_string(use_diff=False))
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    quantizer = getattr(model, "hf_quantizer", None)
    extra = quantizer.quantization_config.metadata.extra if isinstance(quantizer, SVDQuantHfQuantizer) else {}
    save(model, save_directory, max_shard_size=max_shard_size, config=cfg, metadata=extra,
         weights_name=TRANSFORMERS_WEIGHTS_NAME, skip=_tied_copies(model))


def _tied_copies(model: nn.Module) -> set[str]:
    """State-dict keys transformers ties to another on load (``shared`` ↔ ``encoder.embed_tokens``),
    which it does not store either."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set()


def _install_save_pretrained(model: nn.Module) -> None:
    # An instance attribute: pipelines call ``component.save_pretrained`` and get this one.
    setattr(model, "save_pretrained", functools.wraps(save_pretrained)(functools.partial(save_pretrained, model)))
    no_dense_weight(model)


def no_dense_weight(model: nn.Module) -> None:
    """Give every SVDQ layer of a transformers model a stand-in ``weight``: an empty tensor of the
    layer's compute dtype (an instance attribute, not in the state dict).

    Some modelling code reads a linear's ``.weight`` for its dtype (T5's feed-forward casts its
    input to ``wo.weight.dtype``); an SVDQ layer has no dense weight. The stand-in is marked as
    initialised, so transformers' weight initialisation leaves it alone.
    """
    for mod in model.modules():
        if isinstance(mod, SVDQLinear):
            stand_in = torch.empty(0, dtype=mod.dtype)
            setattr(stand_in, "_is_hf_initialized", True)
            mod.__dict__["weight"] = stand_in


def attach_quantizer(model: nn.Module, meta: FormatMetadata) -> SVDQuantHfQuantizer:
    """Mark a transformers model holding SVDQ layers as svdquant-quantized (``hf_quantizer``,
    ``is_quantized``, ``config.quantization_config``, our ``save_pretrained``), as
    ``from_pretrained`` leaves one it loaded."""
    quantizer = SVDQuantHfQuantizer(SVDQuantHfConfig.from_metadata(meta), pre_quantized=True)
    dtypes = {spec.dtype for spec in meta.layers.values()}
    if len(dtypes) == 1:
        quantizer._compute_dtype = next(iter(dtypes))
    plugin.mark_quantized(model, quantizer, QUANT_METHOD)
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = quantizer.quantization_config
    _install_save_pretrained(model)
    return quantizer


def register() -> None:
    """Add ``"svdquant"`` to transformers' quantizer and config mappings (idempotent)."""
    from transformers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SVDQuantHfQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SVDQuantHfConfig


register()
