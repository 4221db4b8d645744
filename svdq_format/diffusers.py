"""diffusers integration: ``quant_method: "svdquant"`` for every diffusers model class.

Importing :mod:`svdq_format` registers :class:`SVDQuantConfig` and :class:`SVDQuantizer` into
diffusers' auto mappings (lazily, when diffusers' quantizer registry is first imported; see
:mod:`svdq_format._autoregister`). After that the usual calls work on SVDQuant checkpoints::

    import svdq_format  # noqa: F401  (registers the backend)
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained("someone/flux-svdq-int4")  # or a directory
    model.save_pretrained("out/", max_shard_size="2GB")

Loading is driven by ``config.json``'s ``quantization_config`` (the format metadata, with the
manifest of every quantized linear): the named linears are swapped for
:class:`~svdq_format.linear.SVDQLinear` on the meta device before any weight is read, every
shard header is checked against its manifest, and the checkpoint's keys must match the
model's exactly (missing or unexpected tensors raise :class:`~svdq_format.errors.TensorError`).
diffusers then streams the shards one at a time to the target device; quantized tensors keep
their stored dtypes. ``save_pretrained`` writes the svdquant directory layout
(:func:`svdq_format.model.save_pretrained`): one layer never straddles two shards and every
shard carries the manifest of its own layers.

A dense checkpoint quantizes while it loads (data-free; :mod:`svdq_format.quantize_on_load`)::

    model = FluxTransformer2DModel.from_pretrained(
        "black-forest-labs/FLUX.1-dev", subfolder="transformer", torch_dtype=torch.bfloat16,
        device_map="cuda", quantization_config=SVDQuantConfig(precision="int4", rank=32))
"""

from __future__ import annotations

import functools
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from diffusers.utils.logging import is_progress_bar_enabled
from torch import nn

from . import fusion
from . import quantizer_plugin as plugin
from .checkpoint import (
    check_config,
    check_key_sets,
    check_layer_tensor,
    check_manifests_agree,
    check_model_values,
    check_shape,
    check_write_record,
    read_checkpoint_files,
    read_json,
    with_compute_dtype,
)
from .commit import SharedCommitLock
from .errors import HeaderError, MixedDirectoryError, UnsupportedError
from .hub_push import push_to_hub as publish
from .io import aligned, file_identity
from .linear import SVDQLinear
from .model import FILES_KEY, replace_linears, save_pretrained
from .quantize_on_load import OnLoadOptions, OnLoadQuantization
from .spec import (
    COMPUTE_ROLES,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    LAYOUT,
    QUANT_METHOD,
    FormatMetadata,
    dtype_from_name,
    dtype_name,
)

__all__ = ["SVDQuantMethod", "SVDQuantConfig", "SVDQuantizer", "register", "attach_quantizer"]


class SVDQuantMethod(str, Enum):
    """The ``quant_method`` value (an enum, as diffusers expects ``.value``)."""

    SVDQUANT = QUANT_METHOD


