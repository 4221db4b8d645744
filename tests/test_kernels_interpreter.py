"""The Triton kernels' arithmetic checked on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter runs the kernels' code with numpy, so what it checks is the kernels' logic —
indexing, masking, splits, rounding, scale handling, the order of the group promotion — not
speed. Its known gaps decide the inputs: bf16 is stored by truncation and fp8 rounding is not
IEEE, so the checks use fp16 layers and compare codes and fp32 outputs (the GPU tests in
``tests/test_kernels_gpu.py`` cover bf16 and fp8 on the hardware). Skipped without triton.
"""

from __future__ import annotations

import pytest
import torch

from svdq_format import ops, packing
from tests.triton_interpreter import interpreted_triton

triton = interpreted_triton()


@pytest.fixture()
def kernels():
    """The Triton prologues and GEMMs with their kernels built for the interpreter, one tile
    configuration each (the public functions of both modules, as one namespace)."""
    from types import SimpleNamespace

    from svdq_kernels import triton_gemm, triton_prologue

    triton_prologue.kernels.cache_clear()
    triton_gemm.kernels.cache_clear()
    triton_gemm.kernels()["gemm_t"].configs = [triton.Config({"BN": 32, "BM": 16}, num_warps=4, num_stages=2)]
    yield SimpleNamespace(**{name: getattr(mod, name) for mod in (triton_prologue, triton_gemm)
                             for name in mod.__all__})
    triton_prologue.kernels.cache_clear()
    triton_gemm.kernels.cache_clear()


@pytest.fixture()
def no_small_m_splits(monkeypatch):
    """The one-pass kernels at small M too (what the benchmarks' ``--no-small-m-splits`` times)."""
    from svdq_kernels import triton_prologue

    monkeypatch.setattr(triton_prologue, "SMALL_M_SPLITS", False)
    return triton_prologue


def _layer(m: int, k: int, n: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).half()
    x[min(4, m - 1), 70 % k] = float("nan")
    x[min(6, m - 1)] = 0
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).half()
    smooth = (torch.rand(k, generator=g) + 0.5).half()
    bias = torch.randn(n, generator=g).half()
    down = (torch.randn(r, k, generator=g) * 0.05).half() if r else None
    up = (torch.randn(n, r, generator=g) * 0.05).half() if r else None
    return x, qweight, wscales, smooth, bias, down, up


@pytest.mark.parametrize("m, blocks, r, unsigned, shift", [
    (20, 20, 0, False, 0.0), (20, 20, 16, False, 0.0), (9, 3, 0, True, 0.17), (33, 2, 32, False, 0.0)])
def test_exact_mode_equals_the_reference_bit_for_bit(kernels, m, blocks, r, unsigned, shift,
                                                    no_small_m_splits) -> None:
    """Codes and scales equal the format's activation quantizer; without a low-rank branch the
    one-pass output equals ``reference_linear(act="int4")`` bit for bit (same per-group
    association, groups in order; small-M split-K sums the groups per split, see
    ``test_split_k_equals_the_one_pass_kernel``), with one it is within 1e-5 (``x · L2ᵀ`` is summed
    in another order); NaN inputs give NaN rows as in the reference."""
    k, n = 64 * blocks, 64
    x, qweight, wscales, smooth, bias, down, up = _layer(m, k, n, r, seed=m + r)
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "int4",
                               act_shift=shift, act_unsigned=unsigned).float()
    codes, scales, lr = kernels.prologue_exact(x, smooth, down, act_shift=shift, unsigned=unsigned)
    av, asc = packing.quantize_activations((x.float() + shift) / smooth.float(), "int4", unsigned=unsigned)
    fin = torch.isfinite(asc).all(dim=1)
    assert torch.equal(codes.float()[fin], av[fin]) and torch.equal(scales.t()[fin], asc[fin])
    y = kernels.gemm_exact(codes, scales, qweight, wscales, lr, up, bias, None, out_dtype=torch.float32).half().float()
    ok = torch.isfinite(ref).all(dim=1)
    assert torch.equal(~torch.isfinite(y).all(dim=1), ~ok)
    if r == 0:
        assert torch.equal(y[ok], ref[ok])
    else:
        assert ((y[ok] - ref[ok]).norm() / ref[ok].norm()) <= 1e-5


