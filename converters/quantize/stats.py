"""Calibration statistics: forward hooks → bounded per-layer activation statistics.

:func:`collect_stats`: forward hooks on the selected linears record, per layer, the
per-input-channel absmax, the smallest value, and a bounded random subsample of input rows (a
reservoir kept by random keys, so memory is bounded no matter how many tokens flow through).
The keys of sample ``i`` come from a generator seeded by ``(seed, i)`` only, and the reservoir
is kept sorted by key: statistics of a sharded calibration (samples split over processes,
:func:`merge_stats`) are identical to those of one process. Layers that read the very same input tensor
(q/k/v) are recorded as one *input group*. The model can be streamed block by block onto the
device (``offload=True``) so a model larger than device memory still calibrates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from .blocks import block_offload
from .device_tree import to_device

__all__ = ["LayerStats", "CalibrationStats", "collect_stats", "merge_stats", "sample_seed", "StatsRecorder",
           "to_device"]

_SEP = "::"

#: A forward call's keyword arguments (see :mod:`converters.quantize.calibration`).
Sample = dict[str, Any]

@dataclasses.dataclass
class LayerStats:
    """Bounded activation statistics of one linear's input.

    Attributes:
        absmax: Per-input-channel max |x| ``[K]`` (float32).
        rows: A random subsample of input rows ``[m, K]`` (m ≤ the row budget), capture dtype, on
            the device the calibration ran on (statistics read from a file: the CPU).
        keys: The reservoir keys of ``rows`` (float64; the smallest keys are kept, ascending).
        count: Number of rows seen.
        minval: Smallest input value seen (decides unsigned activation codes after a GELU).
        hessian: ``XᵀX`` over *every* row seen (``[K, K]``, raw inputs), for GPTQ; only for the
            layers the recorder was asked to accumulate it for (memory budget). Layers that read
            the same input tensor share one tensor object. float64 sums of float32 per-call
            products: exact, so the same whatever the order the samples are added in (one
            process, or shards merged), unless one entry's per-call values span more than 2²⁹.
    """

    absmax: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    count: int = 0
    minval: float = float("-inf")
    hessian: torch.Tensor | None = None


@dataclasses.dataclass
class CalibrationStats:
    """Statistics of every selected layer plus the input groups (layers sharing one input)."""

    layers: dict[str, LayerStats]
    groups: list[list[str]]
    samples: int = 0
    #: Seconds the calibration pass took (kept so a resumed run reports the full time).
    seconds: float = 0.0
    #: Where the calibration inputs came from (kept so a resumed run records the same source).
    source: str = ""
    #: Layer → how much its output error reaches the model output
    #: (:func:`converters.quantize.sensitivity.layer_sensitivity`; measured for the rank allocation).
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)

    def group_of(self, name: str) -> list[str]:
        """The input group containing ``name`` (``[name]`` when it shares with nobody)."""
        for g in self.groups:
            if name in g:
                return g
        return [name]

    # ---- persistence (resume)
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to a safetensors file (atomic)."""
        from svdq_format.io import atomic_write, write_safetensors_streaming

        tensors: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        mins: dict[str, float] = {}
        hessian_of: dict[str, str] = {}  # layer → the layer whose entry holds its (shared) Hessian
        owners: dict[int, str] = {}
        for name, st in self.layers.items():
            mins[name] = st.minval
            tensors[f"{name}{_SEP}absmax"] = st.absmax.contiguous()
            tensors[f"{name}{_SEP}rows"] = st.rows.contiguous()
            tensors[f"{name}{_SEP}keys"] = st.keys.contiguous()
            counts[name] = st.count
            if st.hessian is not None:
                owner = owners.setdefault(id(st.hessian), name)
                hessian_of[name] = owner
                if owner == name:
                    tensors[f"{name}{_SEP}hessian"] = st.hessian.contiguous()
        meta = {"svdq_stats": json.dumps({"groups": self.groups, "counts": counts, "mins": mins,
                                          "samples": self.samples, "seconds": self.seconds, "source": self.source,
                                          "hessian_of": hessian_of, "sensitivity": self.sensitivity})}
        # tensor by tensor (rows may live on the GPU): no second copy of the statistics in memory
        atomic_write(Path(path), lambda tmp: write_safetensors_streaming(tensors, tmp, meta, lambda k: tensors[k]))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as h:
            info = json.loads((h.metadata() or {})["svdq_stats"])
            layers = {
                name: LayerStats(
                    h.get_tensor(f"{name}{_SEP}absmax"),
                    h.get_tensor(f"{name}{_SEP}rows"),
                    h.get_tensor(f"{name}{_SEP}keys"),
                    int(count),
                    float(info.get("mins", {}).get(name, float("-inf"))),
                )
                for name, count in info["counts"].items()
            }
            shared: dict[str, torch.Tensor] = {}
            for name, owner in info.get("hessian_of", {}).items():
                if owner not in shared:
                    shared[owner] = h.get_tensor(f"{owner}{_SEP}hessian")
                layers[name].hessian = shared[owner]
        return cls(layers, [list(g) for g in info["groups"]], int(info.get("samples", 0)),
                   float(info.get("seconds", 0.0)), str(info.get("source", "")),
                   {k: float(v) for k, v in info.get("sensitivity", {}).items()})


