"""Quantize without the whole 16-bit model in memory: blocks are read from the source shards.

:func:`load_lazy` builds the diffusers model on the meta device and reads only what lies
outside the repeated blocks (embedders, norms, final layers). :class:`ShardedSource` reads a
block's tensors from the model's safetensors files (straight to the GPU, or tensor by tensor to the CPU) when the
block runs during calibration (:func:`stream_from_source`, then back to meta) and when its
layers are quantized; what is left on meta at the end (block norms) is read last.
``svdq quantize --offload disk`` uses it; the result is byte-identical to loading the model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdq_format import jsonsafe
from svdq_format.errors import QuantizationError

from .blocks import around_blocks, block_containers, in_block
from .source import check_model_dir

__all__ = ["ShardedSource", "load_lazy", "stream_from_source"]


class ShardedSource:
    """The tensors of a diffusers model directory, read on demand from its safetensors files.

    Args:
        directory: Directory with ``diffusion_pytorch_model.safetensors`` or the sharded
            ``diffusion_pytorch_model.safetensors.index.json``.
        dtype: Floating tensors are cast to this dtype (as ``from_pretrained(torch_dtype=)``).
    """

    def __init__(self, directory: str | os.PathLike[str], dtype: torch.dtype) -> None:
        d = Path(directory)
        index = d / "diffusion_pytorch_model.safetensors.index.json"
        single = d / "diffusion_pytorch_model.safetensors"
        if index.is_file():
            weight_map = jsonsafe.loads(index.read_text()).get("weight_map", {})
            self.files = {k: d / v for k, v in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(os.fspath(single), framework="pt") as h:
                self.files = {k: single for k in h.keys()}
        else:
            raise QuantizationError(f"{d}: no diffusion_pytorch_model.safetensors(.index.json) to stream from")
        self.dtype = dtype
        self._headers: dict[Path, Any] = {}

    def tensors(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Several tensors, cast like ``from_pretrained`` does, on ``device``.

        To a CUDA device the bytes go straight from the files through a small pinned ring
        (:func:`svdq_format.device_read.read_to_device`), so host memory never holds a block.
        To the CPU a file is opened for one tensor only: a mapping kept open would keep every
        page read so far resident (and counted in the RSS), i.e. a whole block, or the whole
        model by the end.
        """
        by_file: dict[Path, list[str]] = {}
        for name in names:
            f = self.files.get(name)
            if f is None:
                raise QuantizationError(f"{name}: not in the source checkpoint")
            by_file.setdefault(f, []).append(name)
        dev = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for f, keys in by_file.items():
            if dev.type == "cuda":
                from svdq_format.device_read import read_to_device

                got = read_to_device(self._header(f), dev, names=keys)
                for k in keys:  # the same rounding as a CPU cast (round to nearest even)
                    t = got.pop(k)
                    out[k] = t.to(self.dtype) if t.is_floating_point() else t
                continue
            from safetensors import safe_open

            for k in keys:  # opened per tensor: at most one tensor's pages are mapped (and counted)
                with safe_open(os.fspath(f), framework="pt", device="cpu") as h:
                    t = h.get_tensor(k)
                    # as diffusers' loader does (safetensors get_tensor): the same buffers, hence
                    # the same CPU BLAS code paths (their results can depend on alignment)
                    t = t.to(self.dtype) if t.is_floating_point() else t
                    out[k] = t.to(dev)
                    del t
        return out

    def _header(self, f: Path) -> Any:
        """The checked safetensors header of source file ``f`` (parsed once)."""
        from svdq_format.io import read_header

        got = self._headers.get(f)
        if got is None:
            got = self._headers[f] = read_header(f)
        return got

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor (CPU), cast like ``from_pretrained`` does."""
        return self.tensors([name])[name]

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu") -> None:
        """Read every meta parameter/buffer of ``module`` (qualified by ``prefix``) onto ``device``.

        Quantized layers (``SVDQLinear``, e.g. released to the meta device after their block
        file was written) are not source tensors and are left alone.
        """
        from svdq_format.linear import SVDQLinear

        pre = f"{prefix}." if prefix else ""
        skip = tuple(f"{n}." for n, m in module.named_modules() if isinstance(m, SVDQLinear))
        todo = [name for name, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_meta and not (skip and name.startswith(skip))]
        got = self.tensors([pre + n for n in todo], device)
        state = {n: got[pre + n] for n in todo}
        if state:
            module.load_state_dict(state, strict=False, assign=True)
            for p in module.parameters():
                p.requires_grad_(False)


def load_lazy(src: str | os.PathLike[str], *, dtype: torch.dtype) -> tuple[nn.Module, ShardedSource]:
    """The model of a diffusers directory with its repeated blocks left on the meta device.

    Raises:
        QuantizationError: not a diffusers model directory, no safetensors weights.
    """
    cls, d = check_model_dir(src)
    source = ShardedSource(d, dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(d))
    finally:
        torch.set_default_dtype(old)
    for name, mod in model.named_modules():  # everything outside the repeated blocks
        if in_block(model, name):
            continue
        own = [n for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)] if t.is_meta]
        if own:
            pre = f"{name}." if name else ""
            got = source.tensors([pre + n for n in own])
            mod.load_state_dict({n: got[pre + n] for n in own}, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), source


@contextlib.contextmanager
def stream_from_source(model: nn.Module, source: ShardedSource, device: torch.device | str) -> Iterator[None]:
    """During calibration: read each block onto ``device`` when it runs, drop it after."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [b for _, lst in block_containers(model) for b in lst]

    def load(mod: nn.Module, _args: tuple) -> None:
        source.materialize(mod, names[id(mod)], device)

    def drop(mod: nn.Module, _args: tuple, _out: Any) -> None:
        mod.to("meta")

    rest = [m for m in model.children() if not any(id(x) in {id(b) for b in blocks} for x in m.modules())]
    for m in rest:
        m.to(device)
    try:
        with around_blocks(blocks, load, drop):
            yield
    finally:
        for m in rest:
            m.to("cpu")