def test_scaled_fp16_datapath_equals_the_per_group_one(kernels) -> None:
    """``f16s`` (scales folded exactly into fp16 weights, one accumulation chain) against ``f16t``
    (per-group promotion) and a float64 evaluation of the same codes: fp32 rounding apart."""
    m, k, n = 20, 256, 64
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).bfloat16()
    wscales[3, 1] = 0.0
    wscales[5] *= 1000
    q = torch.randint(-448, 449, (m, k), generator=g).float().half()  # fp16 code values
    a = torch.rand(m, generator=g) * 0.01
    bias = torch.randn(n, generator=g).half()
    w = packing.dequantize_int4(packing.unpack_nibbles(qweight), wscales).double()  # exact: code × bf16 scale
    ref = (q.double() @ w.t()) * a.double()[:, None] + bias.double()
    for dp in ("f16t", "f16s"):
        y = kernels.gemm(q, a, qweight, wscales, None, None, bias, None, out_dtype=torch.float32, datapath=dp)
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-6, dp


@pytest.mark.parametrize("r, shift", [(0, 0.0), (16, 0.25)])
def test_w4a16_prologue_and_gemm_track_the_reference(kernels, r, shift) -> None:
    """W4A16 (``act="none"``): the prologue writes ``x̂ / a`` in fp16 with ``a`` a per-token power
    of two below which the row stays < 2^15 (bit-exactly what torch computes), and the output
    tracks ``reference_linear(act="none")`` within fp16's rounding of ``x̂``; zero and NaN rows
    behave as the reference's."""
    m, k, n = 20, 64 * 6, 64
    x, qweight, wscales, smooth, bias, down, up = _layer(m, k, n, r, seed=40 + r)
    wscales = wscales.bfloat16()  # the layer's scales: foldable (f16s)
    x[2] *= 500.0  # a large row: its power of two differs
    q, a, lr = kernels.prologue(x, smooth, down, act_shift=shift, w16=True)
    xs = (x.float() + shift) / smooth.float()
    amax = torch.where(xs == xs, xs.abs(), torch.full_like(xs, float("inf"))).amax(dim=1)
    e = torch.frexp(amax).exponent  # amax in [2^(e-1), 2^e)
    ok = (amax > 0) & torch.isfinite(amax)
    want_a = torch.where(ok, torch.ldexp(torch.ones_like(amax), e - 15), torch.ones_like(amax))
    assert torch.equal(a, want_a)
    assert torch.equal(q[ok], (xs[ok] / want_a[ok, None]).half())
    assert (q[ok].float().abs().amax(dim=1) < 2**15).all()
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "none",
                               act_shift=shift).float()
    y = kernels.gemm(q, a, qweight, wscales, lr, up, bias, None, out_dtype=torch.float32, datapath="f16s")
    fin = torch.isfinite(ref).all(dim=1)
    assert torch.equal(~torch.isfinite(y).all(dim=1), ~fin)
    assert ((y[fin] - ref[fin]).norm() / ref[fin].norm()) < 1e-3


