"""``run_quantization``: any ``nn.Module`` made of linears → SVDQuant layers in place, resumably.

The steps, each a module of its own:

1. **select** the layers (:mod:`~converters.quantize.selection`);
2. **place** the model: where it computes, whether blocks stream (:mod:`~converters.quantize.blocks`);
3. **check** the selected weights are finite;
4. **resume**: open the state dir — its fingerprint must match (:mod:`~converters.quantize.state`);
5. **calibrate**: input statistics, saved there (:mod:`~converters.quantize.calibrate`);
   then, before any layer is quantized, GPTQ's row check (:mod:`~converters.quantize.gptq`) and
   the rank allocation (:mod:`~converters.quantize.rank_allocation`, saved there too);
6. **quantize the blocks**: each block's input groups → ``SVDQLinear`` modules, written to the
   state dir block by block (:mod:`~converters.quantize.block_loop`; several processes:
   :mod:`~converters.quantize.distributed_blocks`);
7. **report** fidelity, timings, memory (:mod:`~converters.quantize.report`).

A run that is interrupted (Ctrl-C, a deadline, a crash) resumes from the state dir with
bit-identical results: every block depends only on the original weights, the saved statistics
and a per-layer seed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError
from svdq_format.model import model_metadata
from svdq_format.pretrained import attach_svdquant
from svdq_format.spec import QUANTIZER_KEY, QuantizerInfo

from .block_loop import quantize_blocks
from .blocks import Placement, decide_placement, linear_at
from .calibrate import calibrate
from .distributed import DistContext
from .distributed_blocks import quantize_blocks_distributed
from .gptq import check_gptq_rows
from .options import QuantizeOptions
from .rank_allocation import RankPlan, plan_ranks
from .report import FidelityReport, environment_info
from .selection import Selection, select_layers
from .state import fingerprint, open_state
from .streaming import ShardedSource
from .timing import PhaseTimer

__all__ = ["QuantizeResult", "run_quantization", "quantize_model", "mark_quantized"]


@dataclasses.dataclass
class QuantizeResult:
    """Outcome of :func:`run_quantization`.

    Attributes:
        model: The model, with ``SVDQLinear`` layers for every finished block.
        report: The fidelity report (layers done so far).
        complete: False when the run stopped early (deadline); rerun with the same state dir.
        selection: Which layers were chosen and which were kept 16-bit.
    """

    model: nn.Module
    report: FidelityReport
    complete: bool
    selection: Selection


def _select(model: nn.Module, opts: QuantizeOptions) -> Selection:
    selection = select_layers(model, include=opts.include, exclude=opts.exclude, weight_only=opts.weight_only,
                              target=opts.target, precision=opts.precision)
    if not selection.kinds:
        why = (
            f" ({len(selection.skipped)} candidates kept 16-bit, e.g. {next(iter(selection.skipped.items()))})"
            if selection.skipped
            else ""
        )
        raise QuantizationError(f"{type(model).__name__}: no linear layer can be quantized{why}")
    if opts.target == "nunchaku":
        dtypes = {linear_at(model, n).weight.dtype for n in selection.kinds}
        if not dtypes <= {torch.bfloat16, torch.float16}:
            raise QuantizationError(
                f"target nunchaku: Nunchaku runs bfloat16 or float16 models, this one has {sorted(map(str, dtypes))} "
                "linears: load it in bfloat16 (svdq quantize --dtype bfloat16, or torch_dtype=torch.bfloat16)"
            )
    return selection


def _check_weights(model: nn.Module, selection: Selection) -> None:
    """Before calibration: a NaN weight would surface downstream (meta weights: checked when read)."""
    for name in selection.kinds:
        w = linear_at(model, name).weight
        if not w.is_meta and not bool(torch.isfinite(w).all()):
            raise QuantizationError(f"layer {name}: weight contains NaN or inf")


def _report(infos: list[dict[str, Any]], selection: Selection, opts: QuantizeOptions, timer: PhaseTimer,
            calib_info: dict[str, Any], place: Placement, dist: DistContext | None,
            per_rank: list[int] | None, rank_plan: RankPlan | None) -> FidelityReport:
    dev = place.device
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    report = FidelityReport(
        layers=infos,
        skipped=dict(selection.skipped),
        options=opts.to_json(),
        timings={k: round(v, 4) for k, v in timer.seconds.items()},
        calibration=calib_info,
        environment=environment_info(dev),
        peak_memory_bytes=int(peak),
        rank_allocation=None if rank_plan is None else rank_plan.summary(opts.rank),
    )
    if dist is not None:
        report.environment.update({"world_size": dist.world_size, "rank": dist.rank, "backend": dist.backend,
                                   "groups_per_rank": per_rank})
    return report


def run_quantization(
    model: nn.Module,
    calibration: Any,
    *,
    options: QuantizeOptions | None = None,
    device: torch.device | str | None = None,
    offload: str | bool = "auto",
    state_dir: str | os.PathLike[str] | None = None,
    num_samples: int = 8,
    progress: bool = False,
    deadline: float | None = None,
    on_block_done: Callable[[int, str], None] | None = None,
    dist: DistContext | None = None,
    source: ShardedSource | None = None,
    release: bool = False,
) -> QuantizeResult:
    """Quantize a model in place, block by block, resumably.

    Args:
        model: Any ``nn.Module`` (diffusers transformers get architecture defaults).
        calibration: See :func:`converters.quantize.calibrate.resolve_calibration`.
        options: Quantizer options (default :class:`QuantizeOptions`).
        device: Where calibration and quantization run (default: the model's device).
        offload: ``True``/``"blocks"``: keep the model on the CPU and stream one block at a
            time onto ``device``; ``False``/``"none"``: move the whole model; ``"auto"``:
            stream only when the model would take more than 70 % of free CUDA memory.
        state_dir: Directory for resumable state (statistics + one file per finished block).
        num_samples: Synthetic sample count when ``calibration == "synthetic"``.
        progress: tqdm bars.
        deadline: ``time.time()`` after which no new block starts (``complete=False``).
        on_block_done: Called with ``(index, block name)`` after each block is written.
        dist: This process's place in a process group (:mod:`converters.quantize.distributed`):
            calibration samples and input groups are split over the ranks, results are
            exchanged, rank 0 writes the state dir; the result is byte-identical to one process.
        source: The model's blocks are on the meta device and read from these safetensors
            files when needed (:func:`converters.quantize.streaming.load_lazy`; implies block
            streaming).
        release: With a ``state_dir``: once a block's layers are written to its state file they
            are replaced in ``model`` by empty meta-device ``SVDQLinear`` modules (their
            tensors are read back from the file when the checkpoint is written: see
            :func:`converters.quantize.state.block_file_reader`), so quantized layers never accumulate in memory.

    Raises:
        QuantizationError: nothing quantizable, bad calibration, NaN, out of memory, or a
            state dir written with other options / another model.
    """
    opts = options or QuantizeOptions()
    timer = PhaseTimer()
    selection = _select(model, opts)
    place = decide_placement(model, device, offload, from_source=source is not None)
    if place.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(place.device)
    release = release and state_dir is not None
    if source is None:
        model.to(place.home)
    _check_weights(model, selection)
    fp = fingerprint(model, opts, selection, source, place.device)
    # one process decides what is already done (rank 0 of a group: the ranks then agree)
    state = (open_state(state_dir, fp, opts, selection) if dist is None
             else dist.on_root(lambda: open_state(state_dir, fp, opts, selection), what="resume check"))
    stats, calib_info = calibrate(model, calibration, selection, opts, place=place, state=state, timer=timer,
                                  num_samples=num_samples, progress=progress, dist=dist, source=source)
    if opts.gptq is True:
        in_features = {n: linear_at(model, n).in_features for n in selection.kinds}
        check_gptq_rows(stats, in_features, calib_rows=opts.calib_rows)
    rank_plan = plan_ranks(model, selection, stats, opts, place=place, state=state, timer=timer, dist=dist,
                           source=source, progress=progress)
    per_rank = None
    if dist is None:
        infos, complete = quantize_blocks(model, selection, stats, opts, place=place, state=state, timer=timer,
                                          deadline=deadline, progress=progress, on_block_done=on_block_done,
                                          source=source, release=release, rank_plan=rank_plan)
    else:
        infos, complete, per_rank = quantize_blocks_distributed(
            dist, model, selection, stats, opts, place=place, state=state, timer=timer, deadline=deadline,
            progress=progress, on_block_done=on_block_done, source=source, release=release, rank_plan=rank_plan)
    if source is not None and complete:
        source.materialize(model, "", place.home)  # what the blocks hold besides their linears (norms)
    report = _report(infos, selection, opts, timer, calib_info, place, dist, per_rank, rank_plan)
    return QuantizeResult(model, report, complete, selection)


def quantize_model(
    model: nn.Module,
    calibration: Any,
    *,
    rank: int = 32,
    precision: str = "int4",
    device: torch.device | str | None = None,
    offload: str | bool = "auto",
    state_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place with SVDQuant and return it.

    Args:
        model: A diffusers transformer (or any module built from ``nn.Linear``).
        calibration: Samples, a calibration file, ``"synthetic"`` or statistics (see
            :func:`converters.quantize.calibrate.resolve_calibration`).
        rank: Low-rank branch rank of W4A4 layers.
        precision: ``"int4"`` or ``"nvfp4"``.
        device: Compute device (default: the model's).
        offload: Block streaming (see :func:`run_quantization`).
        state_dir: Resumable state directory.
        progress: Show progress bars.
        **options: Further :class:`QuantizeOptions` fields (``smoothing``, ``alphas``,
            ``clip_search``, ``gptq``, ``refine_iters``, ``include``, ``exclude``, ``seed``,
            ``target="nunchaku"`` for a checkpoint that exports to Nunchaku ...).

    Returns:
        The same model with ``SVDQLinear`` layers. A diffusers model is marked as svdquant
        quantized, so ``model.save_pretrained(dir)`` / ``push_to_hub`` write the format
        (sharded, with the manifest); any model also works with
        :func:`svdq_format.model.save_pretrained` and the layer-level
        :func:`svdq_format.save_file`.
    """
    opts = QuantizeOptions.from_kwargs(rank=rank, precision=precision, **options)
    result = run_quantization(model, calibration, options=opts, device=device, offload=offload,
                              state_dir=state_dir, progress=progress)
    if result.complete:
        info = QuantizerInfo(method="calibrated", options=opts.to_json())
        mark_quantized(result.model, extra={QUANTIZER_KEY: info.to_json()})
    return result.model


def mark_quantized(model: nn.Module, *, extra: dict[str, Any] | None = None) -> None:
    """Attach the svdquant quantizer to a diffusers or transformers model (no-op for other modules)."""
    attach_svdquant(model, model_metadata(model, extra=extra))
