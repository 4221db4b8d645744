"""The fidelity report: per-layer relative output error of SVDQ vs naive W4A4 vs W4A16."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["FidelityReport", "format_table", "format_rank_allocation", "environment_info"]


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, library versions and date, for JSON reports."""
    import diffusers

    dev = torch.device(device or "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(dev),
        "device_name": name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(layers: list[dict[str, Any]], *, limit: int | None = None) -> str:
    """A fixed-width text table of per-layer errors (``limit`` rows, then a summary line)."""
    head = (
        f"{'layer':<44} {'kind':<6} {'N x K':>12} {'r':>3} {'alpha':>5} "
        f"{'svdq':>8} {'w4a4':>8} {'w4a16':>8} {'svdq/w4a4':>9}"
    )
    lines = [head, "-" * len(head)]
    rows = [r for r in layers if "error" in r]
    for r in rows[: limit if limit is not None else len(rows)]:
        e = r["error"]
        ratio = e["svdq"] / e["naive_w4a4"] if e["naive_w4a4"] > 0 else math.nan
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        alpha = "none" if r.get("alpha") is None else f"{r['alpha']:.2f}"
        if r.get("beta") == 0.0:
            alpha = f"x{r['alpha']:.1f}"  # s = amax_x^α (weights ignored)
        name = r["layer"] if len(r["layer"]) <= 44 else "…" + r["layer"][-43:]
        lines.append(
            f"{name:<44} {r['kind']:<6} {shape:>12} {r['rank']:>3} {alpha:>5} {e['svdq']:>8.4f} "
            f"{e['naive_w4a4']:>8.4f} {e['w4a16']:>8.4f} {ratio:>9.3f}"
        )
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layers (see fidelity.json)")
    s = summary(layers)
    if s["layers"]:
        lines.append(
            f"mean over {s['layers']} layers: svdq {s['svdq']:.4f}  naive w4a4 {s['naive_w4a4']:.4f}  "
            f"w4a16 {s['w4a16']:.4f}  (svdq/w4a4 = {s['ratio']:.3f})"
        )
        for mode in ("fast", "fast8"):
            m = s.get(mode)
            if m:
                lines.append(f"{mode} mode on {m['layers']} W4A4 layers: mean {m['mean']:.4f} vs exact "
                             f"{m['mean_exact']:.4f}; no worse than exact on {m['no_worse']}/{m['layers']}")
    return "\n".join(lines)


def format_rank_allocation(alloc: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    """Lines on a budget rank allocation: ranks used, bytes against the budget, the measured
    error sums it predicts against uniform ranks, and the mean rank per layer role (the layer
    name with block indices as ``*``; each layer's rank is in the table's ``r`` column)."""
    from svdq_format.summary import format_size, layer_role

    hist = ", ".join(f"r={r} x{c}" for r, c in alloc["ranks"].items())
    head = (f"rank allocation over {alloc['layers']} W4A4 layers: {hist}; low-rank "
            f"{format_size(alloc['used_bytes'])} of the {format_size(alloc['budget_bytes'])} budget")
    if not alloc.get("weighted", True):
        return head + " (no layer sensitivities: ranks uniform)"
    uni, got = alloc["predicted_sq_error_uniform"], alloc["predicted_sq_error_allocated"]
    lines = [head + (f"; predicted output error {got:.3g} vs {uni:.3g} with uniform ranks ({got / uni:.2f}x)"
                     if uni > 0 else "")]
    roles: dict[str, list[int]] = {}
    for r in layers:
        if r.get("kind") == "w4a4":
            roles.setdefault(layer_role(r["layer"]), []).append(int(r["rank"]))
    means = sorted(((sum(rs) / len(rs), role) for role, rs in roles.items()), key=lambda mr: (-mr[0], mr[1]))
    if means:
        lines.append("  mean rank by layer: " + ", ".join(f"{role} {m:.0f}" for m, role in means))
    return "\n".join(lines)


def summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean relative errors over the layers that have them."""
    rows = [r["error"] for r in layers if "error" in r]
    if not rows:
        return {"layers": 0}
    mean: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in ("svdq", "naive_w4a4", "w4a16")}
    mean["ratio"] = mean["svdq"] / mean["naive_w4a4"] if mean["naive_w4a4"] > 0 else math.nan
    for mode in ("fast", "fast8"):  # the Hopper execution modes vs exact W4A4, on the layers that have them
        both = [r for r in rows if f"svdq_{mode}" in r]
        if both:
            mean[mode] = {
                "layers": len(both),
                "mean": sum(r[f"svdq_{mode}"] for r in both) / len(both),
                "mean_exact": sum(r["svdq"] for r in both) / len(both),
                "no_worse": sum(r[f"svdq_{mode}"] <= r["svdq"] for r in both),
            }
    return {"layers": len(rows), **mean}


@dataclasses.dataclass
class FidelityReport:
    """Everything a quantization run measured.

    Attributes:
        layers: Per-layer info dicts (name, kind, shape, rank, α, ``error`` = relative output
            errors ``svdq`` / ``naive_w4a4`` / ``w4a16`` on the calibration rows, and for W4A4
            layers ``svdq_fast`` / ``svdq_fast8``, the Hopper execution modes).
        skipped: Layers kept 16-bit and why.
        options: The quantizer options.
        timings: Seconds per phase (and ``wall``: the whole run, when written by ``svdq quantize``).
        calibration: Source and sample count.
        environment: Device and versions.
        peak_memory_bytes: Peak CUDA memory (0 on CPU).
        rank_allocation: With ``--rank-allocation budget``: budget and used low-rank bytes, the
            rank histogram and the predicted error sums (:meth:`RankPlan.summary
            <converters.quantize.rank_allocation.RankPlan.summary>`); each layer's rank is in
            ``layers``.
    """

    layers: list[dict[str, Any]]
    skipped: dict[str, str]
    options: dict[str, Any]
    timings: dict[str, float]
    calibration: dict[str, Any]
    environment: dict[str, Any]
    peak_memory_bytes: int = 0
    rank_allocation: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """Mean errors over all layers."""
        return summary(self.layers)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (with the summary)."""
        d = dataclasses.asdict(self)
        d["summary"] = self.summary()
        # "wall" (set by quantize_directory) spans every phase; without it, the phases add up
        d["total_seconds"] = self.timings.get("wall", sum(self.timings.values()))
        return d

    def table(self, *, limit: int | None = None) -> str:
        """Text table (see :func:`format_table`), then the rank allocation
        (:func:`format_rank_allocation`) when there is one."""
        text = format_table(self.layers, limit=limit)
        if self.rank_allocation:
            text += "\n" + format_rank_allocation(self.rank_allocation, self.layers)
        return text

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report atomically."""
        from svdq_format.io import atomic_write

        text = json.dumps(self.to_json(), indent=1, default=str) + "\n"
        p = Path(path)
        atomic_write(p, lambda tmp: Path(tmp).write_text(text))
        return p
