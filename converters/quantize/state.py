"""The resumable state of a quantization run: one directory, written as the run goes.

``plan.json`` (a fingerprint of the model and the options: a state dir is never resumed with
other settings), ``calibration-stats.safetensors`` (the statistics), ``rank-plan.json`` (the
rank allocation, :mod:`converters.quantize.rank_allocation`) and one
``block-NNNN.safetensors`` per finished block (its layers and report rows). A rerun with the
same settings reads what is there and computes the rest, bit-identical: every block depends
only on the original weights, the statistics and a per-layer seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format.checkpoint import load_file
from svdq_format.errors import QuantizationError
from svdq_format.io import TensorReader, atomic_write, read_header, read_metadata, save_file
from svdq_format.linear import SVDQLinear
from svdq_format.model import set_submodule

from .blocks import linear_at
from .options import QuantizeOptions
from .selection import Selection
from .timing import PhaseTimer

__all__ = [
    "STATS_FILE",
    "PLAN_FILE",
    "RANK_PLAN_FILE",
    "ResumeState",
    "fingerprint",
    "open_state",
    "save_block",
    "load_block_result",
    "release_layers",
    "block_file_reader",
]

STATS_FILE = "calibration-stats.safetensors"
PLAN_FILE = "plan.json"
RANK_PLAN_FILE = "rank-plan.json"


@dataclasses.dataclass(frozen=True)
class ResumeState:
    """What a state directory already holds.

    Attributes:
        directory: The state directory (None: the run keeps no state).
        have_stats: The calibration statistics are saved.
        done: Indices of the blocks whose files are written.
    """

    directory: Path | None
    have_stats: bool = False
    done: tuple[int, ...] = ()

    @property
    def stats_path(self) -> Path | None:
        """Where the statistics are (to be) saved."""
        return None if self.directory is None else self.directory / STATS_FILE

    @property
    def rank_plan_path(self) -> Path | None:
        """Where the rank allocation is (to be) saved."""
        return None if self.directory is None else self.directory / RANK_PLAN_FILE

    def block_path(self, index: int) -> Path | None:
        """Where block ``index``'s layers are (to be) saved."""
        return None if self.directory is None else self.directory / f"block-{index:04d}.safetensors"


def fingerprint(model: nn.Module, opts: QuantizeOptions, selection: Selection, source: Any = None,
                device: torch.device | str = "cpu") -> str:
    """What a state dir was written for: the model class, config and a few weights, the options, the layers."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    raw: Any = getattr(model, "config", None)
    cfg = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    # diffusers bookkeeping (e.g. _use_default_values, listed in set order, which changes from
    # process to process) is no part of the model: keep it out, so a new process can resume
    cfg = {k: v for k, v in cfg.items() if not (k.startswith("_") and k != "_class_name")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(opts.to_json(), sort_keys=True).encode())
    h.update(json.dumps(selection.kinds, sort_keys=True).encode())
    for name in list(selection.kinds)[:4]:  # a few weights: catches "same config, other weights"
        w = linear_at(model, name).weight.detach()
        if w.is_meta and source is not None:  # summed where a resident model's weights would be
            w = source.tensors([f"{name}.weight"], device)[f"{name}.weight"]
        h.update(f"{float(w.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def open_state(state_dir: str | os.PathLike[str] | None, fp: str, opts: QuantizeOptions,
               selection: Selection) -> ResumeState:
    """Create the state dir (with ``plan.json``) or check that it was written for ``fp``; what it holds.

    Raises:
        QuantizationError: the state dir was written for another model or other options.
    """
    if state_dir is None:
        return ResumeState(None)
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    plan = state / PLAN_FILE
    if plan.is_file():
        old = json.loads(plan.read_text()).get("fingerprint")
        if old != fp:
            raise QuantizationError(
                f"{state}: resume state was written for another model or other options; "
                "delete it or rerun with the same settings"
            )
    else:
        text = json.dumps({"fingerprint": fp, "options": opts.to_json(), "blocks": list(selection.blocks)}, indent=1)
        atomic_write(plan, lambda tmp: Path(tmp).write_text(text))
    resume = ResumeState(state)
    done = tuple(i for i in range(len(selection.blocks)) if resume.block_path(i).is_file())  # type: ignore[union-attr]
    return dataclasses.replace(resume, have_stats=(state / STATS_FILE).is_file(), done=done)


def release_layers(specs: Mapping[str, Any]) -> dict[str, SVDQLinear]:
    """Empty (meta device) ``SVDQLinear`` modules standing for layers whose tensors are in a block file."""
    return {name: SVDQLinear.from_spec(getattr(spec, "spec", spec), device="meta") for name, spec in specs.items()}


def save_block(layers: Mapping[str, SVDQLinear], path: Path, *, block: str, infos: list[dict[str, Any]],
               timings: Mapping[str, float], streaming: bool = False) -> None:
    """Write a finished block's layers with its report rows and timings (atomic)."""
    save_file(dict(layers), path, metadata={"svdq_block": {"block": block, "layers": infos, "timings": dict(timings)}},
              streaming=streaming)


def load_block_result(model: nn.Module, block_file: Path, *, home: Any, timer: PhaseTimer,
                      release: bool = False) -> list[dict[str, Any]]:
    """Put a finished block's layers (a resume file) into ``model``; return its report rows.

    With ``release`` the layers are put in on the meta device (their tensors stay in the file).
    """
    with timer.phase("io"):
        meta = read_metadata(block_file)
        layers = release_layers(meta.layers) if release else load_file(block_file, device=home)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    timer.add(meta.extra.get("svdq_block", {}).get("timings", {}))
    return list(meta.extra.get("svdq_block", {}).get("layers", []))


def block_file_reader(state_dir: str | os.PathLike[str]) -> Callable[[str], torch.Tensor]:
    """``read(key)``: a tensor of the per-block state files (for ``save_pretrained(read_tensor=)``).

    Headers are parsed once; each call opens the file, reads the one tensor (a fresh aligned
    allocation) and closes it.
    """
    headers = {}
    for f in sorted(Path(state_dir).glob("block-*.safetensors")):
        h = read_header(f)
        for key in h.tensors:
            headers[key] = h

    def read(key: str) -> torch.Tensor:
        h = headers.get(key)
        if h is None:
            raise QuantizationError(f"{state_dir}: tensor {key} is in no block file (state dir changed?)")
        with TensorReader(h) as r:
            return r.get_tensor(key)

    return read
