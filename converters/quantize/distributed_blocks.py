"""The block loop over several ranks (one process: :mod:`converters.quantize.block_loop`).

Windows of consecutive unfinished blocks (:func:`converters.quantize.distributed.windows`);
within a window the input groups are assigned to ranks by cost
(:func:`converters.quantize.distributed.assign`), quantized independently (per-layer seeds) and
sent to rank 0, which puts them into its model in the one-process order and writes each block's
resume file exactly as one process does. The other ranks keep the layers' specs only (their
model's quantized layers are on the meta device): the complete model is rank 0's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError
from svdq_format.model import set_submodule

from .blocks import Placement, linear_at, placed_linears
from .distributed import DistContext, assign, group_cost, pack_layer, unpack_layer, windows
from .layer import input_groups, quantize_group
from .memory import is_oom
from .options import QuantizeOptions
from .rank_allocation import RankPlan, plan_kwargs
from .selection import Selection
from .state import ResumeState, load_block_result, release_layers, save_block
from .stats import CalibrationStats
from .timing import PhaseTimer

__all__ = ["WINDOWS_PER_RUN", "quantize_blocks_distributed"]


def _candidates(opts: QuantizeOptions) -> int:
    return len(opts.alphas) + len(opts.activation_alphas) + 1 if opts.smoothing else 1


#: Windows per run when nothing is released (each one ends with a wait for the slowest rank;
#: the checkpoint is the same for any value).
WINDOWS_PER_RUN = 4


def quantize_blocks_distributed(
    ctx: DistContext,
    model: nn.Module,
    selection: Selection,
    stats: CalibrationStats,
    opts: QuantizeOptions,
    *,
    place: Placement,
    state: ResumeState,
    timer: PhaseTimer,
    deadline: float | None,
    progress: bool,
    on_block_done: Callable[[int, str], None] | None,
    source: Any = None,
    release: bool = False,
    windows_per_run: int = WINDOWS_PER_RUN,
    rank_plan: RankPlan | None = None,
) -> tuple[list[dict[str, Any]], bool, list[int]]:
    """Quantize every block that ``state`` does not hold yet (the others are read back).

    ``rank_plan``: the rank allocation (issue 25), the same on every rank.

    Returns:
        ``(layer infos in block order, complete, input groups quantized by each rank)``.

    Raises:
        QuantizationError: a rank failed (``rank R failed during ...``) or went silent.
    """
    from tqdm.auto import tqdm

    blocks = list(selection.blocks.items())
    infos: list[dict[str, Any]] = []
    done_set = set(state.done)
    for index in sorted(done_set):  # resumed blocks: every rank reads the files rank 0 wrote
        block_file = state.block_path(index)
        assert block_file is not None
        infos.extend(load_block_result(model, block_file, home=place.home, timer=timer, release=release))
    todo = [i for i in range(len(blocks)) if i not in done_set]
    groups = {i: input_groups(blocks[i][1], selection.kinds, stats) for i in todo}
    # Every window ends with all ranks waiting for the slowest, so more groups per window
    # balance better (longest first over many unequal groups). Releasing (--offload disk):
    # small windows, so rank 0 holds few quantized layers at once. Otherwise: about a quarter
    # of the model per window (4 exchanges; resume files are written window by window).
    counts = [len(groups[i]) for i in todo]
    per_rank_window = 2 if release else max(4, -(-sum(counts) // (windows_per_run * ctx.world_size)))
    plan = [[todo[j] for j in w] for w in windows(counts, ctx.world_size, groups_per_rank=per_rank_window)]
    bar = tqdm(
        total=len(todo), desc=f"quantize x{ctx.world_size}", unit="block", disable=not (progress and ctx.is_root)
    )
    per_rank = [0] * ctx.world_size
    # rank 0 writes the resume files in the background (one thread, in order) while the ranks
    # compute the next window: the writes are off the critical path
    writer = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdq-state")
              if ctx.is_root and state.directory is not None else None)
    pending: list[Future[Any]] = []

    def flush(keep: int = 0) -> None:
        while len(pending) > keep:
            timer.add({"io": pending.pop(0).result()})  # a write error surfaces here, on rank 0

    try:
        complete = _windows(ctx, plan, blocks, groups, model, selection, stats, opts, place=place, state=state,
                            timer=timer, deadline=deadline, infos=infos, per_rank=per_rank, bar=bar,
                            on_block_done=on_block_done, writer=writer, pending=pending, flush=flush,
                            source=source, release=release, rank_plan=rank_plan)
        flush()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
    bar.close()
    # report layers in block order as one process does (resumed blocks were appended first)
    block_of = {name: i for i, (_, names) in enumerate(blocks) for name in names}
    infos.sort(key=lambda r: block_of.get(r.get("layer", ""), len(blocks)))
    return infos, complete, per_rank


def _windows(ctx: DistContext, plan: list[list[int]], blocks: list[tuple[str, list[str]]],
             groups: dict[int, list[list[str]]], model: nn.Module, selection: Selection, stats: CalibrationStats,
             opts: QuantizeOptions, *, place: Placement, state: ResumeState, timer: PhaseTimer,
             deadline: float | None, infos: list[dict[str, Any]], per_rank: list[int], bar: Any,
             on_block_done: Callable[[int, str], None] | None, writer: ThreadPoolExecutor | None,
             pending: list[Future[Any]], flush: Callable[..., None], source: Any = None,
             release: bool = False, rank_plan: RankPlan | None = None) -> bool:
    device, home = place.device, place.home
    for window in plan:
        if ctx.agree(deadline is not None and time.time() > deadline, what="deadline check"):
            return False
        tasks = [(b, g) for b in window for g in range(len(groups[b]))]
        costs = []
        for b, g in tasks:
            shapes = [tuple(linear_at(model, n).weight.shape) for n in groups[b][g]]
            costs.append(group_cost(shapes, _candidates(opts)))  # type: ignore[arg-type]
        owner = assign(costs, ctx.world_size)
        for r in owner:
            per_rank[r] += 1
        results: dict[tuple[int, int], Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            for (b, g), r in zip(tasks, owner):
                if r != ctx.rank:
                    continue
                names = groups[b][g]
                gt = PhaseTimer()
                # (disk: only this rank's layers are read from the source shards)
                with placed_linears(model, names, device, stream=place.stream, source=source) as mods:
                    res = quantize_group(names, mods, selection.kinds, stats, opts, timer=gt,
                                         act_handling=selection.act_handling, **plan_kwargs(rank_plan, names))
                packed = []
                for name, (layer, info) in res.items():
                    spec_json, roles = pack_layer(layer)
                    packed.append((name, spec_json, sorted(roles), info))
                    tensors.update({f"{b}/{g}/{name}/{role}": t for role, t in roles.items()})
                results[(b, g)] = (packed, gt.seconds)
        except Exception as exc:
            error = exc
            if is_oom(exc):
                error = QuantizationError(f"out of memory while quantizing on {device}: use --offload blocks, "
                                          "a smaller --calib-rows, or fewer --gpus per host memory")
        with timer.phase("wait"):  # the slowest rank of the window (kept apart from the data movement)
            ctx.barrier(what="window end")
        with timer.phase("exchange"):
            gathered = ctx.exchange_tensors(results, tensors, error, to_root=True,
                                            what=f"blocks {blocks[window[0]][0] or '(outside blocks)'}..")
        results, tensors = {}, {}
        merged: dict[tuple[int, int], Any] = {}
        received: dict[str, torch.Tensor] = {}
        for part, got in gathered:
            merged.update(part)
            received.update(got)
        del gathered
        for b in window:
            block, _ = blocks[b]
            block_timer = PhaseTimer()
            layers_done: dict[str, Any] = {}
            block_infos: list[dict[str, Any]] = []
            for g in range(len(groups[b])):
                packed, seconds = merged[(b, g)]
                block_timer.add(seconds)
                for name, spec_json, roles, info in packed:
                    if not ctx.is_root:  # rank 0 assembles and writes the model: keep the spec only
                        layers_done[name] = unpack_layer(spec_json, {}, device="meta")
                    else:
                        layer_tensors = {role: received[f"{b}/{g}/{name}/{role}"] for role in roles}
                        # a released layer is written from where it arrived (the GPU) and dropped
                        where = next(iter(layer_tensors.values())).device if release else home
                        layers_done[name] = unpack_layer(spec_json, layer_tensors, device=where)
                    block_infos.append(info)
            for name, layer in (release_layers(layers_done) if release else layers_done).items():
                set_submodule(model, name, layer)
            target = state.block_path(b)
            if writer is not None and target is not None:
                pending.append(writer.submit(_timed_save, layers_done, target, block, block_infos,
                                             dict(block_timer.seconds), release))
            timer.add(block_timer.seconds)
            infos.extend(block_infos)
            bar.update(1)
            if on_block_done is not None:
                flush()  # "after each block is written"
                on_block_done(b, block)
        del merged, received, layers_done  # the window's tensors: only the writer's queue keeps them
        flush(keep=1 if release else 2)  # bounded backlog
    return True


def _timed_save(layers: dict[str, Any], path: Path, block: str, infos: list[dict[str, Any]],
                timings: dict[str, float], streaming: bool = False) -> float:
    t = time.perf_counter()
    save_block(layers, path, block=block, infos=infos, timings=timings, streaming=streaming)
    return time.perf_counter() - t
