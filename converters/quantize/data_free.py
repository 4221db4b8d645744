"""The data-free layer quantizer: what quantizing while loading runs per input group.

``from_pretrained(dense, quantization_config=SVDQuantConfig(precision=..., rank=...))`` reaches it
through :mod:`svdq_format.quantize_on_load` (by name: ``svdq_format`` imports nothing of ours).
It chooses the same layers as ``svdq quantize`` (:func:`~converters.quantize.selection.select_layers`)
and runs the same per-layer math (:func:`~converters.quantize.layer.quantize_group`: the smoothing
search scored on the whole SVDQ layer's output error, randomised SVD, clipping search, low-rank
refinement; GPTQ off), with the calibration statistics replaced by a model of the input that needs
no data: every input channel of the same scale (``absmax = 1``), the scoring rows drawn from
N(0, 1). Then the smoothing candidates ``s = amax_x^α / amax_w^(1−α)`` become
``s = amax_w^(−β)`` (β = 1 − α ∈ :data:`SMOOTHING_EXPONENTS`) and ``s = 1``: **smoothing from the
weights alone**, each candidate judged on what it does to the 4-bit weights *and* the 4-bit
activations (a fixed β = 0.5 without that judgement is the diffusers development branch's
recipe); the clipping search weighs each input channel's error by ``E[(x/s)²] = 1/s²``. A linear whose input is
a GELU's output by the model's structure (diffusers' ``FeedForward`` with ``GELU``: ``ff.net.2``;
transformers' ``*.output.dense`` after a GELU ``intermediate``) is scored on ``GELU(z)`` rows
instead, bounded below like its real input, so the search also tries the format's shifted
unsigned int4 activation codes (docs/format.md §7.2), as the calibrated quantizer does where it
measures such inputs.
(A grid of four candidates, not the calibrated quantizer's ten: on MiniLM the full grid was no
closer to the dense layers, 0.1191 against 0.1195, and cost twice the time; docs/quantization.md.)

Input groups (linears reading one input, given one smoothing vector, which diffusers'
``fuse_qkv_projections`` needs: :mod:`svdq_format.fusion`) come from the attention modules'
structure, as fusing finds them: ``to_q``/``to_k``/``to_v`` (``to_k``/``to_v`` in
cross-attention) and ``add_q_proj``/``add_k_proj``/``add_v_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from svdq_format.fusion import FUSIONS
from svdq_format.linear import SVDQLinear
from svdq_format.quantize_on_load import LayerPlan, OnLoadOptions

from .layer import layer_seed, quantize_group
from .options import QuantizeOptions
from .residual import DEFAULT_CLIP_RATIOS
from .selection import select_layers
from .stats import CalibrationStats, LayerStats

__all__ = ["DataFreeQuantizer", "SEARCH_ROWS", "SMOOTHING_EXPONENTS", "input_groups", "post_gelu_inputs",
           "quantize_options"]

#: Synthetic N(0, 1) input rows the smoothing search scores its candidates on.
SEARCH_ROWS = 64
#: The weight exponents β of the smoothing candidates ``s = amax_w^(−β)`` (``s = 1`` is tried too).
SMOOTHING_EXPONENTS: tuple[float, ...] = (0.75, 0.5, 0.25)


def quantize_options(options: OnLoadOptions) -> QuantizeOptions:
    """The quantizer options of a data-free run (what ``svdq quantize`` would use, less what
    needs activations: GPTQ and activation-only smoothing candidates)."""
    return QuantizeOptions(
        rank=options.rank, precision=options.precision, smoothing=options.smoothing,
        alphas=tuple(1.0 - b for b in SMOOTHING_EXPONENTS),
        activation_alphas=(), clip_search=options.clip_search, clip_ratios=DEFAULT_CLIP_RATIOS,
        unsigned_acts=True, gptq=False, refine_iters=options.refine_iters, lowrank="auto",
        w4a16_rank=options.w4a16_rank, weight_only=options.weight_only, calib_rows=SEARCH_ROWS,
        include=options.include, exclude=options.exclude, seed=options.seed,
    )


def input_groups(model: nn.Module, kinds: Mapping[str, str]) -> list[tuple[str, ...]]:
    """The selected linears in input groups: an attention module's q/k/v (k/v in cross-attention)
    and its added q/k/v projections when all are selected with one kind; every other linear alone.
    Groups are in module order."""
    group_of: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        members = [FUSIONS["to_kv"] if getattr(module, "is_cross_attention", False) else FUSIONS["to_qkv"],
                   FUSIONS["to_added_qkv"]]
        for names in members:
            full = tuple(f"{name}.{m}" if name else m for m in names)
            if all(f in kinds for f in full) and len({kinds[f] for f in full}) == 1:
                group_of.update(dict.fromkeys(full, full))
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for n in kinds:
        if n not in seen:
            group = group_of.get(n, (n,))
            seen.update(group)
            groups.append(group)
    return groups


def post_gelu_inputs(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """The linears among ``names`` whose input is a GELU's output, by the model's structure, with
    the GELU's ``approximate`` (``"tanh"`` or ``"none"``): diffusers' ``FeedForward`` (``net[0]`` a
    ``GELU``, the linear ``net.2``) and transformers' ``<layer>.output.dense`` after
    ``<layer>.intermediate.intermediate_act_fn`` of a GELU class. Every GELU variant is ≥ −0.17."""
    out: dict[str, str] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        try:
            if name.endswith("net.2"):
                act = model.get_submodule(f"{parent}.0")  # parent: the FeedForward's ``net``
                if type(act).__name__ == "GELU":
                    out[name] = str(getattr(act, "approximate", "none"))
            elif name.endswith("output.dense"):
                layer = parent.rpartition(".")[0]
                act = getattr(model.get_submodule(f"{layer}.intermediate" if layer else "intermediate"),
                              "intermediate_act_fn")
                kind = type(act).__name__
                if "GELU" in kind and "GLU" not in kind.replace("GELU", ""):
                    out[name] = "tanh" if "Tanh" in kind or "New" in kind else "none"
        except (AttributeError, IndexError, TypeError):
            continue
    return out


def _synthetic_stats(group: Sequence[str], in_features: int, seed: int, device: torch.device,
                     gelu: str | None = None) -> CalibrationStats:
    """One input model for the group: ``absmax = 1`` per channel, N(0, 1) rows — ``GELU`` of them
    for a post-GELU input (``gelu`` = its ``approximate``) — seeded by the group's first layer and
    drawn on the CPU, so every device scores the same rows."""
    g = torch.Generator().manual_seed(layer_seed(seed, group[0]))
    rows = torch.randn(SEARCH_ROWS, in_features, generator=g)
    if gelu is not None:
        rows = torch.nn.functional.gelu(rows, approximate=gelu)
    stats = LayerStats(absmax=torch.ones(in_features, device=device), rows=rows.to(device),
                       keys=torch.arange(SEARCH_ROWS, dtype=torch.float64), count=SEARCH_ROWS,
                       minval=float(rows.min()) if gelu is not None else float("-inf"))
    return CalibrationStats(dict.fromkeys(group, stats), [list(group)], source="data-free")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` around the tensors (no copy, no initialisation)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class DataFreeQuantizer:
    """:class:`svdq_format.quantize_on_load.LayerQuantizer` from the weights alone."""

    method = "data-free"

    def __init__(self) -> None:
        #: Planned linears whose input is a GELU's output → the GELU's ``approximate``.
        self.post_gelu: dict[str, str] = {}

    def plan(self, model: nn.Module, options: OnLoadOptions) -> LayerPlan:
        """``svdq quantize``'s layer choice, in structural input groups."""
        sel = select_layers(model, include=options.include, exclude=options.exclude, weight_only=options.weight_only)
        self.post_gelu = post_gelu_inputs(model, [n for n, k in sel.kinds.items() if k == "w4a4"])
        return LayerPlan(kinds=dict(sel.kinds), groups=input_groups(model, sel.kinds), skipped=dict(sel.skipped))

    def settings(self, options: OnLoadOptions) -> dict[str, Any]:
        """What it quantizes with beyond the options (recorded in the checkpoint)."""
        opts = quantize_options(options)
        return {
            "smoothing_exponents": [round(1.0 - a, 6) for a in opts.alphas] if options.smoothing else [],
            "search_inputs": f"{SEARCH_ROWS} rows of N(0, 1) per input group (GELU of them after a GELU)",
            "clip_ratios": list(opts.clip_ratios) if options.clip_search else [],
            "lowrank": opts.lowrank,
            "gptq": opts.gptq,
            "unsigned_acts": opts.unsigned_acts,
        }

    @torch.no_grad()
    def quantize(self, group: Sequence[str], weights: Mapping[str, torch.Tensor],
                 biases: Mapping[str, torch.Tensor | None], kinds: Mapping[str, str],
                 options: OnLoadOptions) -> dict[str, SVDQLinear]:
        """Quantize one input group (tensors on the compute device, in the compute dtype)."""
        names = list(group)
        linears = {n: _linear(weights[n], biases[n]) for n in names}
        first = weights[names[0]]
        gelu = self.post_gelu.get(names[0]) if len(names) == 1 else None
        stats = _synthetic_stats(names, first.shape[1], options.seed, first.device, gelu)
        # quantize_group seeds torch's generators per layer: leave the caller's random state as it was
        with torch.random.fork_rng(devices=[first.device] if first.device.type == "cuda" else []):
            done = quantize_group(names, linears, kinds, stats, quantize_options(options), report=False)
        return {n: layer for n, (layer, _) in done.items()}
