"""A GELU-shifted layer (``act_shift`` 0.171875 with unsigned codes: a converted Nunchaku FLUX.1
``mlp_fc2``, K = 12288, N = 3072, rank 32, bias, bf16) in ``fast8`` on a Hopper GPU. The FP8 modes
quantize the unshifted ``x · (1/s)`` and add the shift as a bias (``ops.fp8_bias``), so the
activations are signed and the layer takes the fast kernels — the fused prologue, the ``lowrank``
k-tiles GEMM, at M ≥ 2048 the pre-converted (SS) kernel — instead of the promoted ones, which stay
for one-signed layers without a shift (a ReLU-fed layer). CPU side: tests/test_fp8_shift_bias.py.

Bounds (errors ‖out − ref‖₂ / ‖ref‖₂ as in test_kernels_gpu.py): against the reference (CPU, IEEE
fp32) the fast8 kernels' 5e-3 (test_kernels_fast8_gpu.py; on signed activations Hopper's FP8 fast
accumulation measured 2.6e-3 at K = 12288, benchmarks/results/fp8_accumulation_h100.json, but
1.15e-2 on the shifted post-GELU rows, which the promoted kernels were for). Unshifted, these rows
are still mostly positive (their e4m3 codes' mean / std 11.3 / 23.0 against 12.9 / 23.4 shifted, on
tests/test_kernels_segmented_gpu.py's data), so whether the fast accumulation keeps its signed-data
accuracy on them is what these tests measure; if not, ``cutlass_fast8.PROMOTE_SHIFTED = True`` sends
such layers to the promoted kernels again (the unshifted codes and the shift bias stay).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import svdq_format as sf
from svdq_format import ops, packing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                       reason="needs an sm_90 GPU"),
]

import svdq_kernels  # noqa: E402,F401  (registers cutlass-sm90)
from svdq_kernels import cutlass_fast8  # noqa: E402
from svdq_kernels.configs import SsLowrankGemmConfig  # noqa: E402

SHIFT = 0.171875


def _fc2(k: int = 12288, n: int = 3072, *, shift: float = SHIFT, seed: int = 0) -> sf.SVDQLinear:
    """A random GELU-fed layer as the quantizer / the Nunchaku importer write it: ``act_shift`` with
    unsigned codes and the exact mode's correction ``b − Q(R) · (shift / s)`` in the stored bias."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    layer = sf.SVDQLinear(k, n, rank=32, bias=True, dtype=torch.bfloat16, device="cuda", act_shift=shift,
                          act_unsigned=True)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, device="cuda", dtype=torch.uint8))
        layer.wscales.copy_(torch.rand(layer.wscales.shape, generator=g, device="cuda") * 0.004 + 0.001)
        layer.smooth.copy_(torch.rand(k, generator=g, device="cuda") * 1.5 + 0.25)
        layer.lora_down.copy_(torch.randn(32, k, generator=g, device="cuda") / k**0.5)
        layer.lora_up.copy_(torch.randn(n, 32, generator=g, device="cuda") * 0.5)
        b = torch.randn(n, generator=g, device="cuda") * 0.1
        layer.bias.copy_(b - layer.residual() @ (shift / layer.smooth.float()))
    layer.mode = "fast8"
    return layer


def _rows(m: int, k: int = 12288, *, seed: int = 1, relu: bool = False) -> torch.Tensor:
    """Post-GELU rows (≥ −0.17; one-signed once shifted), or post-ReLU (one-signed as they are)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = 3 * torch.randn(m, k, generator=g, device="cuda")
    return (torch.relu(x) if relu else torch.nn.functional.gelu(x, approximate="tanh")).to(torch.bfloat16)


def _args(layer: sf.SVDQLinear, device: str) -> tuple:
    def on(t):
        return None if t is None else t.to(device)

    return (on(layer.qweight), on(layer.wscales), None, on(layer.smooth), on(layer.lora_down), on(layer.lora_up),
            on(layer.bias), None, "int4", "fp8w", layer.act_shift, layer.act_unsigned)


def _reference(layer: sf.SVDQLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference (CPU, IEEE fp32): unshifted codes, the shift-corrected bias."""
    return ops.reference_linear(x.cpu(), *_args(layer, "cpu")).float()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


