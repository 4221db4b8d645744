"""What ``svdq inspect`` reports about a checkpoint: counts, ranks, bytes, bits per parameter."""

from __future__ import annotations

import collections
import math
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_files
from .errors import FormatError
from .io import read_header, read_metadata
from .spec import tensor_names

__all__ = ["summarize", "format_summary", "format_size", "layer_role"]


def layer_role(name: str) -> str:
    """A layer's name with its block indices as ``*`` (``transformer_blocks.3.attn.to_q`` →
    ``transformer_blocks.*.attn.to_q``; indices after a plural or ``layer`` only, so
    ``ff.net.2`` and ``to_out.0`` stay)."""
    return re.sub(r"(s|layer)\.\d+(?=\.)", r"\1.*", name)


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise an SVDQuant file or model directory (headers only, no tensor data read).

    Returns:
        A JSON-able dict: ``format_version``, ``layout``, ``producer``, ``files``,
        ``layers`` (count), ``by_kind`` (``"w4a4/int4"`` → count), ``ranks`` (rank → count),
        ``mean_rank`` (the W4A4 layers' rank weighted by ``N + K``: the one uniform rank with the
        same low-rank bytes, e.g. the ``--rank`` budget of a per-layer allocation; None without
        W4A4 layers), ``ranks_by_role`` (only when the W4A4 ranks differ, as a per-layer rank
        allocation makes them: layer name with block indices as ``*`` → ``min`` / ``mean`` /
        ``max`` rank and ``layers``),
        ``group_sizes``, ``quantized_params`` (Σ N·K), ``quantized_bytes`` (bytes of the
        quantized layers' tensors), ``other_tensors``/``other_bytes`` (16-bit rest),
        ``file_bytes``, ``bits_per_param`` (quantized layers, all their tensors included),
        ``bf16_bytes`` (the same model in bf16) and ``compression_vs_bf16``, ``features`` (format
        features used, e.g. ``["k_segments"]``), ``k_segmented`` (layer → its segments as
        ``"<size>"`` / ``"<size>+shift<a>[u]"`` strings, for layers with per-segment activation handling)
        and ``quantizer`` (how it was quantized: :class:`~svdq_format.spec.QuantizerInfo` as JSON, or ``None``).
    """
    p = Path(path)
    if not p.exists():  # the words of `svdq validate`
        raise FormatError(str(p), None, "no such file or directory")
    files = [p] if p.is_file() else checkpoint_files(p, any_names=True)
    if not files:
        raise FormatError(str(p), None, "directory holds no .safetensors files")
    by_kind: collections.Counter[str] = collections.Counter()
    ranks: collections.Counter[int] = collections.Counter()
    groups: set[int] = set()
    features: set[str] = set()
    segmented: dict[str, list[str]] = {}
    q_params = q_bytes = other_bytes = other_count = file_bytes = bf16_bytes = 0
    lowrank = lowrank_width = 0  # Σ r·(N + K), Σ (N + K) over W4A4 layers
    by_role: dict[str, list[int]] = {}
    meta0 = None
    for f in files:
        header = read_header(f)
        meta = read_metadata(f, header)
        meta0 = meta0 or meta
        file_bytes += os.path.getsize(f)
        owned: set[str] = set()
        for prefix, spec in meta.layers.items():
            by_kind[f"{spec.kind}/{spec.precision}"] += 1
            ranks[spec.rank] += 1
            if spec.kind == "w4a4":
                lowrank += spec.rank * (spec.in_features + spec.out_features)
                lowrank_width += spec.in_features + spec.out_features
                by_role.setdefault(layer_role(prefix), []).append(spec.rank)
            groups.add(spec.group_size)
            features |= spec.features
            if spec.k_segments:
                segmented[prefix] = [
                    f"{seg.size}" + (f"+shift{seg.act_shift:g}" if seg.act_shift else "")
                    + ("u" if seg.act_unsigned else "")
                    for seg in spec.k_segments
                ]
            q_params += spec.in_features * spec.out_features
            bf16_bytes += 2 * (spec.in_features * spec.out_features + (spec.out_features if spec.has_bias else 0))
            for name in tensor_names(prefix).values():
                entry = header.tensors.get(name)
                if entry is not None:
                    owned.add(name)
                    q_bytes += entry.end - entry.begin
        for name, entry in header.tensors.items():
            if name not in owned:
                other_count += 1
                other_bytes += entry.end - entry.begin
                bf16_bytes += 2 * math.prod(entry.shape)
    assert meta0 is not None  # files is not empty
    stored = q_bytes + other_bytes
    return {
        "path": str(p),
        "format_version": meta0.format_version,
        "features": sorted(features),
        "layout": meta0.layout,
        "producer": meta0.producer,
        "files": len(files),
        "layers": sum(by_kind.values()),
        "by_kind": dict(sorted(by_kind.items())),
        "ranks": {str(r): c for r, c in sorted(ranks.items())},
        "mean_rank": (lowrank / lowrank_width) if lowrank_width else None,
        "ranks_by_role": {
            role: {"min": min(rs), "mean": sum(rs) / len(rs), "max": max(rs), "layers": len(rs)}
            for role, rs in sorted(by_role.items())
        } if len({r for rs in by_role.values() for r in rs}) > 1 else {},
        "group_sizes": sorted(groups),
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "other_tensors": other_count,
        "other_bytes": other_bytes,
        "file_bytes": file_bytes,
        "bits_per_param": (8 * q_bytes / q_params) if q_params else None,
        "bf16_bytes": bf16_bytes,
        "compression_vs_bf16": (bf16_bytes / stored) if stored else None,
        "k_segmented": dict(sorted(segmented.items())),
        "quantizer": None if meta0.quantizer is None else meta0.quantizer.to_json(),
    }


def format_size(n: float) -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"31.06 MiB"``, ``"6.20 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # unreachable


def _quantizer_text(q: dict[str, Any]) -> str:
    """``data-free (int4, rank 32; smoothing on, clip_search on, gptq off)``: the method and the
    settings a reader compares first."""
    o = q.get("options", {})
    head = [str(o["precision"])] if "precision" in o else []
    head += [f"rank {o['rank']}"] if "rank" in o else []
    flags = [f"{k} {'on' if o[k] else 'off'}" for k in ("smoothing", "clip_search", "gptq")
             if isinstance(o.get(k), bool)]
    cal = q.get("calibration") or {}
    flags += [f"calibration {cal['source']}"] if cal.get("source") else []
    inner = ", ".join(head) + ("; " if head and flags else "") + ", ".join(flags)
    return f"{q.get('method', '?')}" + (f" ({inner})" if inner else "")


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize`'s result."""
    prod = s["producer"]
    features = f"   features {', '.join(s['features'])}" if s.get("features") else ""
    lines = [
        f"{s['path']}",
        f"  format_version  {s['format_version']}   layout {s['layout']}{features}",
        f"  producer        {prod.get('name', '?')} {prod.get('version', '')}".rstrip(),
        f"  files           {s['files']}",
        *([f"  quantized by    {_quantizer_text(s['quantizer'])}"] if s.get("quantizer") else []),
        f"  quantized layers {s['layers']}: "
        + ", ".join(f"{k} x{v}" for k, v in s["by_kind"].items()),
        "  ranks           " + ", ".join(f"r={r} x{c}" for r, c in s["ranks"].items())
        + (f"  (W4A4 mean rank {s['mean_rank']:.1f}, by low-rank bytes)"
           if s.get("mean_rank") is not None and len(s["ranks"]) > 1 else ""),
        "  group size      " + ", ".join(str(g) for g in s["group_sizes"]),
        f"  quantized       {s['quantized_params']:,} params in {format_size(s['quantized_bytes'])}"
        + (f"  ({s['bits_per_param']:.2f} bits/param incl. scales, smoothing, low-rank, bias)"
           if s["bits_per_param"] else ""),
        f"  other tensors   {s['other_tensors']} in {format_size(s['other_bytes'])}",
        f"  file size       {format_size(s['file_bytes'])}"
        + (f"  ({s['compression_vs_bf16']:.2f}x smaller than bf16, {format_size(s['bf16_bytes'])})"
           if s["compression_vs_bf16"] else ""),
    ]
    segmented = s.get("k_segmented") or {}
    if segmented:
        kinds = collections.Counter(" | ".join(v) for v in segmented.values())
        lines.append(f"  k-segmented     {len(segmented)} layer{'s' if len(segmented) != 1 else ''} "
                     "(per-segment activation handling): "
                     + ", ".join(f"[{k}] x{v}" for k, v in kinds.items()))
    if s.get("ranks_by_role"):
        lines.append("  W4A4 ranks by layer (min / mean / max over blocks):")
        width = max(len(r) for r in s["ranks_by_role"])
        for role, r in s["ranks_by_role"].items():
            lines.append(f"    {role:<{width}}  {r['min']:>4} / {r['mean']:>6.1f} / {r['max']:<4} x{r['layers']}")
    return "\n".join(lines)
