"""``mode="auto"`` (the default): the fastest FP8 mode a kernel backend runs for the layer where it
runs, else the format's exact W4A4 math. Tested with a stand-in backend on the CPU that accepts
only the activation modes it is told to (its math is the reference's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import svdq_format as sf
from svdq_format import ops


def _layer(precision: str = "int4") -> tuple[sf.SVDQLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    layer = sf.SVDQLinear(256, 48, rank=8, bias=True, precision=precision, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, dtype=torch.uint8))
        if precision == "int4":
            layer.wscales.copy_((torch.rand(layer.wscales.shape, generator=g) * 0.01 + 1e-3).to(layer.wscales.dtype))
        else:
            layer.wscales.copy_((torch.rand(layer.wscales.shape, generator=g) + 0.5).to(torch.float8_e4m3fn))
            layer.wtscale.fill_(0.01)
        layer.smooth.copy_((torch.rand(256, generator=g) + 0.5).to(torch.bfloat16))
        layer.lora_down.copy_((torch.randn(8, 256, generator=g) / 16).to(torch.bfloat16))
        layer.lora_up.copy_((torch.randn(48, 8, generator=g) / 4).to(torch.bfloat16))
        layer.bias.copy_(torch.randn(48, generator=g).to(torch.bfloat16))
    return layer, torch.randn(5, 256, generator=g).to(torch.bfloat16)


@pytest.fixture
def stand_in():
    """Register a backend that accepts the activation modes in the returned set (empty: none)."""
    accepts: set[str] = set()
    calls: list[str] = []

    def linear(*args):
        calls.append(args[10])
        return ops.reference_linear(*args)

    def supports(call: ops.LinearCall):
        return None if call.act in accepts else f"stand-in: no {call.act}"

    ops.register_backend(ops.Backend("stand-in", linear, supports, priority=50,
                                     linear_fp8=lambda *a: ops.reference_linear_fp8(*a)))
    yield accepts, calls
    ops.unregister_backend("stand-in")


def _run(layer, x, act):
    args = (x, layer.qweight, layer.wscales, layer.wtscale, layer.smooth, layer.lora_down, layer.lora_up, layer.bias,
            None, layer.precision, act)
    return ops.reference_linear(*args)


def test_auto_is_the_default_and_exact_without_a_kernel_backend():
    layer, x = _layer()
    assert layer.mode == "auto" and layer.act == "int4"
    assert torch.equal(layer(x), _run(layer, x, "int4"))


def test_auto_takes_the_fastest_fp8_mode_a_backend_runs(stand_in, monkeypatch):
    accepts, calls = stand_in
    layer, x = _layer()
    accepts.update({"fp8", "fp8w"})
    assert layer.act == "fp8w"
    assert torch.equal(layer(x), _run(layer, x, "fp8w")) and calls[-1] == "fp8w"
    accepts.discard("fp8w")
    ops.register_backend(ops.get_backend("stand-in"), replace=True)  # a registry change re-decides
    assert layer.act == "fp8" and torch.equal(layer(x), _run(layer, x, "fp8"))
    layer.backend = "reference"  # forced onto the reference: the format's exact math
    assert layer.act == "int4" and torch.equal(layer(x), _run(layer, x, "int4"))
    layer.backend = "auto"
    monkeypatch.setenv("SVDQ_BACKEND", "reference")
    assert layer.act == "int4"
    monkeypatch.delenv("SVDQ_BACKEND")
    layer.mode = "exact"  # an explicit mode is kept
    assert layer.act == "int4" and calls[-1] == "fp8"
    nv, _ = _layer("nvfp4")
    assert nv.act == "fp8"  # fp8w is an int4 mode
    accepts.clear()
    ops.register_backend(ops.get_backend("stand-in"), replace=True)
    assert nv.act == "nvfp4" and _layer()[0].act == "int4"


@pytest.mark.parametrize("prologue,graph", [
    ("fused", ["svdquant.linear"]),  # the default: the backend quantizes x in its low-rank pass
    ("inductor", ["svdquant.smooth_reciprocal", "svdquant.linear_fp8"]),  # the quantizer in the graph
])
def test_auto_is_a_constant_for_torch_compile(stand_in, monkeypatch, prologue, graph):
    """Dynamo evaluates the choice once while tracing (no graph break); the compiled layer runs the
    chosen mode (fp8w) as the ``SVDQ_FAST8_PROLOGUE`` setting says."""
    from tests.test_fast8 import _graph_ops

    monkeypatch.setattr(ops, "FAST8_PROLOGUE", prologue)
    accepts, _ = stand_in
    accepts.add("fp8w")
    layer, x = _layer()
    found, got = _graph_ops(layer, x)
    assert found == graph
    assert torch.equal(got, _run(layer, x, "fp8w"))


def test_set_mode_accepts_auto():
    layer, x = _layer()
    sf.set_mode(layer, "exact")
    assert layer.mode == "exact"
    sf.set_mode(layer, "auto")
    assert layer.mode == "auto" and torch.equal(layer(x), _run(layer, x, "int4"))


def test_backend_plugins_load_on_the_first_gpu_call(monkeypatch):
    """Entry points of the ``svdquant.backends`` group register their backends the first time a
    call names a CUDA device (no ``import svdq_kernels`` needed), once; a broken plugin is one
    warning, not an error; CPU calls never load them. The package declares its own."""
    import importlib.metadata
    from pathlib import Path

    import tomllib

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert declared["project"]["entry-points"][ops.PLUGIN_GROUP] == {"cutlass-sm90": "svdq_kernels.registry:register"}

    loads: list[str] = []

    def register():
        loads.append("plugged")
        ops.register_backend(ops.Backend("plugged", ops.reference_linear, lambda c: None, priority=10_000),
                             replace=True)

    def broken():
        raise ImportError("no module named 'cuda_thing'")

    class EP:
        def __init__(self, name, fn):
            self.name, self.value, self._fn = name, f"tests:{name}", fn

        def load(self):
            return self._fn

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: ([EP("plugged", register), EP("broken", broken)]
                                       if group == ops.PLUGIN_GROUP else []))
    monkeypatch.setattr(ops, "_PLUGINS_LOADED", [False])
    try:
        cpu = ops.LinearCall(torch.device("cpu"), torch.bfloat16, "int4", "int4", 1, 256, 48, 8, False)
        assert ops.select_backend(cpu).name == "reference" and loads == []
        gpu = dataclasses.replace(cpu, device=torch.device("cuda"))
        with pytest.warns(RuntimeWarning, match=r"plugin 'broken' \(tests:broken\) failed to load: ImportError"):
            assert ops.select_backend(gpu).name == "plugged"
        ops.select_backend(gpu)
        assert loads == ["plugged"]  # once per process
    finally:
        ops.unregister_backend("plugged")



def test_auto_mode_compiles_after_layers_whose_shifts_differed():
    """Layers compiled one by one whose ``act_shift`` differs (the same ``forward``: dynamo then makes
    the shift a symbolic float), then a layer in ``auto`` mode: its ``auto_act`` (a constant function)
    must not be handed that symbolic float ("assume_constant_result argument conversion failed")."""
    def layer(shift, mode):
        lin = sf.SVDQLinear(256, 64, rank=16, bias=True, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.qweight.random_(0, 255), lin.wscales.fill_(0.01), lin.smooth.fill_(1), lin.bias.zero_()
            lin.lora_down.normal_(), lin.lora_up.normal_()
        lin.act_shift, lin.act_unsigned, lin.mode = shift, bool(shift), mode
        return lin

    def backend(gm, example_inputs):
        return gm.forward

    x = torch.randn(4, 256, dtype=torch.bfloat16)
    torch._dynamo.reset()
    try:
        for shift, mode in ((0.171875, "fast8"), (0.0, "fast8"), (0.171875, "fast8"), (0.25, "auto")):
            lin = layer(shift, mode)
            assert torch.equal(torch.compile(lin, backend=backend, fullgraph=True)(x), lin(x))
    finally:
        torch._dynamo.reset()