def _nvfp4_layer(m: int, k: int, n: int, r: int, seed: int):
    x, _, _, smooth, bias, down, up = _layer(m, k, n, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    # e4m3 group scales over normal and subnormal values (a few exact zeros)
    wscales = (torch.rand(n, k // 16, generator=g) * 2.0 ** torch.randint(-10, 3, (n, k // 16), generator=g))
    wscales[0, :3] = 0.0
    wscales = wscales.to(torch.float8_e4m3fn)
    wtscale = torch.tensor(0.37)
    return x, qweight, wscales, wtscale, smooth, bias, down, up


@pytest.mark.parametrize("act, r", [("nvfp4", 0), ("nvfp4", 16), ("none", 0)])
def test_nvfp4_layers_equal_the_reference(kernels, act, r) -> None:
    """nvfp4 on Hopper: activations quantized per 16 exactly as the format says (E2M1 value ×
    e4m3 scale, written dequantized in fp16: exact), weights decoded from their bits in the
    kernel; outputs within fp32 summation order of ``reference_linear`` (W4A16: within fp16's
    rounding of the smoothed input); NaN rows as in the reference."""
    m, k, n = 20, 64 * 5, 64
    x, qweight, wscales, wtscale, smooth, bias, down, up = _nvfp4_layer(m, k, n, r, seed=50 + r)
    x[1, :16] = 0.0
    x[3, 17] = 1e4  # a large group: its scale saturates near the top of e4m3
    if act == "nvfp4":
        deq, lr = kernels.prologue_nvfp4(x, smooth, down)
        av, asc = packing.quantize_activations(x.float() / smooth.float(), "nvfp4")
        want = (av.reshape(m, -1, 16) * asc[:, :, None]).reshape(m, k)
        fin = torch.isfinite(asc).all(dim=1)
        assert torch.equal(deq.float()[fin], want[fin])
        a = None
    else:
        deq, a, lr = kernels.prologue(x, smooth, down, w16=True)
    ref = ops.reference_linear(x.float(), qweight, wscales, wtscale, smooth, down, up, bias, None, "nvfp4", act)
    y = kernels.gemm_nvfp4(deq, a, qweight, wscales, wtscale, lr, up, bias, None, out_dtype=torch.float32)
    ok = torch.isfinite(ref).all(dim=1)
    assert torch.equal(~torch.isfinite(y).all(dim=1), ~ok)
    assert ((y[ok] - ref[ok]).norm() / ref[ok].norm()) <= (1e-5 if act == "nvfp4" else 1e-3)


@pytest.mark.parametrize("m, blocks, splits", [(7, 20, 3), (20, 9, 4), (1, 16, 16)])
def test_split_k_equals_the_one_pass_kernel(kernels, m, blocks, splits) -> None:
    """Small-M split-K (K cut into ``splits`` programs whose fp32 partials a second kernel sums
    in order; split 0 adds the low-rank branch and the bias) against the one-pass kernel, for
    every weight decoding: fp32 summation order apart; NaN rows stay NaN rows."""
    k, n, r = 64 * blocks, 64, 16
    x, qweight, wscales, smooth, bias, down, up = _layer(m, k, n, r, seed=50 + m)
    g = torch.Generator().manual_seed(m)
    q = torch.randint(-448, 449, (m, k), generator=g).float().half()  # e4m3 code values, as fp16
    a = torch.rand(m, generator=g) * 0.01
    lr = torch.randn(m, r, generator=g)
    lrs = torch.rand(r, generator=g) + 0.5

    def same(one: torch.Tensor, many: torch.Tensor) -> None:
        ok = torch.isfinite(one).all(dim=1)
        assert torch.equal(~torch.isfinite(many).all(dim=1), ~ok)
        assert ((many[ok] - one[ok]).norm() / one[ok].norm()) <= 1e-6

    for dp, ws in (("f16t", wscales), ("f16s", wscales.bfloat16())):
        one, many = (kernels.gemm(q, a, qweight, ws, lr, up, bias, lrs, out_dtype=torch.float32, datapath=dp,
                                  split_k=s) for s in (1, splits))
        same(one, many)
    codes, scales, lr_x = kernels.prologue_exact(x, smooth, down)
    same(*(kernels.gemm_exact(codes, scales, qweight, wscales, lr_x, up, bias, None, out_dtype=torch.float32,
                              split_k=s) for s in (1, splits)))
    _, fq, fs, wt, *_ = _nvfp4_layer(m, k, n, 0, seed=7)
    deq, lr4 = kernels.prologue_nvfp4(x, smooth, down)
    same(*(kernels.gemm_nvfp4(deq, None, fq, fs, wt, lr4, up, bias, None, out_dtype=torch.float32, split_k=s)
           for s in (1, splits)))


def test_split_k_is_for_small_m_and_can_be_turned_off(kernels, monkeypatch) -> None:
    from svdq_kernels import triton_prologue

    assert kernels.split_k_parts(16, 3072, 3072) == 6  # on by default; 24 column programs, ≥ 8 groups per split
    assert kernels.split_k_parts(16, 12288, 3072) == 3  # 96 column programs: ~2 programs per SM
    assert kernels.split_k_parts(4608, 3072, 3072) == 1  # large M fills the GPU already
    monkeypatch.setattr(triton_prologue, "SMALL_M_SPLITS", False)
    assert kernels.split_k_parts(16, 3072, 3072) == 1


@pytest.mark.parametrize("m", [2, 20])
def test_small_m_prologue_splits_give_the_same_codes(kernels, monkeypatch, m) -> None:
    """More, shorter K splits at small M (the default): the same token scales and codes bit for
    bit (a max is order-free), ``x · L2ᵀ`` within fp32 summation order; for all three prologues."""
    k, n, r = 64 * 24, 64, 16
    x, _, _, smooth, _, down, _ = _layer(m, k, n, r, seed=60 + m)
    from svdq_kernels import triton_prologue

    with monkeypatch.context() as off:
        off.setattr(triton_prologue, "SMALL_M_SPLITS", False)
        assert kernels.k_splits(k, m) == (3, 8)
        base = (kernels.prologue(x, smooth, down), kernels.prologue_exact(x, smooth, down),
                kernels.prologue_nvfp4(x, smooth, down))
    assert kernels.k_splits(k, m) == (12, 2)  # on by default
    more = (kernels.prologue(x, smooth, down), kernels.prologue_exact(x, smooth, down),
            kernels.prologue_nvfp4(x, smooth, down))
    for one, many in zip(base, more):
        *vals, lr1 = one
        *vals2, lr2 = many
        for v1, v2 in zip(vals, vals2):  # bit patterns (NaN rows included)
            assert torch.equal(v1.contiguous().view(torch.uint8), v2.contiguous().view(torch.uint8))
        ok = torch.isfinite(lr1).all(dim=1) & (lr1.abs().sum(dim=1) > 0)
        assert ok.any()
        if ok.any():
            assert ((lr2[ok] - lr1[ok]).norm() / lr1[ok].norm()) <= 1e-6
        assert torch.equal(lr2[~ok].nan_to_num(), lr1[~ok].nan_to_num())


def test_prologue_writes_the_low_rank_product_as_bf16_hi_and_lo(kernels) -> None:
    """``prologue(lr16=True)`` (the fast8 path): the same codes and token scales, and ``lr`` times
    the per-rank LoRA scales as bf16 ``[hi | lo]`` whose sum is the fp32 ``lr`` to ~2^-14 (the
    interpreter truncates to bf16; the GPU rounds, ~2^-17)."""
    m, k, r = 37, 64 * 9, 16
    x, _, _, smooth, _, down, _ = _layer(m, k, 64, r, seed=71)
    ls = torch.linspace(0.25, 2.0, r)
    q, a, lr = kernels.prologue(x, smooth, down)
    q2, a2, lr16 = kernels.prologue(x, smooth, down, lr16=True, lora_scales=ls)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(a2, a)
    assert lr16.dtype == torch.bfloat16 and lr16.shape == (m, 2 * r)
    want = lr * ls
    got = lr16[:, :r].float() + lr16[:, r:].float()
    ok = torch.isfinite(want).all(dim=1)
    assert ((got[ok] - want[ok]).abs() <= 2.0**-14 * want[ok].abs() + 1e-30).all()
    assert not torch.isfinite(got[~ok]).all()  # the NaN row stays non-finite


def test_lowrank_down_alone_gives_the_prologues_low_rank_bits(kernels) -> None:
    """``lowrank_down`` (the compiled fast8 path, activations quantized by Inductor elsewhere) is
    the prologue's ``lr16`` output alone: same kernels, same summation order, the same bits —
    with and without per-rank scales, at a K that splits and one that does not."""
    for m, k, r, seed in ((37, 64 * 9, 16, 71), (5, 64 * 40, 48, 72)):
        x, _, _, smooth, _, down, _ = _layer(m, k, 64, r, seed=seed)
        for ls in (None, torch.linspace(0.25, 2.0, r)):
            _, _, lr16 = kernels.prologue(x, smooth, down, lr16=True, lora_scales=ls)
            got = kernels.lowrank_down(x, down, lora_scales=ls, block_m=32, num_warps=4, num_stages=3)
            assert got.shape == (m, 2 * r) and got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), lr16.view(torch.int16))
            # the default (wider) tiles: the same sums up to fp32 order, hi + lo as a whole
            tiled = kernels.lowrank_down(x, down, lora_scales=ls)
            want = lr16[:, :r].float() + lr16[:, r:].float()
            have = tiled[:, :r].float() + tiled[:, r:].float()
            ok = torch.isfinite(want).all(dim=1)
            assert ((have[ok] - want[ok]).abs() <= 1e-5 * want[ok].abs().amax() + 1e-30).all()
            assert torch.equal(torch.isfinite(have).all(dim=1), ok)



def test_w16_prologue_with_the_bf16_low_rank_output(kernels) -> None:
    """``prologue(w16=True, lr16=True)`` (the CUTLASS W4A16 path): the W4A16 activations of
    ``w16`` alone and the ``[hi | lo]`` low-rank output of ``lr16`` alone, bit for bit."""
    m, k, r = 21, 64 * 6, 16
    x, _, _, smooth, _, down, _ = _layer(m, k, 64, r, seed=81)
    ls = torch.linspace(0.5, 1.5, r)
    q16, a16, _ = kernels.prologue(x, smooth, down, w16=True)
    _, _, lr16 = kernels.prologue(x, smooth, down, lr16=True, lora_scales=ls)
    q, a, lr = kernels.prologue(x, smooth, down, w16=True, lr16=True, lora_scales=ls)
    assert q.dtype == torch.float16 and torch.equal(q.view(torch.int16), q16.view(torch.int16))
    assert torch.equal(a.view(torch.int32), a16.view(torch.int32))
    assert torch.equal(lr.view(torch.int16), lr16.view(torch.int16))


@pytest.mark.parametrize("r", [16, 32, 48])
def test_lowrank_tiles_divide_by_the_token_scale_and_pad_to_the_k_tiles(kernels, r) -> None:
    """``lowrank_tiles`` (the ``fast8`` GEMM's low-rank k-tiles): ``lr · lora_scales / a'`` with
    ``a' = a`` where positive, else 1; ranks ``32j + c`` in column ``64j + c``, zeros in the other
    32 columns of each 64 and past the rank; ``a'`` itself. Against torch's fp32 math within one
    bf16 step (the interpreter stores bf16 by truncation)."""
    from svdq_kernels import lowrank_tiles

    m, k = 37, 64 * 9
    x, _, _, _, _, down, _ = _layer(m, k, 64, r, seed=90 + r)
    x = torch.nan_to_num(x)
    a = torch.rand(m) * 0.01 + 1e-3
    a[3] = 0.0  # a row of zeros: the kernel's token scale becomes 1
    for ls in (None, torch.linspace(0.25, 2.0, r)):
        lr, ag = lowrank_tiles.lowrank_tiles(x, down, a, lora_scales=ls)
        t = -(-r // 32)
        assert lr.shape == (m, 64 * t) and lr.dtype == torch.bfloat16 and ag.dtype == torch.float32
        assert torch.equal(ag, torch.where(a > 0, a, torch.ones_like(a)))
        want = x.float() @ down.float().t() * (ls if ls is not None else 1.0) / ag.unsqueeze(1)
        padded = torch.zeros(m, 32 * t)
        padded[:, :r] = want
        got = lr.float().view(m, t, 2, 32)
        assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))  # the B tile's unused half
        have = got[:, :, 0].reshape(m, 32 * t)
        assert ((have - padded).abs() <= padded.abs() * 2.0**-7 + 1e-30).all()