class SVDQuantConfig(plugin.MetadataConfigMixin, QuantizationConfigMixin):
    """The ``quantization_config`` of an SVDQuant model, in one of two forms.

    * **A quantized checkpoint's** (``layers`` given): the format metadata (docs/format.md), what
      ``config.json`` stores: ``quant_method``, ``format_version``, ``layout``, ``producer``,
      ``layers`` (the manifest) and any extra fields (``base_model``, ``quantizer``), validated on
      construction by :class:`~svdq_format.spec.FormatMetadata`.
    * **A request to quantize a dense checkpoint while loading it** (no ``layers``):
      ``SVDQuantConfig(precision="int4", rank=32, ...)`` with the options of
      :class:`~svdq_format.quantize_on_load.OnLoadOptions` (``precision``, ``rank``,
      ``w4a16_rank``, ``weight_only``, ``include``, ``exclude``, ``smoothing``, ``clip_search``,
      ``refine_iters``, ``seed``, ``device``), checked here. :attr:`request` holds them.

    Args:
        layers: Module name → manifest entry (JSON objects); ``None`` for a request.
        format_version: Format version of the checkpoint.
        layout: On-disk layout name.
        producer: Who wrote the checkpoint.
        quant_method: Must be ``"svdquant"``.
        **extra: Further metadata fields, kept as they are; for a request, its options.

    Raises:
        ManifestError / VersionError: the metadata is invalid or too new.
        UnsupportedError: a request's option is unknown or invalid (one line).
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
        #: The options of a request to quantize while loading (``None``: a checkpoint's config).
        self.request = OnLoadOptions.from_kwargs(**extra) if layers is None else None
        self.metadata = plugin.config_metadata(layers, format_version, layout, producer, quant_method,
                                        {} if layers is None else extra)
        # diffusers types quant_method as its own QuantizationMethod enum; any str enum works
        self.quant_method = SVDQuantMethod.SVDQUANT  # type: ignore[assignment]

    @property
    def layers(self) -> dict[str, Any]:
        """The manifest (``LayerSpec`` by module name)."""
        return self.metadata.layers

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``quantization_config`` (a request: its options)."""
        if self.request is not None:
            return {"quant_method": QUANT_METHOD, **self.request.to_json()}
        return super().to_dict()

    def __repr__(self) -> str:
        if self.request is not None:
            return f"SVDQuantConfig({', '.join(f'{k}={v!r}' for k, v in self.request.to_json().items())})"
        return super().__repr__()


def _owner(model: nn.Module, param_name: str) -> tuple[SVDQLinear | None, str]:
    module_name, _, role = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None, role
    return (module if isinstance(module, SVDQLinear) else None), role


