"""The cutlass-sm90 backend's registration, refusal reasons, fallback and CLI; CPU only."""

from __future__ import annotations

import json
import warnings
import weakref

import pytest
import torch

import svdq_format as sf
import svdq_kernels
from svdq_format import ops
from svdq_format.cli import main
from svdq_format.errors import BackendError
from svdq_kernels import cutlass_w4a16, registry, triton_fast
from svdq_kernels.configs import AUTO_GROUP64_LR_CONFIGS, AUTO_GROUP64_W4A16_CONFIGS


def _call(**kw) -> ops.LinearCall:
    base = dict(device=torch.device("cuda", 0), dtype=torch.bfloat16, precision="int4", act="fp8",
                rows=4608, in_features=3072, out_features=3072, rank=32, has_bias=True)
    base.update(kw)
    return ops.LinearCall(**base)


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch):
    """Pretend device 0 is an sm_90 GPU (only the capability query is replaced)."""
    monkeypatch.setattr(registry, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("SVDQ_BACKEND", raising=False)
    monkeypatch.delenv("SVDQ_DISABLE_KERNELS", raising=False)


def test_import_registers_the_backend_above_the_reference() -> None:
    assert svdq_kernels.BACKEND_NAME == "cutlass-sm90"
    names = ops.available_backends()
    assert names.index("cutlass-sm90") < names.index("reference")
    assert ops.get_backend("cutlass-sm90").priority > ops.get_backend("reference").priority


def test_cpu_tensors_are_refused() -> None:
    assert "not a CUDA GPU" in registry.supports(_call(device=torch.device("cpu")))


@pytest.mark.parametrize(
    "cap, needle", [((8, 0), "sm_80"), ((8, 9), "sm_89"), ((10, 0), "sm_100")],
)
def test_non_hopper_gpus_are_refused(monkeypatch: pytest.MonkeyPatch, cap, needle) -> None:
    monkeypatch.setattr(registry, "_capability", lambda index: cap)
    assert needle in registry.supports(_call())


@pytest.mark.parametrize(
    "kw, needle",
    [({"precision": "nvfp4", "act": "fp8"}, "no sm90 kernel yet"), ({"act": "nvfp4"}, "no sm90 kernel yet"),
     ({"dtype": torch.float32}, "float32"), ({"in_features": 96}, "multiple of 64"),
     ({"rows": 0}, "empty")],
)
def test_unsupported_calls_name_the_reason(hopper, kw, needle) -> None:
    assert needle in registry.supports(_call(**kw))


def test_missing_requirements_are_reasons(hopper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_module_present", lambda name: False)
    assert registry.supports(_call()) == "triton is not installed"
    assert "nvidia-cutlass is not installed" in registry.requirement_missing("nvidia-cutlass")
    monkeypatch.setattr(registry, "_module_present", lambda name: True)
    assert registry.supports(_call()) is None
    monkeypatch.setenv("SVDQ_DISABLE_KERNELS", "1")
    assert "SVDQ_DISABLE_KERNELS" in registry.supports(_call())


def test_auto_selection_on_hopper_picks_the_kernel(hopper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_module_present", lambda name: True)
    assert ops.select_backend(_call()).name == "cutlass-sm90"
    monkeypatch.setattr(ops, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="no svdquant GPU kernel"):
        assert ops.select_backend(_call(act="nvfp4")).name == "reference"


def _layer() -> sf.SVDQLinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, dtype=torch.bfloat16)
    layer = sf.SVDQLinear.from_linear(lin, rank=8)
    layer.mode = "fast"
    return layer


def test_forced_backend_on_cpu_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_WARNED", set())
    layer = _layer()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = layer(x)  # auto on CPU: reference, silently
    layer.backend = "cutlass-sm90"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = layer(x)
        out2 = layer(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "cutlass-sm90" in msgs[0] and "not a CUDA GPU" in msgs[0]
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    expected = ops.reference_linear(x, layer.qweight, layer.wscales, None, layer.smooth,
                                    layer.lora_down, layer.lora_up, layer.bias, None, "int4", "fp8")
    assert torch.equal(out1, expected)


def test_a_silenced_fallback_warning_is_shown_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_WARNED", set())
    layer = _layer()
    layer.backend = "cutlass-sm90"
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(x)  # silenced: not counted as shown
    with pytest.warns(RuntimeWarning, match="cutlass-sm90"):
        layer(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)  # shown once already
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    monkeypatch.setattr(ops, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            layer(x)
    assert not ops._WARNED  # an error is not a shown warning: it raises again next time


def test_env_forced_backend_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_WARNED", set())
    monkeypatch.setenv("SVDQ_BACKEND", "cutlass-sm90")
    layer = _layer()
    with pytest.warns(RuntimeWarning, match="cutlass-sm90"):
        layer(torch.randn(3, 128, dtype=torch.bfloat16))


def test_cli_build_without_cuda_torch_is_a_clear_error(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["kernels", "build"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "has no CUDA" in err[0]


def test_cli_build_list_and_info(capsys, tmp_path, monkeypatch) -> None:
    pytest.importorskip("cutlass_library")
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(tmp_path))
    assert main(["kernels", "build", "--list"]) == 0
    names = capsys.readouterr().out.split()
    # ss_e4m3_: the pre-converted kernels (SVDQ_FAST8_WEIGHTS=e4m3, the default)
    assert names and all(n.startswith(("s4fp8_", "g64s4fp8_", "ss_e4m3_")) for n in names)
    assert any(n.startswith("g64s4fp8_") for n in names)  # the fast8 kernels are prebuilt too
    assert {c.name for c in AUTO_GROUP64_LR_CONFIGS} <= set(names)  # with the low-rank k-tiles: the default path
    monkeypatch.setenv("SVDQ_EXPERIMENTAL_KERNELS", "1")  # and the experimental W4A16 ones when on
    assert main(["kernels", "build", "--list"]) == 0
    assert sorted(set(capsys.readouterr().out.split()) - set(names)) == sorted(
        c.name for c in AUTO_GROUP64_W4A16_CONFIGS)
    monkeypatch.delenv("SVDQ_EXPERIMENTAL_KERNELS")
    assert main(["kernels", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_dir"] == str(tmp_path) and info["backend"] == "cutlass-sm90"
    assert info["nvidia-cutlass"] == "ok" and info["cached_kernels"] == []
    assert info["small_m_splits"].startswith("on at M <= 64")
    assert info["fast8_prologue"].startswith("fused (") and info["fast8_convert"].startswith("consumer (")
    from svdq_format import ops
    from svdq_kernels import triton_prologue

    monkeypatch.setattr(ops, "FAST8_PROLOGUE", "inductor")
    assert main(["kernels", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fast8_prologue"].startswith("inductor (")

    monkeypatch.setattr(triton_prologue, "SMALL_M_SPLITS", False)
    assert main(["kernels", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["small_m_splits"].startswith("off")
    from svdq_kernels import triton_gemv

    assert info["w4a16_gemv"] == "at M <= 1 (SVDQ_GEMV_MAX_M)"  # the W4A16 GEMV at one token
    monkeypatch.setattr(triton_gemv, "GEMV_MAX_M", 0)
    assert main(["kernels", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["w4a16_gemv"].startswith("off")
    assert main(["kernels", "build", "--config", "nope"]) == 1
    assert "unknown kernel configuration" in capsys.readouterr().err


def test_transposed_scales_cache_follows_version_and_lifetime() -> None:
    import gc

    from svdq_kernels.triton_gemm import _SCALES_T, scales_t

    ws = torch.randn(8, 3)
    first = scales_t(ws)
    assert scales_t(ws) is first and torch.equal(first, ws.t())
    ws.mul_(2)  # in-place change bumps the version: recomputed
    second = scales_t(ws)
    assert second is not first and torch.equal(second, ws.t())
    assert len(_SCALES_T) >= 1
    ref = weakref.ref(ws)
    n = len(_SCALES_T)
    del ws
    gc.collect()
    assert ref() is None and len(_SCALES_T) == n - 1  # freed tensor: entry dropped


def test_tensor_cache_keys_on_every_tensor() -> None:
    import gc

    from svdq_kernels.tensor_cache import TensorCache

    cache: TensorCache[int] = TensorCache()
    a, b = torch.zeros(4), torch.zeros(2, 2)
    calls = []
    make = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert cache.get((a, b), make) == 1 and cache.get((a, b), make) == 1
    b.add_(1)  # the second tensor changed: recomputed
    assert cache.get((a, b), make) == 2
    b.resize_(4)  # reshaped (resize_ need not bump the version): recomputed
    assert cache.get((a, b), make) == 3
    assert (a, b) in cache
    del b
    gc.collect()
    assert len(cache) == 0  # freeing either tensor drops the entry


def test_cli_kernels_without_action_prints_help(capsys) -> None:
    assert main(["kernels"]) == 2
    assert "build" in capsys.readouterr().out


def test_experimental_paths_only_on_request(hopper, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validated paths (fast, exact, W4A16) are on by default; a path still in
    EXPERIMENTAL_PATHS is used only with SVDQ_EXPERIMENTAL_KERNELS=1."""
    monkeypatch.setattr(registry, "_module_present", lambda name: True)
    monkeypatch.delenv("SVDQ_EXPERIMENTAL_KERNELS", raising=False)
    for act in ("fp8", "int4", "none"):
        assert registry.supports(_call(act=act)) is None, act
    path = registry.PATHS[("int4", "int4")]
    monkeypatch.delitem(registry.PATHS, ("int4", "int4"))
    monkeypatch.setitem(registry.EXPERIMENTAL_PATHS, ("int4", "int4"), path)
    assert "no sm90 kernel yet" in registry.supports(_call(act="int4"))
    assert registry._path("int4", "none").linear is triton_fast.w4a16_linear
    monkeypatch.setenv("SVDQ_EXPERIMENTAL_KERNELS", "1")
    assert registry.supports(_call(act="int4")) is None
    assert registry._path("int4", "int4") is path
    # an experimental path replaces the validated one for its combination: the CUTLASS W4A16 GEMM
    assert registry._path("int4", "none").linear is cutlass_w4a16.w4a16_linear


def test_fast_datapath_is_chosen_by_token_count() -> None:
    """The FP8 MMA datapath for large M (faster there on the H100), the exact-product one below;
    nothing else chooses it (no environment variable)."""
    from svdq_kernels import triton_fast

    assert triton_fast.fast_datapath(4608) == "fp8t" and triton_fast.fast_datapath(1024) == "fp8t"
    assert triton_fast.fast_datapath(1023) == "f16t" and triton_fast.fast_datapath(1) == "f16t"


def test_a_torch_without_cuda_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call naming a CUDA device where torch has none (e.g. the ``auto`` mode deciding for a
    model moved to ``cuda`` on paper): the backend refuses with a reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    registry._capability.cache_clear()
    try:
        call = ops.LinearCall(torch.device("cuda"), torch.bfloat16, "int4", "fp8w", 16, 3072, 3072, 32, True)
        assert registry.supports(call) == "this torch build has no CUDA device available"
    finally:
        registry._capability.cache_clear()


def test_a_kernel_that_fails_to_build_falls_back_and_is_refused_afterwards(hopper, monkeypatch) -> None:
    """An on-demand CUTLASS build that fails (nvcc error, unloadable library) never breaks the
    model: that call runs the reference math of the same mode with one warning naming the reason,
    and the path is refused from then on, so ``auto`` moves to the next mode."""
    def failing(*args):
        raise BackendError("nvcc failed (exit 2) building g64s4fp8_128x256x128_c1x1_cooperative: error: boom")

    broken = registry.KernelPath("fast8-int4 (test)", failing, ("triton", "nvcc", "nvidia-cutlass"))
    monkeypatch.setitem(registry.PATHS, ("int4", "fp8w"), broken)
    monkeypatch.setattr(registry, "BROKEN", {})
    lin = torch.nn.Linear(128, 128, bias=True).to(torch.bfloat16)
    layer = sf.SVDQLinear.from_linear(lin, rank=8)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    args = (x, layer.qweight, layer.wscales, None, layer.smooth, layer.lora_down, layer.lora_up, layer.bias, None,
            "int4", "fp8w")
    with pytest.warns(RuntimeWarning, match="fast8-int4 \\(test\\) is unavailable: nvcc failed .* boom"):
        y = registry._linear(*args)
    assert torch.equal(y, ops.reference_linear(*args))
    call = ops.LinearCall(torch.device("cuda"), torch.bfloat16, "int4", "fp8w", 3, 128, 128, 8, True)
    assert "is unavailable: nvcc failed" in registry.supports(call)
    q, a = ops.fp8_activations(x.float(), layer.smooth)
    broken_fp8 = registry.KernelPath("fast8-int4 (test)", failing, ("nvcc",), None, failing)
    monkeypatch.setitem(registry.PATHS, ("int4", "fp8w"), broken_fp8)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert torch.equal(registry._linear_fp8(x, q, a, *args[1:]), ops.reference_linear(*args))


def test_gemv_max_m_setting_reads_the_environment(monkeypatch) -> None:
    """``SVDQ_GEMV_MAX_M``: a token count, empty for the default, anything else warns and keeps it."""
    from svdq_kernels import triton_gemv

    monkeypatch.delenv("SVDQ_GEMV_MAX_M", raising=False)
    assert triton_gemv._max_m_setting(1) == 1
    monkeypatch.setenv("SVDQ_GEMV_MAX_M", " 4 ")
    assert triton_gemv._max_m_setting(1) == 4
    monkeypatch.setenv("SVDQ_GEMV_MAX_M", "0")
    assert triton_gemv._max_m_setting(1) == 0
    monkeypatch.setenv("SVDQ_GEMV_MAX_M", "-2")
    with pytest.warns(UserWarning, match="SVDQ_GEMV_MAX_M='-2' is not a token count; using 1"):
        assert triton_gemv._max_m_setting(1) == 1
