"""The calibration step of a quantization run: statistics of the selected layers' inputs.

:func:`calibrate` reads them back from the state dir, takes them as given, or runs the samples
through the model — block by block when the weights stream and the model's wiring is known
(:mod:`converters.quantize.blockwise`), else whole-model forwards
(:func:`converters.quantize.stats.collect_stats`); with several processes each runs its share of
the samples and the parts are merged (:func:`converters.quantize.distributed.gather_stats`).
Every way gives the same statistics. With GPTQ on, the hooks also sum ``XᵀX`` over every row
for the layers :func:`converters.quantize.gptq.hessian_plan` picks; with the budget rank
allocation, the layer sensitivities (:mod:`converters.quantize.sensitivity`) are measured on
the first samples and kept with the statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from svdq_format.errors import QuantizationError

from .blocks import Placement, block_offload, linear_at
from .blockwise import blockwise_supported, collect_stats_blockwise
from .calibration import CalibrationSet, load_calibration, synthetic_calibration
from .distributed import DistContext, gather_stats
from .gptq import hessian_plan
from .memory import is_oom
from .options import QuantizeOptions
from .rank_allocation import SENSITIVITY_SAMPLES
from .selection import Selection
from .sensitivity import measure_sensitivity
from .state import ResumeState
from .stats import CalibrationStats, collect_stats
from .streaming import ShardedSource, stream_from_source
from .timing import PhaseTimer

__all__ = ["resolve_calibration", "calibrate"]


def resolve_calibration(
    model: nn.Module, calibration: Any, *, num_samples: int = 8, seed: int = 0
) -> CalibrationSet | CalibrationStats:
    """Turn the ``calibration`` argument into samples or statistics.

    Accepts a :class:`CalibrationSet`, :class:`CalibrationStats`, a list of forward keyword
    dicts, a path to a calibration safetensors file, or ``"synthetic"``.
    """
    if isinstance(calibration, (CalibrationSet, CalibrationStats)):
        return calibration
    if isinstance(calibration, str) and calibration == "synthetic":
        return synthetic_calibration(model, num_samples, seed=seed)
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(calibration)
    if isinstance(calibration, Iterable):
        samples = [dict(s) for s in calibration]
        return CalibrationSet(samples, source="samples")
    raise QuantizationError(f"unsupported calibration input of type {type(calibration).__name__}")


def _forward_stats(model: nn.Module, linears: Mapping[str, nn.Linear], samples: list[Any], opts: QuantizeOptions, *,
                   place: Placement, source: ShardedSource | None, progress: bool,
                   shard: tuple[int, int], hessians: list[str]) -> CalibrationStats:
    """Statistics of this process's samples: block by block when the weights are streamed and the
    model's wiring is known (each block placed once), else whole-model forwards."""
    device, stream = place.device, place.stream
    if (stream or source is not None) and blockwise_supported(model, samples):
        if source is not None:
            def load(block: nn.Module, name: str) -> None:
                source.materialize(block, name, device)

            def drop(block: nn.Module) -> None:
                block.to("meta")
        else:
            def load(block: nn.Module, name: str) -> None:
                block.to(device)

            def drop(block: nn.Module) -> None:
                block.to("cpu")
        return collect_stats_blockwise(model, linears, samples, max_rows=opts.calib_rows, seed=opts.seed,
                                       device=device, load_block=load, drop_block=drop, shard=shard,
                                       progress=progress, hessians=hessians)
    placement = stream_from_source(model, source, device) if source is not None else None
    return collect_stats(model, linears, samples, max_rows=opts.calib_rows, seed=opts.seed, device=device,
                         offload=stream, progress=progress, shard=shard, placement=placement, hessians=hessians)


def _sensitivity(model: nn.Module, linears: Mapping[str, nn.Linear], samples: list[Any], opts: QuantizeOptions, *,
                 place: Placement, source: ShardedSource | None) -> dict[str, float]:
    """The layer sensitivities (backward passes; weights placed as for the calibration's
    whole-model forwards; ``{}`` with a warning when that runs out of memory)."""
    import contextlib

    where = (stream_from_source(model, source, place.device) if source is not None
             else block_offload(model, place.device) if place.stream else contextlib.nullcontext())
    with where:
        return measure_sensitivity(model, linears, samples[:SENSITIVITY_SAMPLES], device=place.device, seed=opts.seed)


def calibrate(model: nn.Module, calibration: Any, selection: Selection, opts: QuantizeOptions, *,
              place: Placement, state: ResumeState, timer: PhaseTimer, num_samples: int, progress: bool,
              dist: DistContext | None, source: ShardedSource | None) -> tuple[CalibrationStats, dict[str, Any]]:
    """The statistics of a run and what the report says of them (``source``, ``samples``).

    Saved statistics in the state dir are read back; else ``calibration`` (see
    :func:`resolve_calibration`) is used and the result saved there (rank 0).

    Raises:
        QuantizationError: bad calibration, NaN activations, out of memory (one line, on every rank).
    """
    stats_path = state.stats_path
    if stats_path is not None and state.have_stats:
        stats = CalibrationStats.load(stats_path)
        timer.add({"calibration": stats.seconds})
        return stats, {"source": stats.source or "resumed", "samples": stats.samples}
    calib = resolve_calibration(model, calibration, num_samples=num_samples, seed=opts.seed)
    if isinstance(calib, CalibrationStats):
        stats, info = calib, {"source": "statistics", "samples": calib.samples}
    else:
        linears = {n: linear_at(model, n) for n in selection.kinds}
        shard = (0, 1) if dist is None else (dist.rank, dist.world_size)

        # GPTQ's Hessians over every row, as many as the memory budget allows (decided once:
        # every rank accumulates the same ones)
        def plan_hessians() -> list[str]:
            return hessian_plan(opts.gptq is not False, opts.precision, opts.gptq_hessian_gib,
                                {n: m.in_features for n, m in linears.items()}, place.device)

        hessians = plan_hessians() if dist is None else dist.on_root(plan_hessians, what="Hessian plan")
        part, error = None, None
        try:
            with timer.phase("calibration"):
                part = _forward_stats(model, linears, calib.samples, opts, place=place, source=source,
                                      progress=progress, shard=shard, hessians=hessians)
        except Exception as exc:
            if is_oom(exc):
                exc = QuantizationError(
                    f"out of memory during calibration on {place.device}: use --offload blocks, fewer "
                    "image tokens per sample, or --device cpu"
                )
            if dist is None:
                raise exc from None
            error = exc
        if dist is None:
            assert part is not None  # (one process: a calibration error was raised above)
            stats = part
        else:
            with timer.phase("wait"):
                dist.barrier(what="calibration end")
            with timer.phase("exchange"):
                stats = gather_stats(dist, part, error, max_rows=opts.calib_rows, layers=list(linears))
        if opts.rank_allocation == "budget":
            def sensitivity() -> dict[str, float]:
                return _sensitivity(model, linears, calib.samples, opts, place=place, source=source)

            with timer.phase("sensitivity"):
                stats.sensitivity = sensitivity() if dist is None else dist.on_root(sensitivity,
                                                                                   what="layer sensitivities")
        stats.seconds = timer.seconds["calibration"]
        stats.source = calib.source
        info = {"source": calib.source, "samples": len(calib)}
    if stats_path is not None and (dist is None or dist.is_root):
        with timer.phase("io"):
            stats.save(stats_path)
    return stats, info
