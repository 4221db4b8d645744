"""Model directories in and out: what ``svdq quantize SRC OUT`` does, as a function."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError
from svdq_format.model import DEFAULT_MAX_SHARD_SIZE, save_pretrained
from svdq_format.spec import QUANTIZER_KEY, QuantizerInfo

from .memory import memory_report
from .options import QuantizeOptions
from .pipeline import QuantizeResult, run_quantization

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["STATE_DIR", "FIDELITY_NAME", "check_model_dir", "load_diffusers_model", "quantize_directory"]

#: Resumable state, inside the output directory (removed when the checkpoint is complete).
STATE_DIR = ".svdq-state"
FIDELITY_NAME = "fidelity.json"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a load dtype: ``dtype`` where diffusers takes it (newer
    releases deprecate ``torch_dtype`` with a warning), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """diffusers' and transformers' own loading progress bars off unless ``enabled``; restored after."""
    import importlib

    loggers = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            loggers.append(importlib.import_module(name))
        except ImportError:
            continue
    was = [mod.is_progress_bar_enabled() for mod in loggers]
    if not enabled:
        for mod in loggers:
            mod.disable_progress_bar()
    try:
        yield
    finally:
        for mod, on in zip(loggers, was):
            (mod.enable_progress_bar if on else mod.disable_progress_bar)()


def check_model_dir(src: str | os.PathLike[str]) -> tuple[Any, Path]:
    """Check that ``src`` is a local diffusers model (or pipeline) directory, reading no weights.

    Returns:
        ``(diffusers model class, the directory holding its config.json)``.

    Raises:
        QuantizationError: missing directory, not a diffusers model, unknown class, already
            quantized.
    """
    import diffusers

    root = Path(src)
    if not root.exists():
        raise QuantizationError(f"{root}: no such directory")
    if not root.is_dir():
        raise QuantizationError(f"{root}: not a directory (give a diffusers model directory)")
    d = next((root / c for c in ("transformer", "unet") if (root / c / "config.json").is_file()), root)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise QuantizationError(f"{root}: not a diffusers model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise QuantizationError(f"{cfg_path}: not valid JSON ({exc})") from None
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise QuantizationError(f"{cfg_path}: _class_name {name!r} is not a diffusers model class")
    if isinstance(cfg, dict) and "quantization_config" in cfg:
        raise QuantizationError(f"{cfg_path}: the model is already quantized")
    return cls, d


def load_diffusers_model(src: str | os.PathLike[str], *, dtype: str = "bfloat16") -> tuple[nn.Module, Path]:
    """Load the transformer of a local diffusers model (or pipeline) directory.

    Args:
        src: A model directory (``config.json`` with ``_class_name``) or a pipeline directory
            with a ``transformer/`` subfolder.
        dtype: ``bfloat16``, ``float16`` or ``float32``.

    Returns:
        ``(model, the directory it was loaded from)``.

    Raises:
        QuantizationError: missing directory, not a diffusers model, unknown class, load error.
    """
    cls, d = check_model_dir(src)
    name = cls.__name__
    if dtype not in _DTYPES:
        raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    try:
        model = cls.from_pretrained(d, **dtype_kwargs(_DTYPES[dtype]))
    except Exception as exc:  # diffusers raises many types for broken directories
        raise QuantizationError(f"{d}: cannot load {name} ({' '.join(str(exc).split())[:200]})") from None
    return model.eval(), d


def quantize_directory(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    calibration: Any = "synthetic",
    prompts: Sequence[str] | None = None,
    num_samples: int = 8,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    options: QuantizeOptions | None = None,
    dtype: str = "bfloat16",
    device: str | None = None,
    offload: str | bool = "auto",
    progress: bool = True,
    keep_state: bool = False,
    deadline: float | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dist: DistContext | None = None,
    host_peak_reset: bool = False,
) -> QuantizeResult:
    """Quantize the diffusers transformer in ``src`` and write an SVDQuant model directory.

    ``out`` receives ``config.json`` (with ``quantization_config``), the weights
    (``diffusion_pytorch_model.safetensors``, or shards + index above ``max_shard_size``)
    and ``fidelity.json``. Progress is kept in
    ``out/.svdq-state`` so an interrupted run resumes where it stopped.

    Args:
        src: Local diffusers model or pipeline directory.
        out: Output directory.
        calibration: ``"synthetic"`` or a calibration safetensors file.
        prompts: Calibrate by running the pipeline in ``src`` on these prompts instead.
        num_samples: Number of calibration samples (synthetic / prompts).
        pipeline_kwargs: With ``prompts``: keyword arguments of every pipeline call (e.g.
            ``num_inference_steps`` — default 8 —, ``height``, ``width``, ``guidance_scale``).
        options: Quantizer options.
        dtype: Compute/storage dtype of the model.
        device: ``"cpu"``, ``"cuda"`` ... (default cuda when available).
        offload: Block streaming (see :func:`run_quantization`), or ``"disk"``: build the model
            on the meta device and read each block from the safetensors files of ``src`` when
            it is needed (:mod:`converters.quantize.streaming`; not with ``prompts``).
        progress: tqdm bars.
        keep_state: Keep the state directory after success.
        deadline: Stop starting new blocks after this ``time.time()`` (resume later).
        max_shard_size: Largest weight file, e.g. ``"5GB"``.
        dist: Process group context (several GPUs; see :mod:`converters.quantize.distributed`):
            work is split over the ranks, rank 0 writes ``out``.
        host_peak_reset: The caller reset the process's peak RSS just before (the CLI does):
            the reported host peaks are this run's own.

    ``fidelity.json`` reports each rank's peak host RSS and peak GPU memory
    (``environment.memory_per_rank``; rank 0's peak includes writing the checkpoint).
    """
    opts = options or QuantizeOptions()
    if dist is not None:
        from .distributed import rank_device

        device = rank_device(device, dist)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise QuantizationError(f"{out_dir}: exists and is not a directory")
    source = None
    start = time.time()
    if isinstance(calibration, (str, os.PathLike)) and os.fspath(calibration) != "synthetic":
        from .calibration import load_calibration

        calibration = load_calibration(calibration)  # a bad file fails before any model load or OUT
    phases: dict[str, float] = {}  # seconds before the quantizer runs: loading, the pipeline's capture
    if offload == "disk" and prompts:
        raise QuantizationError(
            "--offload disk reads the transformer from SRC; calibrate with a file instead of --prompts"
        )
    if prompts:
        from diffusers import DiffusionPipeline

        from .calibration import capture_pipeline_inputs

        check_model_dir(src)
        if not (Path(src) / "model_index.json").is_file():
            parent = Path(src).resolve().parent
            hint = f" (its parent {parent} is one)" if (parent / "model_index.json").is_file() else ""
            raise QuantizationError(
                f"{src}: --prompts runs the whole pipeline, so SRC must be a pipeline directory with "
                f"model_index.json, not a transformer folder{hint}"
            )
        if dtype not in _DTYPES:
            raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        try:
            with _loading_bars(progress):
                pipe = DiffusionPipeline.from_pretrained(src, **dtype_kwargs(_DTYPES[dtype])).to(device)
        except Exception as exc:
            raise QuantizationError(f"{src}: cannot load the pipeline for prompt calibration ({exc})") from None
        pipe.set_progress_bar_config(disable=not progress)
        phases["load"] = time.time() - start
        # the transformer's inputs are all that is kept: stop before the VAE decode
        call = {"output_type": "latent", **(pipeline_kwargs or {})}
        calibration = capture_pipeline_inputs(pipe, list(prompts), max_samples=num_samples, seed=opts.seed, **call)
        phases["pipeline_capture"] = time.time() - start - phases["load"]
        model = (getattr(pipe, "transformer", None) or pipe.unet).to("cpu")
        del pipe
    elif offload == "disk":
        from .streaming import load_lazy

        if dtype not in _DTYPES:
            raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        model, source = load_lazy(src, dtype=_DTYPES[dtype])
        offload = "blocks"
    else:
        model, _ = load_diffusers_model(src, dtype=dtype)
    phases.setdefault("load", time.time() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / STATE_DIR
    result = run_quantization(model, calibration, options=opts, device=device, offload=offload,
                              state_dir=state, num_samples=num_samples, progress=progress, deadline=deadline,
                              dist=dist, source=source, release=source is not None)
    if not result.complete:
        return result
    result.report.timings = {**{k: round(v, 3) for k, v in phases.items()}, **result.report.timings}
    info = QuantizerInfo(method="calibrated", options=opts.to_json(), calibration=result.report.calibration,
                         extra={"source": os.fspath(src)})
    extra = {QUANTIZER_KEY: info.to_json()}
    rank = 0 if dist is None else dist.rank
    mine = memory_report(device, rank=rank, host_reset=host_peak_reset)
    memory = [mine] if dist is None else dist.all_gather(mine, what="memory report")

    def write() -> None:
        if source is not None:  # layers released to meta: streamed from the block files
            from .pipeline import block_file_reader

            save_pretrained(result.model, out_dir, metadata=extra, max_shard_size=max_shard_size,
                            read_tensor=block_file_reader(state))
        else:
            save_pretrained(result.model.to("cpu"), out_dir, metadata=extra, max_shard_size=max_shard_size)
        result.report.timings["wall"] = round(time.time() - start, 3)
        memory[0] = memory_report(device, rank=0, host_reset=host_peak_reset)  # after the write
        result.report.environment["memory_per_rank"] = memory
        result.report.save(out_dir / FIDELITY_NAME)
        if not keep_state:
            shutil.rmtree(state, ignore_errors=True)

    if dist is None:
        write()
    else:  # one writer; every rank learns whether it succeeded
        dist.on_root(write, what="writing the checkpoint")
        result.report.timings["wall"] = round(time.time() - start, 3)
    return result
