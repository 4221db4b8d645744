"""The block loop of one process: each block's input groups quantized, swapped in and saved.

Blocks whose state file exists are read back (:func:`converters.quantize.state.load_block_result`);
the others are quantized group by group (:func:`converters.quantize.layer.quantize_group`) with
their linears on the device (:func:`converters.quantize.blocks.placed_linears`), written to
their state file, and their ``SVDQLinear`` modules put into the model (or, ``release``, empty
stand-ins: the tensors stay in the file). Several processes:
:mod:`converters.quantize.distributed_blocks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import nn

from svdq_format.errors import QuantizationError
from svdq_format.linear import SVDQLinear
from svdq_format.model import set_submodule

from .blocks import Placement, placed_linears
from .layer import input_groups, quantize_group
from .memory import is_oom
from .options import QuantizeOptions
from .rank_allocation import RankPlan, plan_kwargs
from .selection import Selection
from .state import ResumeState, load_block_result, release_layers, save_block
from .stats import CalibrationStats
from .timing import PhaseTimer

__all__ = ["quantize_blocks"]


def _quantize_block(model: nn.Module, block: str, names: list[str], selection: Selection, stats: CalibrationStats,
                    opts: QuantizeOptions, place: Placement, *, source: Any, release: bool,
                    timer: PhaseTimer, rank_plan: RankPlan | None = None
                    ) -> tuple[dict[str, SVDQLinear], list[dict[str, Any]]]:
    """One block's layers quantized: ``(layers by name, report rows)``."""
    done: dict[str, SVDQLinear] = {}
    infos: list[dict[str, Any]] = []
    try:
        with placed_linears(model, names, place.device, stream=place.stream, source=source) as mods:
            for group in input_groups(names, selection.kinds, stats):
                res = quantize_group(group, mods, selection.kinds, stats, opts, timer=timer,
                                     act_handling=selection.act_handling, **plan_kwargs(rank_plan, group))
                for name, (layer, info) in res.items():
                    done[name] = layer if release else layer.to(place.home)  # (release: written from the device)
                    infos.append(info)
    except Exception as exc:
        if is_oom(exc):
            raise QuantizationError(
                f"out of memory while quantizing block {block or '(outside blocks)'} on {place.device}: "
                "use --offload blocks, a smaller --calib-rows, or --device cpu"
            ) from None
        raise
    return done, infos


def quantize_blocks(model: nn.Module, selection: Selection, stats: CalibrationStats, opts: QuantizeOptions, *,
                    place: Placement, state: ResumeState, timer: PhaseTimer, deadline: float | None, progress: bool,
                    on_block_done: Callable[[int, str], None] | None, source: Any = None,
                    release: bool = False, rank_plan: RankPlan | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Quantize every block of the selection in this process, in order (each layer at its rank in
    ``rank_plan``, with the smoothing searched for it, when there is one).

    Returns:
        ``(report rows in block order, complete)``; ``complete`` is False when the deadline
        stopped the loop before a block.

    Raises:
        QuantizationError: out of memory (one line), or what a layer raised.
    """
    from tqdm.auto import tqdm

    infos: list[dict[str, Any]] = []
    bar = tqdm(list(selection.blocks.items()), desc="quantize", unit="block", disable=not progress)
    complete = True
    for index, (block, names) in enumerate(bar):
        bar.set_postfix_str(block or "(outside blocks)", refresh=False)
        block_file = state.block_path(index)
        if block_file is not None and block_file.is_file():
            infos.extend(load_block_result(model, block_file, home=place.home, timer=timer, release=release))
            continue
        if deadline is not None and time.time() > deadline:
            complete = False
            break
        block_timer = PhaseTimer()
        done, block_infos = _quantize_block(model, block, names, selection, stats, opts, place, source=source,
                                            release=release, timer=block_timer, rank_plan=rank_plan)
        if block_file is not None:
            with block_timer.phase("io"):
                save_block(done, block_file, block=block, infos=block_infos, timings=block_timer.seconds,
                           streaming=release)
        for name, layer in (release_layers(done) if release else done).items():
            set_submodule(model, name, layer)
        timer.add(block_timer.seconds)
        infos.extend(block_infos)
        if on_block_done is not None:
            on_block_done(index, block)
    bar.close()
    return infos, complete