def collect_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    calibration: Iterable[Sample],
    *,
    max_rows: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    offload: bool = False,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
    placement: contextlib.AbstractContextManager[Any] | None = None,
    hessians: Collection[str] = (),
    sensitivity_samples: int = 0,
) -> CalibrationStats:
    """Run the calibration inputs through the model and gather per-layer statistics.

    Args:
        model: The (unquantized) model.
        layers: The linears to observe, by qualified name.
        calibration: Forward keyword dicts.
        max_rows: Row budget per layer (the subsample kept for the smoothing search).
        seed: Seed of the row sampler.
        device: Where the forward runs (default: where the model is).
        offload: Stream blocks onto ``device`` one at a time (model stays on the CPU).
        progress: Show a tqdm bar per sample.
        shard: ``(rank, world)``: run only samples ``i`` with ``i % world == rank`` (merge the
            parts with :func:`merge_stats`; no "never ran" warning for a part).
        placement: A context that places the model's weights during the forwards (e.g.
            :func:`converters.quantize.streaming.stream_from_source`); overrides ``offload``.
        hessians: Layers whose ``XᵀX`` over every row is accumulated (``LayerStats.hessian``).
        sensitivity_samples: Also measure the layers' sensitivities
            (:func:`converters.quantize.sensitivity.measure_sensitivity`) on the first this many
            samples (whole-model forwards on ``device``; not with ``offload`` or ``placement``).

    Raises:
        QuantizationError: NaN/inf activations (naming the layer and sample).
    """
    rank, world = shard
    if device is None:
        device = next(model.parameters()).device
    # the sampled rows stay where the forward runs (a GPU: no copies to the host, and the
    # reservoir's concatenations run there); the quantizer reads them there
    rec = StatsRecorder(max_rows=max_rows, row_device=device, hessians=hessians)
    handles = [mod.register_forward_pre_hook(rec.hook(name)) for name, mod in layers.items()]
    samples = list(calibration)
    if not samples:
        raise QuantizationError("calibration set is empty")
    ctx = placement if placement is not None else block_offload(model, device) if offload else contextlib.nullcontext()
    try:
        from tqdm.auto import tqdm

        with ctx, torch.no_grad():
            mine = [(i, s) for i, s in enumerate(samples) if i % world == rank]
            for i, sample in tqdm(mine, desc="calibration", unit="sample", disable=not progress):
                rec.begin(i, first=rec.state["first"])
                rec.gen.manual_seed(sample_seed(seed, i))
                model(**to_device(sample, device))
                rec.state["first"] = False
                rec.state["last"] = None
                rec.state["last_hessian"] = None
    finally:
        for h in handles:
            h.remove()
    stats = rec.finish(layers, world=world, samples=len(mine))
    if sensitivity_samples > 0 and not offload and placement is None:
        from .sensitivity import measure_sensitivity

        stats.sensitivity = measure_sensitivity(model, layers, samples[:sensitivity_samples], device=device, seed=seed)
    return stats