@pytest.mark.parametrize("m, blocks, r, shift", [(37, 9, 16, 0.0), (70, 40, 48, 0.25), (5, 20, 32, 0.0)])
def test_quantize_lowrank_equals_the_prologue_and_the_lowrank_tiles(kernels, m, blocks, r, shift) -> None:
    """``quantize_lowrank`` (``SVDQ_FAST8_PROLOGUE=fused``: x read for absmax and ``x · L2ᵀ``
    together) gives the current ``fast8`` path's inputs bit for bit: the prologue's codes and token
    scales (and those are the reference quantizer's, a NaN row's inf), ``lowrank_tiles``' k-tiles and ``a'`` —
    with NaN and zero rows, an activation shift, per-rank scales, one K split or several."""
    from svdq_kernels import lowrank_tiles

    k = 64 * blocks
    x, _, _, smooth, _, down, _ = _layer(m, k, 64, r, seed=100 + r)
    for ls in (None, torch.linspace(0.25, 2.0, r)):
        q, a, lr, ag = lowrank_tiles.quantize_lowrank(x, smooth, down, act_shift=shift, lora_scales=ls)
        q0, a0, _ = kernels.prologue(x, smooth, None, act_shift=shift)
        lr0, ag0 = lowrank_tiles.lowrank_tiles(x, down, a0, lora_scales=ls)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), q0.view(torch.uint8))
        assert torch.equal(a.view(torch.int32), a0.view(torch.int32))
        assert torch.equal(lr.view(torch.int16), lr0.view(torch.int16)) and torch.equal(ag, ag0)
        wide = lowrank_tiles.quantize_lowrank(x, smooth, down, act_shift=shift, lora_scales=ls, codes_block=256)
        assert torch.equal(wide[0].view(torch.uint8), q.view(torch.uint8))  # codes_block: the split's end masked
        _, a_ref = ops.fp8_activations(x.float(), smooth, shift)
        fin = torch.isfinite(a_ref)  # a NaN row's scale is inf here (the output is NaN either way)
        assert torch.equal(a[fin].view(torch.int32), a_ref[fin].view(torch.int32)) and not a[~fin].isfinite().any()
    z = min(6, m - 1)  # _layer's zero row
    assert (a[z] == 0) == (shift == 0) and ag[z] == (1.0 if shift == 0 else a[z])