class SVDQuantizer(plugin.PreQuantizedMixin, DiffusersQuantizer):
    """diffusers quantizer for SVDQuant checkpoints (loading and saving), and for dense ones
    quantized while they load (a request config: each hook delegates to
    :class:`~svdq_format.quantize_on_load.OnLoadQuantization`; afterwards the model is an
    ordinary SVDQuant model)."""

    requires_calibration = False
    required_packages = ["safetensors"]  # type: ignore[assignment]  # diffusers declares None
    quantization_config: SVDQuantConfig

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs: Any) -> None:
        request = getattr(quantization_config, "request", None)
        if request is None:
            plugin.refuse_dense_load(kwargs, "SVDQuantConfig(layers=...) describes a quantized checkpoint, and this "
                                     "one is dense: to quantize it while loading, pass SVDQuantConfig(precision=..., "
                                     "rank=...)")
        super().__init__(quantization_config, **kwargs)
        self.pre_quantized = request is None
        #: The quantize-while-loading run, until loading ends (``None`` for a quantized checkpoint).
        self.on_load = None if request is None else OnLoadQuantization(request, progress=is_progress_bar_enabled())
        self._files: list[str] = []
        self._identities: list[tuple[int, ...] | None] = []
        self._commit_lock: SharedCommitLock | None = None
        self._loaded_keys: list[str] | None = None
        self._compute_dtype: str | None = None  # set by an explicit torch_dtype

    # -- environment -------------------------------------------------------------------------

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """The reference backend runs everywhere; installs the pickle guard (:func:`guard_pickle_weights`)
        before diffusers resolves the weights file; quantizing while loading refuses disk offload."""
        guard_pickle_weights()
        if self.on_load is not None:
            self.on_load.check_device_map(kwargs.get("device_map"))

    # diffusers passes and accepts None (no torch_dtype) but annotates torch.dtype
    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:  # type: ignore[override]
        """Default dtype: the compute dtype of the quantized layers (when they agree).

        An explicit ``torch_dtype`` also becomes the compute dtype of the SVDQ layers: their
        16/32-bit tensors (smooth, low-rank branch, bias) are cast to it, the 4-bit codes and
        their scales stay exactly as stored. Quantizing while loading: bfloat16 by default.
        """
        if self.on_load is not None:
            return self.on_load.torch_dtype(torch_dtype)
        if torch_dtype is not None:
            if dtype_name(torch_dtype) not in FLOAT_DTYPES:
                raise UnsupportedError(f"torch_dtype {torch_dtype} is not one of {FLOAT_DTYPES}")
            self._compute_dtype = dtype_name(torch_dtype)
            return torch_dtype
        dtypes = {spec.dtype for spec in self.quantization_config.metadata.layers.values()}
        return dtype_from_name(dtypes.pop()) if len(dtypes) == 1 else None

    # -- loading -----------------------------------------------------------------------------

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._loaded_keys = list(loaded_keys)
        self._files = [os.fspath(f) for f in checkpoint_files if isinstance(f, (str, os.PathLike))]
        for f in self._files:  # shards: before diffusers reads any of them
            refuse_pickle_weights(f)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.on_load is not None:  # the plan: the linears stay until their weights arrive
            self.on_load.prepare(model, self._files)
            return model
        # the loading core's checks (svdq_format.checkpoint); diffusers reads the tensors itself
        meta = self.quantization_config.metadata
        where = self._files[0] if self._files else "quantization_config"
        if self._files and all(f.endswith(".safetensors") for f in self._files):
            # commits wait until the weights are read (after-hook); one that came since diffusers
            # read config.json is caught by the write record below
            self._commit_lock = SharedCommitLock(Path(self._files[0]).parent)
            headers, files_meta = read_checkpoint_files([Path(f) for f in self._files])
            self._identities = [h.identity for h in headers]
            for h in headers:  # a single file diffusers read already: the one whose header we check
                seen = _LOADED.pop(os.path.abspath(h.path), None)
                if seen is not None and seen != h.identity:
                    raise MixedDirectoryError(h.path, None, "the file was replaced while diffusers read it "
                                              "(another save committed meanwhile)")
            if FILES_KEY in meta.extra:  # the files are the set the config diffusers read committed
                check_write_record(Path(self._files[0]).parent, meta, headers)
            check_manifests_agree(where, meta.layers, files_meta.layers)
            cfg_path = Path(self._files[0]).parent / "config.json"
            if cfg_path.is_file():  # diffusers parsed it with json.loads: duplicate keys, nesting, sanity
                cfg = read_json(cfg_path)
                if isinstance(cfg, dict):
                    check_config({k: v for k, v in cfg.items() if k != "quantization_config"},
                                 {k: e.shape for h in headers for k, e in h.tensors.items()}, file=str(cfg_path))
        replace_linears(model, with_compute_dtype(meta.layers, self._compute_dtype), device="meta", file=where)
        if self._loaded_keys is not None:
            check_key_sets(model.state_dict(), dict.fromkeys(self._loaded_keys, where), where=where,
                           model_name=type(model).__name__)
        return model

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        if self.on_load is None:  # quantizing while loading: diffusers' own rules for the dense tensors
            check_key_sets(missing_keys, {}, where=None, model_name=type(model).__name__)
        return missing_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.on_load is not None:  # the planned weights: read by the run itself, group by group
            state_dict = self.on_load.placeholders(state_dict)
        # 64-byte aligned tensors: BLAS then rounds exactly as on the saved model (bit-identical outputs).
        return {k: aligned(v) if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}

    def check_if_quantized_param(self, model: nn.Module, param_value: Any, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        if self.on_load is not None:
            return self.on_load.wants(param_name)
        return _owner(model, param_name)[0] is not None

    def check_quantized_param_shape(self, param_name: str, current_param: Any, loaded_param: Any) -> bool:
        check_shape(None, param_name, loaded_param.shape, current_param.shape)  # (called on a mismatch: raises)
        return True

    # diffusers annotates the result as a Parameter, but ignores it (its own quantizers return None)
    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,  # type: ignore[override]
                               target_device: Any, state_dict: dict[str, Any],
                               unexpected_keys: list[str] | None = None, **kwargs: Any) -> None:
        """Put one SVDQ tensor in place exactly as stored (dtype and shape checked, no cast); or,
        quantizing while loading, hand a dense tensor to the run."""
        if self.on_load is not None:
            self.on_load.receive(model, param_name, target_device)
            return
        module, role = _owner(model, param_name)
        assert module is not None
        raw = state_dict.get(param_name, param_value)
        stored_spec = self.quantization_config.metadata.layers[param_name.rpartition(".")[0]]
        check_layer_tensor(None, param_name, stored_spec, role, dtype_name(raw.dtype), raw.shape)
        if role in COMPUTE_ROLES and self._compute_dtype is not None:
            raw = raw.to(dtype_from_name(self._compute_dtype))
        device = target_device if target_device is not None else "cpu"
        module._buffers[role] = aligned(raw).to(device)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.on_load is not None:  # from here on an ordinary SVDQuant model
            self.quantization_config = SVDQuantConfig.from_metadata(self.on_load.finish(model))
            self.on_load, self.pre_quantized = None, True
            register_to_config = getattr(model, "register_to_config", None)
            if register_to_config is not None:
                register_to_config(quantization_config=self.quantization_config)
        else:
            where = self._files[0] if self._files else "quantization_config"
            if self._commit_lock is not None:
                self._commit_lock.release()
                self._commit_lock = None
            for f, ident in zip(self._files, self._identities):  # no save renamed a file while diffusers read
                if ident is not None and file_identity(f) != ident:
                    raise MixedDirectoryError(f, None, "the file was replaced while diffusers read it "
                                              "(another save committed meanwhile)")
            check_model_values(model, self.quantization_config.metadata.layers, file=where)  # as load_pretrained
        _install_save_pretrained(model)
        return model

    def get_cuda_warm_up_factor(self) -> int:
        """Quantizing while loading: diffusers' allocator warm-up reserves ``numel / 8`` elements of
        the load dtype — an eighth of the dense model in 16 bits, less than the quantized model —
        instead of a quarter (its default)."""
        return 8 if self.on_load is not None else super().get_cuda_warm_up_factor()

    # -- properties --------------------------------------------------------------------------

    @property
    def supports_parallel_loading(self) -> bool:
        return self.on_load is None  # the run reads and quantizes group by group, in one thread

    @property
    def is_serializable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module) -> nn.Module:
        plugin.dequantize(model)
        register_to_config = getattr(model, "register_to_config", None)
        if register_to_config is not None:
            register_to_config(quantization_config=None)
        return model


