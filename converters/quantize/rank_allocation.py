"""Rank allocation under a budget: the low-rank bytes of ``--rank`` everywhere, spent where they pay.

``--rank-allocation budget`` keeps ``--rank`` as the *average*: the budget is the bytes the
low-rank branches of every W4A4 layer would take at that rank (``r · (N + K)`` values each). One
pass over the layers before any is quantized (:func:`measure_group`) runs each input group's
smoothing search (kept, so the quantization pass does not search again) and measures, for every
member, the relative output error on its calibration rows at ranks 0, 16, 32, … ``max_rank``:
the smoothed weight's top singular directions, truncated to each rank, with the 4-bit residual
and 4-bit activations in the loop (:func:`~converters.quantize.smoothing.simulated_output`).
:func:`allocate` then spends the budget greedily on the steps of each layer's lower convex hull
of (bytes, squared error), best error reduction per byte first — optimal for the convexified
curves. Ranks are multiples of 16 (the format allows any rank per layer; q/k/v of one input
group may differ: fused q|k|v layers stack them, docs/format.md §10).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.io import atomic_write

from .blocks import Placement, placed_linears
from .distributed import DistContext
from .layer import input_groups, layer_seed, search_group
from .lowrank import lowrank_factors
from .options import RANK_STEP, QuantizeOptions
from .residual import dequantized_residual
from .selection import Selection
from .smoothing import SmoothingChoice, approximate, group_smoothing_vector, relative_error, simulated_output
from .state import ResumeState
from .stats import CalibrationStats
from .timing import PhaseTimer

__all__ = ["LayerCurve", "RankPlan", "measure_group", "measure_blocks", "allocate", "make_plan", "plan_kwargs",
           "plan_ranks", "max_rank_of", "SENSITIVITY_SAMPLES"]

#: Calibration samples the layer sensitivities are measured on (2 random vectors each).
SENSITIVITY_SAMPLES = 4


@dataclasses.dataclass
class LayerCurve:
    """A layer's measured error against its low-rank rank.

    Attributes:
        unit_bytes: Bytes of one rank of its low-rank branch (``(N + K) ·`` element size).
        ranks: The measured ranks (0, 16, …).
        errors: Squared relative output error on the calibration rows at each rank.
        weight: What one unit of it costs at the model's output: the layer's sensitivity
            (:mod:`converters.quantize.sensitivity`) times its mean squared output norm.
    """

    unit_bytes: int
    ranks: list[int]
    errors: list[float]
    weight: float = 1.0


@dataclasses.dataclass
class RankPlan:
    """The allocation: a rank per layer, and what it was computed from.

    Attributes:
        ranks: Layer → rank (W4A4 layers with calibration rows; the others keep ``rank``).
        searches: Layer → its input group's smoothing choice (searched once, during the
            measurement).
        curves: Layer → measured curve.
        budget_bytes: Low-rank bytes of the uniform rank over the measured layers.
        used_bytes: Low-rank bytes of the allocation (≤ budget).
        weighted: The errors were weighted by measured sensitivities (else: uniform ranks).
    """

    ranks: dict[str, int]
    searches: dict[str, SmoothingChoice]
    curves: dict[str, LayerCurve]
    budget_bytes: int
    used_bytes: int
    weighted: bool = True

    def predicted(self, ranks: Mapping[str, int]) -> float:
        """Σ of the measured squared errors at ``ranks`` (a layer's nearest measured rank below)."""
        total = 0.0
        for name, c in self.curves.items():
            r = ranks[name]
            i = max(j for j, rr in enumerate(c.ranks) if rr <= r)
            total += c.weight * c.errors[i]
        return total

    def summary(self, uniform_rank: int) -> dict[str, Any]:
        """Budget, use, rank histogram and the predicted error sums (uniform vs allocated)."""
        hist: dict[str, int] = {}
        for r in sorted(self.ranks.values()):
            hist[str(r)] = hist.get(str(r), 0) + 1
        uniform = {n: min(uniform_rank, c.ranks[-1]) for n, c in self.curves.items()}
        return {"budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes, "layers": len(self.ranks),
                "weighted": self.weighted,
                "ranks": hist, "predicted_sq_error_uniform": self.predicted(uniform),
                "predicted_sq_error_allocated": self.predicted(self.ranks)}

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (the resume state keeps it)."""
        return {"ranks": self.ranks, "searches": {n: s.to_json() for n, s in self.searches.items()},
                "curves": {n: dataclasses.asdict(c) for n, c in self.curves.items()},
                "budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes, "weighted": self.weighted}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RankPlan:
        """Inverse of :meth:`to_json`."""
        return cls({n: int(r) for n, r in d["ranks"].items()},
                   {n: SmoothingChoice.from_json(s) for n, s in d["searches"].items()},
                   {n: LayerCurve(int(c["unit_bytes"]), [int(r) for r in c["ranks"]], [float(e) for e in c["errors"]],
                                  float(c.get("weight", 1.0)))
                    for n, c in d["curves"].items()},
                   int(d["budget_bytes"]), int(d["used_bytes"]), bool(d.get("weighted", True)))


def max_rank_of(opts: QuantizeOptions, shape: tuple[int, int]) -> int:
    """The largest rank the allocation may give a layer of ``shape`` (a multiple of 16)."""
    cap = opts.max_rank if opts.max_rank is not None else 4 * opts.rank
    return max(0, min(cap, min(shape)) // RANK_STEP * RANK_STEP)


@torch.no_grad()
def measure_group(
    names: list[str],
    linears: Mapping[str, nn.Linear],
    kinds: Mapping[str, str],
    stats: CalibrationStats,
    opts: QuantizeOptions,
    act_handling: Mapping[str, Any] | None = None,
) -> tuple[SmoothingChoice, dict[str, LayerCurve]]:
    """Search an input group's smoothing (at ``opts.rank``; ``act_handling`` as for
    :func:`~converters.quantize.layer.quantize_group`) and measure each member's error curve.

    Returns:
        ``(the group's smoothing choice, layer → curve)``; no curves without calibration rows.
    """
    first = linears[names[0]]
    device = first.weight.device
    dtype = first.weight.dtype if first.weight.dtype in (torch.bfloat16, torch.float16, torch.float32) \
        else torch.bfloat16
    sdt = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float16
    act_quant = kinds[names[0]] == "w4a4"
    weights = [linears[n].weight.detach() for n in names]
    choice = search_group(names, linears, kinds, stats, opts,
                          rank=min(min(opts.rank, *w.shape) for w in weights), act_handling=act_handling)
    if not all(n in stats.layers for n in names):
        return choice, {}
    amax_x = torch.stack([stats.layers[n].absmax for n in names]).amax(dim=0).to(device)
    smooth = group_smoothing_vector(weights, amax_x, choice.alpha)
    curves: dict[str, LayerCurve] = {}
    for name, w in zip(names, weights):
        x = stats.layers[name].rows.to(device).float()
        ref = x @ w.float().T
        top = max_rank_of(opts, (w.shape[0], w.shape[1]))
        torch.manual_seed(layer_seed(opts.seed, name))
        # rank 0 gives the stored smoothing; the top-`top` factors are truncated to each rank
        base = approximate(w, smooth, 0, precision=opts.precision, dtype=dtype, scale_dtype=sdt)
        w_hat = w.float() * base.smooth
        up, vh = lowrank_factors(w_hat, top, method=opts.lowrank)
        ranks = list(range(0, top + 1, RANK_STEP))
        errors = []
        for r in ranks:
            up_st = up[:, :r].to(dtype).float()
            down_st = (vh[:r] / base.smooth).to(dtype).float()
            residual = w_hat - up_st @ (down_st * base.smooth) if r else w_hat
            q = dequantized_residual(residual, opts.precision, scale_dtype=sdt)
            y = simulated_output(x, smooth=base.smooth, up=up_st, down=down_st, qres=q, precision=opts.precision,
                                 act_quant=act_quant, act_shift=choice.shift)
            errors.append(relative_error(y, ref) ** 2)
        unit = (w.shape[0] + w.shape[1]) * torch.empty(0, dtype=dtype).element_size()
        weight = stats.sensitivity.get(name, 0.0) * float(ref.square().sum(dim=1).mean())
        curves[name] = LayerCurve(unit, ranks, errors, weight)
    return choice, curves


def _monotone(c: LayerCurve) -> list[float]:
    """Weighted errors made non-increasing in rank (a measured bump is noise of the truncated SVD)."""
    out = [c.weight * e for e in c.errors]
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1])
    return out


def _hull(c: LayerCurve) -> list[int]:
    """Indices of the lower convex hull of (rank, monotone error), from rank 0 on."""
    errs = _monotone(c)
    hull: list[int] = []
    for i in range(len(errs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the line a → i
            if (errs[b] - errs[a]) * (c.ranks[i] - c.ranks[a]) >= (errs[i] - errs[a]) * (c.ranks[b] - c.ranks[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(curves: Mapping[str, LayerCurve], budget_bytes: int) -> dict[str, int]:
    """Ranks within ``budget_bytes`` that minimise the summed (convexified) squared error.

    Every layer starts at rank 0; the steps of all layers' lower convex hulls are taken in
    order of error reduction per byte (ties: layer name, then rank), each while it fits the
    budget and its layer is at the step's start.
    """
    steps = []
    for name, c in curves.items():
        hull, errs = _hull(c), _monotone(c)
        for a, b in zip(hull, hull[1:]):
            cost = (c.ranks[b] - c.ranks[a]) * c.unit_bytes
            gain = errs[a] - errs[b]
            if gain <= 0:
                break
            steps.append((-gain / cost, name, c.ranks[a], c.ranks[b], cost))
    steps.sort()
    ranks = dict.fromkeys(curves, 0)
    used = 0
    for _slope, name, r0, r1, cost in steps:
        if ranks[name] == r0 and used + cost <= budget_bytes:
            ranks[name] = r1
            used += cost
    return ranks


def make_plan(
    searches: Mapping[str, SmoothingChoice], curves: Mapping[str, LayerCurve], opts: QuantizeOptions,
    shapes: Mapping[str, tuple[int, int]], *, weighted: bool = True,
) -> RankPlan:
    """Allocate the budget of ``opts.rank`` over the measured layers (``shapes``: their [N, K]).

    Without sensitivities (``weighted=False``) the ranks stay uniform, with a warning: layer
    errors alone are no measure of what a rank buys at the model's output (on MiniLM, spending
    them by the unweighted layer errors made the model *worse* than uniform ranks). The
    smoothing choices are kept either way.
    """
    uniform = {n: min(opts.rank, *shapes[n]) for n in curves}
    budget = sum(uniform[n] * c.unit_bytes for n, c in curves.items())
    if weighted:
        ranks = allocate(curves, budget)
    else:
        warnings.warn("rank allocation: the calibration statistics hold no layer sensitivities (measured from "
                      "calibration samples; statistics passed in without them, or the backward pass ran out of "
                      "memory): ranks stay uniform", UserWarning, stacklevel=3)
        ranks = uniform
    used = sum(ranks[n] * c.unit_bytes for n, c in curves.items())
    return RankPlan(ranks, dict(searches), dict(curves), budget, used, weighted)


def measure_blocks(
    blocks: list[tuple[str, list[str]]],
    kinds: Mapping[str, str],
    stats: CalibrationStats,
    opts: QuantizeOptions,
    *,
    place: Callable[[list[str]], AbstractContextManager[Mapping[str, nn.Linear]]],
    groups: Callable[[list[str]], list[list[str]]],
    progress: bool = False,
    act_handling: Mapping[str, Any] | None = None,
) -> RankPlan:
    """The measuring pass over every block, then the allocation.

    Args:
        blocks: ``(block name, layer names)`` in order.
        kinds: Layer → ``"w4a4"`` / ``"w4a16"`` (only W4A4 layers share the budget).
        stats: Calibration statistics.
        opts: Quantizer options.
        place: ``place(names)``: a context giving the block's linears on the compute device.
        groups: ``groups(names)``: the block's input groups.
        progress: A tqdm bar over the blocks.
    """
    from tqdm.auto import tqdm

    searches: dict[str, SmoothingChoice] = {}
    curves: dict[str, LayerCurve] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for _block, names in tqdm(blocks, desc="rank allocation", unit="block", disable=not progress):
        with place(names) as mods:
            for group in groups(names):
                if kinds[group[0]] != "w4a4":
                    continue
                choice, got = measure_group(group, mods, kinds, stats, opts, act_handling)
                for n in group:
                    searches[n] = choice
                    shapes[n] = (mods[n].out_features, mods[n].in_features)
                curves.update(got)
    return make_plan(searches, curves, opts, shapes, weighted=all(n in stats.sensitivity for n in curves))


def plan_kwargs(plan: RankPlan | None, names: list[str]) -> dict[str, Any]:
    """The ``ranks=`` / ``search=`` arguments of :func:`~converters.quantize.layer.quantize_group`
    for an input group under ``plan`` (none without a plan)."""
    if plan is None:
        return {}
    out: dict[str, Any] = {"ranks": {n: plan.ranks[n] for n in names if n in plan.ranks}}
    if names[0] in plan.searches:
        out["search"] = plan.searches[names[0]]
    return out


def plan_ranks(
    model: nn.Module,
    selection: Selection,
    stats: CalibrationStats,
    opts: QuantizeOptions,
    *,
    place: Placement,
    state: ResumeState,
    timer: PhaseTimer,
    dist: DistContext | None = None,
    source: Any = None,
    progress: bool = False,
) -> RankPlan | None:
    """The run's rank allocation (None unless ``opts.rank_allocation == "budget"``), before any
    layer is quantized: read from the state dir (``rank-plan.json``) when a resumed run has it,
    else measured (:func:`measure_blocks`, on rank 0 of a process group: every rank gets the
    same plan) and saved there."""
    if opts.rank_allocation != "budget":
        return None
    path = state.rank_plan_path

    def measure() -> RankPlan:
        if path is not None and path.is_file():
            return RankPlan.from_json(json.loads(path.read_text()))
        plan = measure_blocks(
            list(selection.blocks.items()), selection.kinds, stats, opts, progress=progress,
            act_handling=selection.act_handling,
            place=lambda names: placed_linears(model, names, place.device, stream=place.stream, source=source),
            groups=lambda names: input_groups(names, selection.kinds, stats))
        if path is not None:
            text = json.dumps(plan.to_json())
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return plan

    with timer.phase("rank_allocation"):
        return measure() if dist is None else dist.on_root(measure, what="rank allocation")
