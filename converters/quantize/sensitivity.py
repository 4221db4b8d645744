"""How much each layer's output error reaches the model's output: the rank allocation's weights.

A layer's relative output error says little about the model's output error: on MiniLM an error
in ``query``/``key`` is damped by the softmax, one in ``value`` or a residual-writing
projection is not (measured end to end: docs/quantization.md). :func:`layer_sensitivity`
estimates, for every observed linear, the mean squared norm of the model output's Jacobian
with respect to that layer's output, per output element (Hutchinson's estimator: backward
passes of ``⟨v, f(x)⟩`` for random ±1 vectors ``v`` give ``E‖Jᵀv‖² = ‖J‖²_F`` for every layer
at once). A layer output error ``δ`` in a random direction then moves the model output by about
``sensitivity · ‖δ‖²``.

It needs a differentiable forward of the whole model on the compute device (no block streaming).
Parameters are frozen for it (no weight gradients are made: activation memory only). On CUDA the
attention runs on the flash, memory-efficient or math kernels, not cuDNN's: a FLUX.1-dev-shaped
run on an H100 (torch 2.11) died in this pass with an illegal memory access while cuDNN was
allowed, and completes without it (docs/quantization.md, "Speed"; cuDNN alone passed
``benchmarks/sdpa_backward_probe.py``, so the exclusion is a precaution, not a proven fix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .device_tree import to_device

__all__ = ["layer_sensitivity", "measure_sensitivity", "model_output"]


def model_output(out: Any) -> torch.Tensor:
    """The main output of a forward as one tensor: a tensor, ``.sample`` / ``.last_hidden_state``
    of a diffusers / transformers output, a tuple's or a mapping's first entry; a list of
    tensors (Z-Image's per-sample latents) flattened into one."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "last_hidden_state"):
        t = getattr(out, attr, None)
        if t is not None:
            return model_output(t)
    if isinstance(out, Mapping) and out:
        return model_output(next(iter(out.values())))
    if isinstance(out, list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return torch.cat([t.reshape(-1) for t in out])
    if isinstance(out, (tuple, list)) and out:
        return model_output(out[0])
    raise TypeError(f"cannot find the output tensor of a {type(out).__name__}")


def _attention_backends(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The SDPA backends of the backward passes: every one but cuDNN's on CUDA (module text)."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def layer_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    samples: Sequence[Mapping[str, Any]],
    *,
    device: torch.device | str,
    draws: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Mean ``‖∂(v·f)/∂y_l‖²`` per output element of each layer ``l`` (see the module text).

    Args:
        model: The unquantized model (on ``device``).
        layers: The linears, by qualified name.
        samples: Forward keyword dicts (a few are enough: the result is an average).
        device: Where the forwards run.
        draws: Random ±1 vectors per sample.
        seed: Seed of the vectors.

    Returns:
        Layer → sensitivity (layers that never ran are missing).
    """
    total: dict[str, float] = {}
    count: dict[str, int] = {}

    def pre(name: str) -> Any:
        def hook(_mod: nn.Module, args: tuple) -> Any:
            x = args[0]
            if torch.is_floating_point(x) and not x.requires_grad:  # a leaf: gradients flow from here on
                return (x.detach().requires_grad_(True), *args[1:])
            return None
        return hook

    def post(name: str) -> Any:
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if not out.requires_grad:
                return

            def grad(g: torch.Tensor) -> None:
                flat = g.detach().float().reshape(-1, g.shape[-1])
                total[name] = total.get(name, 0.0) + float(flat.square().sum(dim=1).mean()) / g.shape[-1]
                count[name] = count.get(name, 0) + 1

            out.register_hook(grad)
        return hook

    gen = torch.Generator().manual_seed(seed)
    handles = []
    for name, mod in layers.items():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    try:
        with _frozen(model), torch.enable_grad(), _attention_backends(device):
            for sample in samples:
                for _ in range(draws):
                    out = model_output(model(**to_device(dict(sample), device)))
                    v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out.device, out.dtype)
                    (out * v).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return {name: total[name] / count[name] for name in total}


def measure_sensitivity(
    model: nn.Module, layers: Mapping[str, nn.Linear], samples: Sequence[Mapping[str, Any]], *,
    device: torch.device | str, seed: int = 0,
) -> dict[str, float]:
    """:func:`layer_sensitivity`, or ``{}`` with a warning when the backward pass runs out of memory."""
    import warnings

    try:
        return layer_sensitivity(model, layers, samples, device=device, seed=seed)
    except torch.OutOfMemoryError:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn("layer sensitivities: out of memory in the backward pass (whole-model forwards on "
                      f"{device}); none measured", UserWarning, stacklevel=2)
        return {}
