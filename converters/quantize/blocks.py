"""A model's repeated blocks and where their weights live while the quantizer works.

* :func:`block_containers` / :func:`in_block` — which modules are the repeated blocks;
* :class:`Placement` (:func:`decide_placement`) — where a run computes, and whether blocks are
  streamed onto that device one at a time (``--offload blocks`` / ``disk``);
* :func:`around_blocks` / :func:`block_offload` — streaming blocks in and out around their
  forwards (calibration);
* :func:`placed_linears` / :func:`linear_at` — one block's linears on the device while they are
  quantized.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from .families import block_lists

__all__ = [
    "block_containers",
    "in_block",
    "Placement",
    "decide_placement",
    "around_blocks",
    "block_offload",
    "linear_at",
    "placed_linears",
]

def block_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's lists of repeated blocks, ``(qualified name, ModuleList)``, in module order
    (found from the structure: :func:`converters.quantize.families.block_lists`)."""
    return block_lists(model)


def in_block(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` is one of the repeated blocks or inside one (block names cached on the model)."""
    names = getattr(model, "_svdq_block_names", None)
    if names is None:
        names = [f"{c}.{i}" for c, lst in block_containers(model) for i in range(len(lst))]
        object.__setattr__(model, "_svdq_block_names", names)
    return any(name == b or name.startswith(b + ".") for b in names)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run computes and keeps its model.

    Attributes:
        device: Where calibration and quantization run.
        stream: Blocks live elsewhere (``home``, or the source files) and visit ``device`` one
            at a time.
        home: Where the model lives between block visits (the CPU when streaming).
    """

    device: torch.device
    stream: bool
    home: torch.device


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decide_placement(model: nn.Module, device: torch.device | str | None, offload: str | bool, *,
                     from_source: bool) -> Placement:
    """The placement of a run (see :func:`converters.quantize.pipeline.run_quantization`'s ``offload``).

    Raises:
        QuantizationError: CUDA requested but not available.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("device cuda requested but CUDA is not available")
    if offload == "auto":
        stream = dev.type == "cuda" and _model_bytes(model) > 0.7 * torch.cuda.mem_get_info(dev)[0]
    else:
        stream = offload in (True, "blocks") or from_source
    return Placement(dev, stream, torch.device("cpu") if stream else dev)


@contextlib.contextmanager
def around_blocks(
    blocks: Iterable[nn.Module], before: Callable[[nn.Module, tuple], None],
    after: Callable[[nn.Module, tuple, Any], None],
) -> Iterator[None]:
    """Call ``before(block, args)`` as each block's forward starts and ``after(block, args,
    output)`` as it ends (forward hooks, removed on exit): how blocks are streamed in and out."""
    handles = []
    for b in blocks:
        handles.append(b.register_forward_pre_hook(before))
        handles.append(b.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def block_offload(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Keep blocks on the CPU and move each onto ``device`` only while it runs.

    Everything outside the block lists (embedders, norms, final layers) lives on ``device``
    for the duration. Restores the CPU placement afterwards.
    """
    blocks = [b for _, lst in block_containers(model) for b in lst]
    block_ids = {id(b) for b in blocks}

    def place_rest(mod: nn.Module) -> None:
        for child in mod.children():
            if id(child) in block_ids:
                continue
            if isinstance(child, nn.ModuleList) and any(id(c) in block_ids for c in child):
                continue
            if any(id(m) in block_ids for m in child.modules()):
                place_rest(child)
            else:
                child.to(device)
        for pname, param in list(mod.named_parameters(recurse=False)):
            param.data = param.data.to(device)
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None:
                setattr(mod, bname, buf.to(device))

    def load(mod: nn.Module, _args: tuple) -> None:
        mod.to(device)

    def unload(mod: nn.Module, _args: tuple, _out: Any) -> None:
        mod.to("cpu")

    place_rest(model)
    try:
        with around_blocks(blocks, load, unload):
            yield
    finally:
        model.to("cpu")


def linear_at(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` at ``name``.

    Raises:
        QuantizationError: the module there is not a linear.
    """
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise QuantizationError(f"layer {name}: expected an nn.Linear, found {type(mod).__name__}")
    return mod


@contextlib.contextmanager
def placed_linears(model: nn.Module, names: Iterable[str], device: torch.device | str, *, stream: bool,
                   source: Any = None) -> Iterator[dict[str, nn.Linear]]:
    """The linears ``names`` on ``device`` while they are quantized: read there from ``source``
    (``--offload disk``) and/or moved there when blocks stream; afterwards dropped back to meta
    (disk: read again if ever needed) or to the CPU. (After an error they stay where they are.)"""
    names = list(names)
    if source is not None:
        for n in names:
            source.materialize(model.get_submodule(n), n, device)
    mods = {n: linear_at(model, n) for n in names}
    if stream:
        for m in mods.values():
            m.to(device)
    yield mods
    if stream:
        for m in mods.values():
            m.to("meta" if source is not None else "cpu")
