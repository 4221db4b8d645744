"""Calibration one block at a time: each block is placed on the device once for all samples.

The whole-model calibration (:func:`converters.quantize.stats.collect_stats`) runs every
sample through the whole model, so with streamed weights (``--offload blocks`` / ``disk``)
every block is moved (or read from disk) once per sample. Here instead:

1. every sample runs through the model up to the first repeated block, whose inputs
   (``args``/``kwargs``) are captured and kept on the compute device;
2. for each block in order: the block is placed on the device once, every sample runs through
   it (same hooks, same sample order, the row-sampling generator state of each sample carried
   over from the previous block), its outputs become the next block's inputs, the block is
   dropped;
3. what follows the last block (the final AdaLN ``norm_out`` and ``proj_out``) runs on the
   last block's outputs.

Every linear sees the same tensors and the generator produces the same keys as in the
whole-model forward, so the statistics are bit-identical (``tests/test_quantize_blockwise.py``).

Only for models whose forward wiring between blocks is stated here (diffusers 0.42):
``FluxTransformer2DModel`` (double and single blocks are both called as
``block(hidden_states=, encoder_hidden_states=, temb=, image_rotary_emb=,
joint_attention_kwargs=)`` and return ``(encoder_hidden_states, hidden_states)``; nothing runs
between the two stacks but controlnet residuals) and ``SD3Transformer2DModel`` (the same call
without rotary embeddings; the last block returns ``(None, hidden_states)``); both end with
``proj_out(norm_out(hidden_states, temb))``. Other models, and samples with controlnet,
IP-adapter or skip-layer inputs, use the whole-model path: :func:`blockwise_supported` says
which.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from svdq_format.errors import QuantizationError

from .blocks import block_containers
from .stats import CalibrationStats, StatsRecorder, sample_seed, to_device

__all__ = ["blockwise_supported", "collect_stats_blockwise"]

#: Models whose blocks are all called as ``block(hidden_states=, encoder_hidden_states=, temb=,
#: ...)`` and return ``(encoder_hidden_states, hidden_states)``, followed by
#: ``proj_out(norm_out(hidden_states, temb))``: class name → (block lists in call order, sample
#: keys that change the wiring: controlnet residuals, IP adapters, skipped layers).
_WIRINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FluxTransformer2DModel": (("transformer_blocks", "single_transformer_blocks"),
                               ("controlnet_block_samples", "controlnet_single_block_samples",
                                "joint_attention_kwargs")),
    "SD3Transformer2DModel": (("transformer_blocks",),
                              ("block_controlnet_hidden_states", "joint_attention_kwargs", "skip_layers")),
}


class _Captured(Exception):
    """Stops the forward at the first block once its inputs are recorded."""


def blockwise_supported(model: nn.Module, samples: Sequence[Mapping[str, Any]]) -> bool:
    """Whether :func:`collect_stats_blockwise` knows how ``model``'s blocks feed each other."""
    wiring = _WIRINGS.get(type(model).__name__)
    if wiring is None or getattr(model, "gradient_checkpointing", False):
        return False
    if tuple(name for name, _ in block_containers(model)) != wiring[0]:
        return False
    return not any(s.get(k) is not None for s in samples for k in wiring[1])


def _next_inputs(out: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    encoder_hidden_states, hidden_states = out
    return {**kwargs, "encoder_hidden_states": encoder_hidden_states, "hidden_states": hidden_states}


def _tail(model: nn.Module, kwargs: Mapping[str, Any]) -> None:
    norm_out: Any = model.norm_out
    proj_out: Any = model.proj_out
    proj_out(norm_out(kwargs["hidden_states"], kwargs["temb"]))  # as the models' forward


def collect_stats_blockwise(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    samples: Sequence[Mapping[str, Any]],
    *,
    max_rows: int = 256,
    seed: int = 0,
    device: torch.device | str,
    load_block: Callable[[nn.Module, str], None],
    drop_block: Callable[[nn.Module], None],
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    hessians: Collection[str] = (),
) -> CalibrationStats:
    """:func:`converters.quantize.stats.collect_stats`, one block at a time (same result).

    Args:
        model: A model for which :func:`blockwise_supported` is true; everything outside its
            blocks is moved to ``device`` for the call (and back to the CPU after).
        layers: The linears to observe, by qualified name.
        samples: Forward keyword dicts.
        max_rows: Row budget per layer.
        seed: Seed of the row sampler.
        device: Where the forwards run; the activations between blocks stay there.
        load_block: ``load_block(block, qualified name)`` puts a block's weights on ``device``
            (moved from the CPU, or read from disk).
        drop_block: Gives a block's device memory back after all samples ran through it.
        shard: ``(rank, world)``: run only samples ``i`` with ``i % world == rank``.
        progress: A tqdm bar over the blocks.
        hessians: Layers whose ``XᵀX`` over every row is accumulated.

    Raises:
        QuantizationError: NaN/inf activations (naming the layer and sample), empty set.
    """
    from tqdm.auto import tqdm

    rank, world = shard
    if not samples:
        raise QuantizationError("calibration set is empty")
    mine = [i for i in range(len(samples)) if i % world == rank]
    blocks = [(f"{cname}.{j}", b) for cname, lst in block_containers(model) for j, b in enumerate(lst)]
    block_ids = {id(b) for _, b in blocks}
    rest = [m for m in model.children() if not any(id(x) in block_ids for x in m.modules())]
    # rows stay on the device (off host RAM)
    rec = StatsRecorder(max_rows=max_rows, row_device=device, hessians=hessians)
    handles = [mod.register_forward_pre_hook(rec.hook(name)) for name, mod in layers.items()]
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    gens: list[torch.Tensor] = []

    def capture(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((args, dict(kwargs)))
        raise _Captured

    try:
        for m in rest:
            m.to(device)
        with torch.no_grad():
            first = blocks[0][1].register_forward_pre_hook(capture, with_kwargs=True)
            try:
                for n, i in enumerate(mine):  # up to the first block (and the layers before it)
                    rec.begin(i, first=n == 0)
                    rec.gen.manual_seed(sample_seed(seed, i))
                    try:
                        model(**to_device(dict(samples[i]), device))
                    except _Captured:
                        pass
                    else:
                        raise QuantizationError(f"{type(model).__name__}: the forward never reached its first block")
                    gens.append(rec.gen.get_state())
            finally:
                first.remove()
            for name, block in tqdm(blocks, desc="calibration", unit="block", disable=not progress):
                load_block(block, name)
                for n, i in enumerate(mine):
                    rec.begin(i, first=n == 0)
                    rec.gen.set_state(gens[n])
                    args, kwargs = inputs[n]
                    inputs[n] = (args, _next_inputs(block(*args, **kwargs), kwargs))
                    gens[n] = rec.gen.get_state()
                drop_block(block)
            for n, i in enumerate(mine):  # after the last block
                rec.begin(i, first=n == 0)
                rec.gen.set_state(gens[n])
                _tail(model, inputs[n][1])
                inputs[n] = ((), {})  # activations freed as soon as they are used
    finally:
        for h in handles:
            h.remove()
        for m in rest:
            m.to("cpu")
    return rec.finish(layers, world=world, samples=len(mine))