def _save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    save_function: Any = None,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str = "10GB",
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``ModelMixin.save_pretrained`` for SVDQuant models (same arguments, svdquant layout)."""
    plugin.refuse_save_options(safe_serialization=safe_serialization, variant=variant)
    if not is_main_process:
        return
    quantizer = getattr(model, "hf_quantizer", None)
    extra = quantizer.quantization_config.metadata.extra if quantizer is not None else {}
    save_pretrained(model, save_directory, max_shard_size=max_shard_size, metadata=extra)
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        publish(save_directory, repo_id, private=kwargs.pop("private", None), token=kwargs.pop("token", None),
              commit_message=kwargs.pop("commit_message", None), create_pr=kwargs.pop("create_pr", False))


def _install_save_pretrained(model: nn.Module) -> None:
    # An instance attribute: pipelines call ``component.save_pretrained`` and get this one.
    # (setattr: nn.Module types its attributes as tensors and submodules)
    setattr(model, "save_pretrained", functools.wraps(_save_pretrained)(functools.partial(_save_pretrained, model)))
    # and diffusers' fuse_qkv_projections() fuses the SVDQ projections (svdq_format.fusion)
    fusion.install(model)


def attach_quantizer(model: nn.Module, meta: FormatMetadata) -> SVDQuantizer:
    """Mark a diffusers model holding SVDQ layers as svdquant-quantized.

    For models built outside ``from_pretrained`` (by the converters or
    :func:`svdq_format.pretrained.load_pretrained`): sets ``hf_quantizer``, ``is_quantized`` and the
    config's ``quantization_config``, so ``save_pretrained``/``push_to_hub`` and pipelines treat
    the model like one loaded by diffusers.
    """
    quantizer = SVDQuantizer(SVDQuantConfig.from_metadata(meta), pre_quantized=True)
    plugin.mark_quantized(model, quantizer, quantizer.quantization_config.quant_method)
    register_to_config = getattr(model, "register_to_config", None)
    if register_to_config is not None:
        register_to_config(quantization_config=quantizer.quantization_config)
    _install_save_pretrained(model)
    return quantizer


def refuse_pickle_weights(file: str | os.PathLike[str]) -> None:
    """Refuse an SVDQuant model's weights file that is not safetensors (diffusers would unpickle it).

    Raises:
        HeaderError: ``<file>: not safetensors: svdquant never loads pickles ...`` (one line).
    """
    name = os.fspath(file)
    if name.endswith(".safetensors"):
        return
    raise HeaderError(name, None, "weights are not safetensors: svdquant never loads pickles (unpickling can run "
                      "arbitrary code); an SVDQuant model's weights are .safetensors files")


def _svdquant_config_beside(file: str) -> bool:
    cfg = Path(file).parent / "config.json"
    try:
        obj = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return False
    qc = obj.get("quantization_config") if isinstance(obj, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


#: Single weight files diffusers' loader read (absolute path → identity), for the hooks' check.
_LOADED: dict[str, tuple[int, ...]] = {}


def guard_pickle_weights() -> None:
    """Make diffusers' single-file weight loader refuse pickles of SVDQuant models (idempotent).

    For a non-sharded model, diffusers' ``from_pretrained`` reads the weights file
    (``torch.load(weights_only=True)`` for a ``.bin``) *before* any quantizer hook sees its name,
    so the hooks cannot refuse it in time. This wraps ``diffusers.models.modeling_utils.load_state_dict``:
    a weights file that is not ``.safetensors`` next to a ``config.json`` whose
    ``quantization_config`` is svdquant is refused (:func:`refuse_pickle_weights`) before it is
    opened; every other file goes to diffusers' own function unchanged. Sharded models are
    refused by :meth:`SVDQuantizer.maybe_update_loaded_keys`, which sees the shard names first.
    """
    from diffusers.models import modeling_utils

    inner = modeling_utils.load_state_dict
    if getattr(inner, "_svdquant_guard", False):
        return

    def load_state_dict(checkpoint_file: Any, *args: Any, **kwargs: Any) -> Any:
        ours = isinstance(checkpoint_file, (str, os.PathLike)) and _svdquant_config_beside(os.fspath(checkpoint_file))
        if not ours:
            return inner(checkpoint_file, *args, **kwargs)
        refuse_pickle_weights(checkpoint_file)
        lock = SharedCommitLock(Path(checkpoint_file).parent)  # no commit while the file is read
        try:
            before = file_identity(checkpoint_file)
            state = inner(checkpoint_file, *args, **kwargs)
        finally:
            lock.release()
        if file_identity(checkpoint_file) != before:
            raise MixedDirectoryError(os.fspath(checkpoint_file), None, "the file was replaced while diffusers "
                                      "read it (another save committed meanwhile)")
        _LOADED[os.path.abspath(checkpoint_file)] = before  # checked against the header the hooks read
        return state

    load_state_dict._svdquant_guard = True  # type: ignore[attr-defined]  # marks the wrapper
    modeling_utils.load_state_dict = load_state_dict


def register() -> None:
    """Add ``"svdquant"`` to diffusers' quantizer and config mappings (idempotent)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SVDQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SVDQuantConfig


register()
