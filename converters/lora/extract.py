"""Low-rank extraction: a fine-tuned (or distilled) dense model minus its base → a LoRA.

For every 2-D ``<module>.weight`` present in both models with the same shape,
``ΔW = W_tuned − W_base`` is factored by (randomised) SVD, ``ΔW ≈ U_r Σ_r V_rᵀ``, and written as
``lora_B = U_r Σ_r^½``, ``lora_A = Σ_r^½ V_rᵀ`` in the diffusers/PEFT layout
(``transformer.<module>.lora_A.weight``, ``lora_adapter_metadata`` with ``r == lora_alpha``),
so diffusers and :func:`converters.lora.load_lora` both read it. The captured energy
``Σᵢ<r σᵢ² / ‖ΔW‖²_F`` is reported per layer and in total; tensors that are not 2-D weights
(biases, norms) cannot be expressed as a LoRA and are reported as such.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svdq_format.errors import LoRAError
from svdq_format.io import write_tensors
from svdq_format.outputs import check_output

__all__ = ["ExtractionReport", "extract_lora", "open_dense_weights"]


@dataclass
class ExtractionReport:
    """Result of :func:`extract_lora`.

    Attributes:
        rank: The requested rank.
        layers: Module → captured energy fraction (0..1).
        total_energy: ‖ΔW‖²_F summed over the extracted layers.
        captured_energy: The part of it the rank-r factors capture.
        not_captured: Changed tensors that are not 2-D weights (biases, norms, ...).
        not_captured_energy: Their Σ‖Δ‖².
    """

    rank: int
    layers: dict[str, float] = field(default_factory=dict)
    total_energy: float = 0.0
    captured_energy: float = 0.0
    not_captured: list[str] = field(default_factory=list)
    not_captured_energy: float = 0.0

    @property
    def captured_fraction(self) -> float:
        denom = self.total_energy + self.not_captured_energy
        return 1.0 if denom == 0 else self.captured_energy / denom

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "captured_fraction": self.captured_fraction, "total_energy": self.total_energy,
            "captured_energy": self.captured_energy, "layers": self.layers, "not_captured": self.not_captured,
            "not_captured_energy": self.not_captured_energy,
        }


def open_dense_weights(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """Tensor name → (file, name) for a ``.safetensors`` file or a directory of them
    (e.g. a diffusers model directory, sharded or not). Nothing is loaded yet."""
    from safetensors import safe_open

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        raise LoRAError(f"{p}: no .safetensors weights (a file or a directory holding them)")
    index: dict[str, tuple[str, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    index[k] = (str(f), k)
        except Exception as exc:
            raise LoRAError(f"{f}: cannot read safetensors file ({' '.join(str(exc).split())})") from None
    return index


def _get(entry: tuple[str, str]) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(entry[0], framework="pt") as h:
        return h.get_tensor(entry[1])


def extract_lora(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    *,
    rank: int,
    out: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "transformer.",
    exact: bool = False,
    min_energy: float = 0.0,
) -> ExtractionReport:
    """Write the rank-``rank`` LoRA of ``tuned − base`` to ``out`` (safetensors, atomic).

    Args:
        base: Dense base weights (file or directory of safetensors).
        tuned: Dense fine-tuned weights with the same tensor names.
        rank: LoRA rank.
        out: Output ``.safetensors`` file.
        dtype: dtype of the written factors.
        prefix: Key prefix (``"transformer."`` as in diffusers LoRA files).
        exact: Full SVD (slow on large layers) instead of randomised SVD.
        min_energy: Skip layers whose ‖ΔW‖²_F is at most this.

    Raises:
        LoRAError: no common tensors, shape mismatches, non-finite values.
        OutputError: ``out`` is, contains or lies inside ``base`` or ``tuned``, or is a directory.
    """
    check_output(out, [base, tuned], directory=False)
    if rank <= 0:
        raise LoRAError(f"rank must be positive, got {rank}")
    b_idx, t_idx = open_dense_weights(base), open_dense_weights(tuned)
    common = sorted(set(b_idx) & set(t_idx))
    if not common:
        raise LoRAError(f"{tuned}: no tensor names in common with {base}")
    report = ExtractionReport(rank)
    tensors: dict[str, torch.Tensor] = {}
    for key in common:
        wb, wt = _get(b_idx[key]), _get(t_idx[key])
        if wb.shape != wt.shape:
            raise LoRAError(f"{tuned}: {key}: shape {list(wt.shape)}, base has {list(wb.shape)}")
        if not (wb.is_floating_point() and wt.is_floating_point()):
            continue
        delta = wt.float() - wb.float()
        if not torch.isfinite(delta).all():
            raise LoRAError(f"{tuned}: {key}: difference contains NaN or inf")
        energy = float(delta.double().pow(2).sum())
        if energy <= min_energy:
            continue
        if delta.ndim != 2 or not key.endswith(".weight"):
            report.not_captured.append(key)
            report.not_captured_energy += energy
            continue
        module = key.removesuffix(".weight")
        r = min(rank, *delta.shape)
        if exact or min(delta.shape) <= 4 * r + 16:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            u, s, v = u[:, :r], s[:r], vh[:r].T
        else:
            u, s, v = torch.svd_lowrank(delta, q=min(r + 16, min(delta.shape)), niter=6)
            u, s, v = u[:, :r], s[:r], v[:, :r]
        root = s.sqrt()
        tensors[f"{prefix}{module}.lora_A.weight"] = (root[:, None] * v.T).to(dtype).contiguous()
        tensors[f"{prefix}{module}.lora_B.weight"] = (u * root[None, :]).to(dtype).contiguous()
        captured = float(s.double().pow(2).sum())
        report.layers[module] = min(captured / energy, 1.0)
        report.total_energy += energy
        report.captured_energy += min(captured, energy)
    if not tensors:
        raise LoRAError(f"{tuned}: no 2-D weight differs from {base}; nothing to extract")
    meta = {f"{prefix}r": rank, f"{prefix}lora_alpha": rank,
            f"{prefix}target_modules": sorted(report.layers)} if prefix else {
        "r": rank, "lora_alpha": rank, "target_modules": sorted(report.layers)}
    header = {"lora_adapter_metadata": json.dumps(meta), "svdquant_extraction": json.dumps(
        {"rank": rank, "captured_fraction": report.captured_fraction, "not_captured": report.not_captured})}
    write_tensors(out, tensors, metadata=header)
    return report