def test_lowrank_k_tiles_compute_the_fast8_layer(kernels) -> None:
    """The ``lowrank`` GEMM's inputs, evaluated in float64 as the kernel computes them —
    ``(Σ q · w8 + lr · l1ᵀ) · rowinv · a' + bias`` — are the ``fast8`` reference layer: the
    sentinel-extended scales hold the layer's real scales first, ``l1 = L1 / rowinv`` and
    ``lr = x L2ᵀ / a'`` lose only their rounding to bf16. With a zero row (a = 0), per-rank
    strengths and a rank that takes two k-tiles."""
    from svdq_kernels import cutlass_fast8, lowrank_tiles

    m, k, n, r = 19, 64 * 4, 128, 48
    x, qweight, wscales, smooth, bias, down, up = _layer(m, k, n, r, seed=95)
    x = torch.nan_to_num(x)
    ls = torch.linspace(0.5, 1.5, r)
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, ls, "int4", "fp8w").double()
    q, a = ops.fp8_activations(x, smooth)
    lr, ag = lowrank_tiles.lowrank_tiles(x, down, a.float().reshape(-1), lora_scales=ls)
    t = lowrank_tiles.lowrank_k_tiles(r)
    scales, rowinv = cutlass_fast8.fast8_lowrank_weights(qweight, wscales, t)
    plain, rowinv0 = cutlass_fast8.fast8_weights(qweight, wscales)
    assert scales.shape == (k // 64 + 2 * t, n) and torch.equal(scales[: k // 64], plain)
    assert torch.equal(rowinv, rowinv0)
    assert (scales[k // 64:].view(torch.int16) == lowrank_tiles.SENTINEL_BITS).all()
    l1 = lowrank_tiles.padded_up(up, rowinv)
    assert l1.shape == (n, 32 * t) and not l1[:, r:].any()
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    w8 = packing.fp8_weight_values(codes, plain.t()).double()
    lr_used = lr.double().view(m, t, 2, 32)[:, :, 0].reshape(m, 32 * t)
    acc = q.double() @ w8.t() + lr_used @ l1.double().t()
    out = acc * rowinv.double() * ag.double().unsqueeze(1) + bias.double()
    assert ((out - ref).norm() / ref.norm()).item() < 4e-3


def test_preconverted_kernel_inputs_compute_the_fast8_layer(kernels) -> None:
    """The pre-converted GEMM's inputs (``SVDQ_FAST8_WEIGHTS=e4m3``) evaluated in float64 as the
    kernel computes them — ``(Σ q · w8 + lr · l1ᵀ) · rowinv · a' + bias`` with ``lr`` whole (its
    ``[M, 64·t]`` k-tiles, padding included) and ``l1 = padded_up64`` — are the ``lowrank`` kernel's
    math on the same layer, and the ``fast8`` reference layer within its bound."""
    from svdq_kernels import cutlass_fast8, lowrank_tiles

    m, k, n, r = 19, 64 * 4, 128, 48
    x, qweight, wscales, smooth, bias, down, up = _layer(m, k, n, r, seed=96)
    x = torch.nan_to_num(x)
    ref = ops.reference_linear(x, qweight, wscales, None, smooth, down, up, bias, None, "int4", "fp8w").double()
    q, a = ops.fp8_activations(x, smooth)
    lr, ag = lowrank_tiles.lowrank_tiles(x, down, a.float().reshape(-1))
    t = lowrank_tiles.lowrank_k_tiles(r)
    scales16, rowinv = cutlass_fast8.fast8_weights(qweight, wscales)
    l1 = lowrank_tiles.padded_up64(up, rowinv)
    assert lr.shape[1] == l1.shape[1] == 64 * t and l1.shape[0] == n
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    w8 = packing.fp8_weight_values(codes, scales16.t()).double()
    out = (q.double() @ w8.t() + lr.double() @ l1.double().t()) * rowinv.double() * ag.double().unsqueeze(1)
    out = out + bias.double()
    lr_used = lr.double().view(m, t, 2, 32)[:, :, 0].reshape(m, 32 * t)
    narrow = lowrank_tiles.padded_up(up, rowinv).double()
    lowrank = (q.double() @ w8.t() + lr_used @ narrow.t()) * rowinv.double() * ag.double().unsqueeze(1) + bias.double()
    torch.testing.assert_close(out, lowrank, rtol=1e-12, atol=1e-12)
    assert ((out - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.parametrize("blocking", [None, "candidates"])
def test_e4m3_weights_unpack_scale_and_interleave_like_the_reference(blocking) -> None:
    """The per-call e4m3 weight pass (``weights_e4m3``): nibble order, sign extension, each group's
    scale column and the interleaved store, checked where the interpreter's e4m3 conversion is exact
    — power-of-two scales, so every ``code × scale`` is an e4m3 value and rounding never decides
    (the interpreter's conversion is not IEEE: ties away from zero, truncated subnormals, and a
    mantissa that rounds up past 1.75 loses its carry, 31.8 → 16). The GPU test checks the bits
    with the layer's own scales and with any others."""
    from svdq_kernels.weights_e4m3 import PASS_CANDIDATES, e4m3_weights

    g = torch.Generator().manual_seed(3)
    n, k = 70, 512  # a partial row block
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    codes = packing.nibbles_to_int4(packing.unpack_nibbles(qweight))
    exact = torch.exp2(torch.randint(-6, 5, (k // 64, n), generator=g).float()).half()
    exact[:, ::3] *= -1
    ref = packing.fp8_weight_values(codes, exact.t())
    if blocking is None:  # the default blocking for K = 512: 32 rows x 512 codes, 8 groups a step
        out = e4m3_weights(qweight, exact)
        assert out.dtype == torch.float8_e4m3fn and out.shape == (n, k)
        assert torch.equal(out.float(), ref)
        return
    # every candidate blocking of the benchmark's sweep writes the same bytes (K = 1024: each fits)
    k = 1024
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    exact = torch.exp2(torch.randint(-6, 5, (k // 64, n), generator=g).float()).half()
    ref = packing.fp8_weight_values(packing.nibbles_to_int4(packing.unpack_nibbles(qweight)), exact.t())
    for b in PASS_CANDIDATES:
        out = e4m3_weights(qweight, exact, blocking=b)
        assert torch.equal(out.float(), ref), b


def test_e4m3_weights_default_blocking_is_the_widest_that_divides_k() -> None:
    from svdq_kernels.weights_e4m3 import PassBlocking, default_blocking

    assert default_blocking(3072) == PassBlocking(16, 1024, 16)  # FLUX's K
    assert default_blocking(15360) == PassBlocking(16, 1024, 16)
    assert default_blocking(2560) == PassBlocking(32, 512, 8)
    assert default_blocking(768) == PassBlocking(64, 256, 4)
    with pytest.raises(ValueError, match="K = 192 is not a multiple of 256"):
        default_blocking(192)


def test_e4m3_weights_refuses_mismatched_scales() -> None:
    from svdq_kernels.weights_e4m3 import PassBlocking, e4m3_weights

    qweight = torch.zeros(128, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales \(8, 128\)"):
        e4m3_weights(qweight, torch.ones(8, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        e4m3_weights(qweight, torch.ones(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of 1024"):  # K = 256
        e4m3_weights(qweight, torch.ones(4, 128, dtype=torch.float16), blocking=PassBlocking(64, 1024, 8))
    with pytest.raises(ValueError, match="powers of two"):
        e4m3_weights(qweight, torch.ones(4, 128, dtype=torch.float16), blocking=PassBlocking(48, 256))
    with pytest.raises(ValueError, match="multiple of 64 x groups_per_step"):
        e4m3_weights(qweight, torch.ones(4, 128, dtype=torch.float16), blocking=PassBlocking(64, 256, 8))


def _gemv_inputs(m: int, k: int, n: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(m, k, generator=g) * 1000).half()
    a = torch.exp2(torch.randint(-20, -10, (m,), generator=g).float())
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3).bfloat16()
    lr = torch.randn(m, r, generator=g) if r else None
    up = (torch.randn(n, r, generator=g) * 0.05).half() if r else None
    lrs = torch.linspace(0.0, 2.0, r) if r else None
    bias = torch.randn(n, generator=g).half()
    return q, a, qweight, wscales, lr, up, lrs, bias


def _gemv_float64(q, a, qweight, wscales, lr, up, lrs, bias):
    w = packing.dequantize_int4(packing.unpack_nibbles(qweight), wscales).double()  # exact: code × bf16 scale
    y = (q.double() @ w.t()) * a.double()[:, None] + bias.double()
    if lr is not None:
        y = y + (lr.double() * (lrs.double() if lrs is not None else 1.0)) @ up.double().t()
    return y


@pytest.mark.parametrize("m, k, n, r, blocking", [
    (1, 64 * 6, 70, 0, None), (1, 64 * 16, 64, 20, None), (2, 64 * 5, 33, 8, None), (3, 64 * 9, 40, 0, None),
    (4, 64 * 12, 48, 40, None), (1, 64 * 20, 72, 16, (8, 1024, 4)), (2, 64 * 8, 64, 0, (32, 256, 4)),
    (1, 64 * 20, 72, 16, (16, 512, 4, False)), (3, 64 * 5, 40, 8, (16, 128, 4, False))])
def test_gemv_equals_the_float64_product(m, k, n, r, blocking) -> None:
    """The W4A16 GEMV (``triton_gemv.gemv``) against a float64 evaluation of the same codes, scales,
    tokens, low-rank branch (with per-rank strengths) and bias: nibble order, each row's group scales,
    partial row blocks and K steps (masked tails), 1–4 tokens, the K sum per tile or per step; fp32
    rounding apart."""
    from svdq_kernels.triton_gemv import GemvBlocking, gemv

    q, a, qweight, wscales, lr, up, lrs, bias = _gemv_inputs(m, k, n, r, seed=m * 100 + k + r)
    b = GemvBlocking(*blocking) if blocking else None
    y = gemv(q, a, qweight, wscales, lr, up, bias, lrs, out_dtype=torch.float32, blocking=b)
    ref = _gemv_float64(q, a, qweight, wscales, lr, up, lrs, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_gemv_matches_the_transposed_gemm_and_keeps_nan_rows(kernels) -> None:
    """The GEMV gives the ``f16s`` GEMM's output (what W4A16 layers ran before, at any M) within fp32
    rounding; a token row with a NaN gives a NaN output row and leaves the other token alone."""
    from svdq_kernels.triton_gemv import gemv

    q, a, qweight, wscales, lr, up, _, bias = _gemv_inputs(2, 64 * 6, 64, 16, seed=5)
    q[1, 7] = float("nan")
    y = gemv(q, a, qweight, wscales, lr, up, bias, None, out_dtype=torch.float32)
    want = kernels.gemm(q, a, qweight, wscales, lr, up, bias, None, out_dtype=torch.float32, datapath="f16s")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    assert ((y[0] - want[0]).norm() / want[0].norm()).item() < 1e-6


def test_gemv_refuses_shapes_that_do_not_fit() -> None:
    from svdq_kernels.triton_gemv import GemvBlocking, gemv

    q, a, qweight, wscales, *_ = _gemv_inputs(1, 128, 32, 0, seed=1)
    with pytest.raises(ValueError, match=r"scales \(32, 1\) are not \[N, K/64\] = \[32, 2\]"):
        gemv(q, a, qweight, wscales[:, :1], None, None, None, None, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="does not pack K = 128"):
        gemv(q, a, qweight[:, :10], wscales, None, None, None, None, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="powers of two"):
        gemv(q, a, qweight, wscales, None, None, None, None, out_dtype=torch.float32, blocking=GemvBlocking(12))