class StatsRecorder:
    """The forward pre-hooks of :func:`collect_stats` and the statistics they fill.

    One row-sampling generator (:attr:`gen`), re-seeded per sample by the caller; input groups
    are recorded while ``state["first"]`` is true (the first sample a process runs). Used by
    :func:`collect_stats` (whole-model forwards) and by
    :mod:`converters.quantize.blockwise` (one block at a time, the generator state of each
    sample carried from block to block), which therefore compute the same statistics.
    """

    def __init__(self, *, max_rows: int, row_device: torch.device | str = "cpu",
                 hessians: Collection[str] = ()) -> None:
        self.max_rows = max_rows
        self.row_device = row_device
        self.gen = torch.Generator()
        self.stats: dict[str, LayerStats] = {}
        self.groups: list[list[str]] = []
        #: "last_hessian": (input tensor, Hessian) of the last accumulation: a layer reading the
        #: same tensor shares that Hessian and does not add the rows twice
        self.state: dict[str, Any] = {"last": None, "sample": 0, "first": True, "last_hessian": None}
        self.placed: set[str] = set()
        self.hessians = frozenset(hessians)

    def begin(self, index: int, *, first: bool) -> None:
        """Set the sample being run (for error messages) and whether groups are recorded."""
        self.state["sample"] = index
        self.state["first"] = first
        self.state["last_hessian"] = None

    def hook(self, name: str) -> Callable[..., None]:
        """The forward pre-hook of linear ``name``."""
        gen, stats, groups, state, placed, max_rows = (self.gen, self.stats, self.groups, self.state, self.placed,
                                                       self.max_rows)
        row_device = self.row_device
        want_hessian = name in self.hessians

        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            k = x.shape[-1]
            flat = x.detach().reshape(-1, k)
            amax = flat.abs().amax(dim=0).float()
            # one host synchronisation per call: the minimum and the finite check together
            lo, finite = torch.stack([flat.amin().float(), torch.isfinite(amax).all().float()]).tolist()
            if not finite:
                raise QuantizationError(
                    f"layer {name}: NaN or inf activations in calibration sample {state['sample']}"
                )
            if state["first"] and name not in placed:
                placed.add(name)
                if state["last"] is not None and state["last"][0] is x:
                    groups[-1].append(name)
                else:
                    groups.append([name])
                state["last"] = (x,)
            m = flat.shape[0]
            keys = torch.rand(m, generator=gen, dtype=torch.float64)
            take = min(m, max_rows)
            top = torch.topk(keys, take, largest=False)
            new_rows = flat[top.indices.to(flat.device)].to(row_device)
            st = stats.get(name)
            if want_hessian:
                _accumulate_hessian(state, st, x, flat)
            if st is None:  # absmax stays where the forward runs until finish()
                stats[name] = LayerStats(amax, new_rows, top.values, m, lo)
                if want_hessian:
                    stats[name].hessian = state["last_hessian"][1]
                return
            st.minval = min(st.minval, lo)
            st.absmax = torch.maximum(st.absmax, amax)
            all_keys = torch.cat([st.keys, top.values])
            all_rows = torch.cat([st.rows, new_rows])
            keep = torch.topk(all_keys, min(max_rows, all_keys.numel()), largest=False).indices
            keep = keep.sort().values
            st.keys, st.rows, st.count = all_keys[keep], all_rows[keep.to(all_rows.device)], st.count + m

        return hook

    def finish(self, layers: Mapping[str, Any], *, world: int, samples: int) -> CalibrationStats:
        """The statistics in canonical order (warns about layers that never ran, one process)."""
        stats = self.stats
        for st in stats.values():  # canonical order (by key): independent of how samples were split
            order = torch.sort(st.keys, stable=True).indices
            st.keys, st.rows = st.keys[order], st.rows[order.to(st.rows.device)]
            st.absmax = st.absmax.cpu()
        missing = [n for n in layers if n not in stats]
        if missing and world == 1:
            warnings.warn(f"{len(missing)} selected layers never ran during calibration (e.g. {missing[0]})",
                          UserWarning, stacklevel=3)
        groups = [[n for n in g if n in stats] for g in self.groups]
        return CalibrationStats(stats, [g for g in groups if g], samples=samples)


def _accumulate_hessian(state: dict[str, Any], st: LayerStats | None, x: torch.Tensor, flat: torch.Tensor) -> None:
    """Add ``flatᵀ·flat`` to the layer's Hessian (made at its first call, or shared with the
    layer that just read the very same input tensor); ``state["last_hessian"]`` says which."""
    last = state["last_hessian"]
    h = st.hessian if st is not None else None
    if last is not None and last[0] is x and (h is None or h is last[1]):
        state["last_hessian"] = (x, last[1])  # same input as the previous layer: already added
        return
    if h is None:
        h = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    h.add_(gram(flat))
    state["last_hessian"] = (x, h)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` in float32 (16-bit inputs: products exact, float32 accumulation)."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # (torch without the mixed-dtype mm)
            pass
    xf = x.float()
    return xf.T @ xf


def sample_seed(seed: int, index: int) -> int:
    """Seed of the row-sampling keys of calibration sample ``index`` (order/shard independent)."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63)


def merge_stats(parts: list[CalibrationStats], *, max_rows: int, layers: Iterable[str] = ()) -> CalibrationStats:
    """Combine the statistics of sample shards (``collect_stats(..., shard=(r, world))``).

    The result equals what one :func:`collect_stats` call over all samples gives: absmax and
    min are exact reductions, the reservoir keeps the ``max_rows`` smallest keys, sorted.
    Input groups come from the first part holding them (the shard that ran sample 0).

    Args:
        parts: One statistics object per shard, shard 0 first.
        max_rows: Row budget per layer.
        layers: The layers that were observed (for the "never ran" warning).
    """
    merged: dict[str, LayerStats] = {}
    for part in parts:
        for name, st in part.layers.items():
            cur = merged.get(name)
            if cur is None:
                merged[name] = LayerStats(st.absmax.clone(), st.rows, st.keys, st.count, st.minval,
                                          None if st.hessian is None else st.hessian.clone())
                continue
            if cur.hessian is not None and st.hessian is not None:
                cur.hessian += st.hessian.to(cur.hessian.device)  # (summation order: part by part)
            else:
                cur.hessian = None
            keys = torch.cat([cur.keys, st.keys])
            rows = torch.cat([cur.rows, st.rows])
            order = torch.sort(keys, stable=True).indices[:max_rows]
            cur.keys, cur.rows = keys[order], rows[order]
            cur.absmax = torch.maximum(cur.absmax, st.absmax)
            cur.count += st.count
            cur.minval = min(cur.minval, st.minval)
    groups = next((p.groups for p in parts if p.groups), [])
    missing = [n for n in layers if n not in merged]
    if missing:
        warnings.warn(f"{len(missing)} selected layers never ran during calibration (e.g. {missing[0]})",
                      UserWarning, stacklevel=2)
    return CalibrationStats(merged, [list(g) for g in groups], samples=sum(p.samples for p in parts),
                            seconds=max((p.seconds for p in parts), default=0.0))