@pytest.mark.parametrize("prologue", ["fused", "inductor"])
@pytest.mark.parametrize("m", [16, 300, 4608])
def test_gelu_shifted_layer_runs_the_fast_kernels(monkeypatch, kernels_run, prologue, m):
    """Eager and compiled: no promoted kernel; at M ≥ 2048 the pre-converted kernel (the default
    ``SVDQ_FAST8_WEIGHTS=e4m3``); within the fast8 bound of the reference, whose bias the GPU's
    ``fp8_bias`` equals bit for bit."""
    monkeypatch.setattr(ops, "FAST8_PROLOGUE", prologue)
    layer = _fc2()
    x = _rows(m, seed=m)
    gpu_bias = ops.fp8_bias(*_args(layer, "cuda")[:4], layer.bias, "int4", "fp8w", SHIFT, dtype=torch.bfloat16)
    cpu_bias = ops.fp8_bias(*_args(layer, "cpu")[:4], layer.bias.cpu(), "int4", "fp8w", SHIFT, dtype=torch.bfloat16)
    assert gpu_bias is not None and cpu_bias is not None and torch.equal(gpu_bias.cpu(), cpu_bias)
    ref = _reference(layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out = layer(x)
    assert out.shape == (m, 3072) and out.dtype == torch.bfloat16
    err = _rel(out, ref)
    assert err < 5e-3, err
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(x)
    assert _rel(got, ref) < 5e-3 and _rel(got, out) < 1e-3
    if not cutlass_fast8.PROMOTE_SHIFTED:
        assert kernels_run and not any(getattr(c, "promote", 0) for c in kernels_run), kernels_run
    if m >= cutlass_fast8.SS_MIN_M and cutlass_fast8.WEIGHTS == "e4m3":
        assert any(isinstance(c, SsLowrankGemmConfig) for c in kernels_run)


def test_gelu_shifted_layer_against_the_promoted_path_it_replaces(kernels_run):
    """Against the float64 product on unquantized activations ``(x + shift) / s`` (the GEMM's weights,
    the stored bias, the low-rank branch): the fast kernels on the unshifted codes, and the path they
    replace — the promoted kernel on the shifted codes with the stored bias (what ``fast8`` ran before;
    ``fast8_linear_fp8`` with no shift and ``act_unsigned`` still takes it). The new path is within
    1.25× of the old: its finer activations (CPU, this data: 5.22e-3 against 5.45e-3 for the reference
    math) against the fast accumulation (2.6e-3 in quadrature on signed activations; 1.15e-2 on the
    shifted ones, which this bound would catch)."""
    layer = _fc2(seed=3)
    x = _rows(1024, seed=4)
    xd = x.double()
    scales16, rowinv = cutlass_fast8.fast8_weights(layer.qweight, layer.wscales)
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(layer.qweight))
    w = packing.fp8_weight_values(codes, scales16.t()).double() * rowinv.double()[:, None]
    exact = ((xd + SHIFT) / layer.smooth.double()) @ w.t() + layer.bias.double()
    exact += (xd @ layer.lora_down.double().t()) @ layer.lora_up.double().t()
    del w
    out = layer(x)
    q, a = ops.fp8_activations(x.float(), layer.smooth, SHIFT)  # the shifted quantizer of before
    old = cutlass_fast8.fast8_linear_fp8(x, q, a, *_args(layer, "cuda")[:10], 0.0, True)  # stored bias as it is
    assert [c.promote for c in kernels_run][-1] == 1
    e_new, e_old = _rel(out, exact), _rel(old, exact)
    print(f"fast8 error against the float64 product: unshifted, fast kernels {e_new:.3e}; "
          f"shifted, promoted kernel {e_old:.3e}")
    assert e_new <= 1.25 * e_old, (e_new, e_old)


def test_relu_fed_unsigned_layer_keeps_the_promoted_kernel(kernels_run):
    """One-signed activations without a shift (``act_unsigned``, ``act_shift`` 0) and M > 16: the
    promoted kernel on the two-step path, within the fast8 bound."""
    layer = _fc2(shift=0.0, seed=5)
    x = _rows(300, seed=6, relu=True)
    out = layer(x)
    assert _rel(out, _reference(layer, x)) < 5e-3
    assert [c.promote for c in kernels_run] == [1]


def test_reduce_overhead_with_shifted_layers_compiles_on_a_first_call():
    """``mode="reduce-overhead"`` with the shift biases not yet made: they are made during the warm-up
    (on svdq_format.tensor_cache's worker thread, outside CUDA graphs' pool), and the three calls
    (warm-up, recording, replay) give the eager output."""
    torch._dynamo.reset()
    layers = [_fc2(3072, 3072, seed=s) for s in (21, 22)]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(approximate="tanh"), layers[1])
    x = _rows(4608, 3072, seed=23)
    gc.collect()  # earlier tests' layers: their entries would leave during the calls
    before = len(ops._SHIFT_BIASES)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        outs = [compiled(x).clone() for _ in range(3)]
        made = len(ops._SHIFT_BIASES) - before
        want = model(x)
    assert made == 2, made
    for out in outs:
        assert out.shape == want.shape and _rel(out, want) <= 1e-3
