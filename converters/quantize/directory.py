"""Model directories in and out: what ``svdq quantize SRC OUT`` does, as a function."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from svdq_format.errors import QuantizationError
from svdq_format.model import DEFAULT_MAX_SHARD_SIZE, save_pretrained
from svdq_format.outputs import check_output
from svdq_format.spec import QUANTIZER_KEY, QuantizerInfo

from .calibration import capture_pipeline_inputs, load_calibration
from .distributed import DistContext, rank_device
from .memory import memory_report
from .options import QuantizeOptions
from .pipeline import QuantizeResult, run_quantization
from .source import DTYPES, check_model_dir, dtype_kwargs, load_diffusers_model, loading_bars
from .state import block_file_reader
from .streaming import load_lazy

__all__ = ["STATE_DIR", "FIDELITY_NAME", "quantize_directory"]

#: Resumable state, inside the output directory (removed when the checkpoint is complete).
STATE_DIR = ".svdq-state"
FIDELITY_NAME = "fidelity.json"


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
    overwrite: bool = False,
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
        overwrite: Replace the model of a non-empty ``out`` (else refused unless it holds only
            an interrupted run's resume state; :func:`svdq_format.outputs.check_output`).

    ``fidelity.json`` reports each rank's peak host RSS and peak GPU memory
    (``environment.memory_per_rank``; rank 0's peak includes writing the checkpoint).
    """
    opts = options or QuantizeOptions()
    if dist is not None:
        device = rank_device(device, dist)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_model_dir(src)  # a missing or wrong SRC is named before OUT is looked at
    calib_path = calibration if isinstance(calibration, (str, os.PathLike)) else None
    out_dir = check_output(out, [src, calib_path], directory=True, overwrite=overwrite)
    source = None
    start = time.time()
    if isinstance(calibration, (str, os.PathLike)) and os.fspath(calibration) != "synthetic":
        calibration = load_calibration(calibration)  # a bad file fails before any model load or OUT
    phases: dict[str, float] = {}  # seconds before the quantizer runs: loading, the pipeline's capture
    if offload == "disk" and prompts:
        raise QuantizationError(
            "--offload disk reads the transformer from SRC; calibrate with a file instead of --prompts"
        )
    if prompts:
        from diffusers import DiffusionPipeline

        if not (Path(src) / "model_index.json").is_file():
            parent = Path(src).resolve().parent
            hint = f" (its parent {parent} is one)" if (parent / "model_index.json").is_file() else ""
            raise QuantizationError(
                f"{src}: --prompts runs the whole pipeline, so SRC must be a pipeline directory with "
                f"model_index.json, not a transformer folder{hint}"
            )
        if dtype not in DTYPES:
            raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        try:
            with loading_bars(progress):
                pipe = DiffusionPipeline.from_pretrained(src, use_safetensors=True,  # never a pickle
                                                         **dtype_kwargs(DTYPES[dtype])).to(device)
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
        if dtype not in DTYPES:
            raise QuantizationError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        model, source = load_lazy(src, dtype=DTYPES[dtype])
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
