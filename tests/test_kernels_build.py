"""Build cache: keys, directory, nvcc command line, file lock, atomic install; no GPU needed.

A test compiler (a Python function with nvcc's contract: given the command line it writes
the output file named after ``-o``) stands in for nvcc so the cache logic runs on CPU CI.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest

pytest.importorskip("cutlass_library")

from svdq_format.errors import BackendError  # noqa: E402
from svdq_kernels import build  # noqa: E402
from svdq_kernels.configs import CutlassGemmConfig  # noqa: E402

TC = build.Toolchain(
    nvcc="/opt/cuda/bin/nvcc", nvcc_version="13.0.88", cutlass_version="4.2.0.0",
    cutlass_dir=str(build.cutlass_source_dir()), arch="sm_90a", torch_version="2.11.0+cuda13.0",
    svdquant_version="0.1.0",
)
CFG = CutlassGemmConfig()


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SVDQ_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_nvcc(cmd, log: Path) -> None:
    """Writes the ``-o`` target like nvcc would, after reading the rendered source."""
    source = Path(cmd[-3])
    text = source.read_text()
    assert "TORCH_LIBRARY_FRAGMENT" in text
    Path(cmd[-1]).write_bytes(b"\x7fELF fake library for " + source.name.encode())
    log.write_text("ok")


def slow_counting_nvcc(cmd, log: Path) -> None:
    counter = Path(os.environ["SVDQ_TEST_COUNTER"])
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    fake_nvcc(cmd, log)


def failing_nvcc(cmd, log: Path) -> None:
    log.write_text("k.cu(12): error: identifier \"Foo\" is undefined\n")
    raise BackendError("nvcc failed (exit 2) building x: identifier \"Foo\" is undefined")


def test_cache_dir_env_override_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SVDQ_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "svdquant" / "kernels"


@pytest.mark.parametrize("field", ["nvcc_version", "cutlass_version", "arch", "torch_version", "svdquant_version"])
def test_cache_key_changes_with_each_toolchain_component(field: str) -> None:
    other = dataclasses.replace(TC, **{field: getattr(TC, field) + "x"})
    assert build.cache_key(CFG, other) != build.cache_key(CFG, TC)


def test_cache_key_changes_with_each_config_field_but_not_paths() -> None:
    keys = {build.cache_key(c, TC) for c in [
        CFG, dataclasses.replace(CFG, tile_n=256), dataclasses.replace(CFG, tile_k=64),
        dataclasses.replace(CFG, tile_m=256), dataclasses.replace(CFG, cluster_m=2),
        dataclasses.replace(CFG, cluster_n=2), dataclasses.replace(CFG, stages=4),
        dataclasses.replace(CFG, schedule="pingpong"),
    ]}
    assert len(keys) == 8
    moved = dataclasses.replace(TC, nvcc="/elsewhere/nvcc", cutlass_dir="/elsewhere")
    assert build.cache_key(CFG, moved) == build.cache_key(CFG, TC)
    assert len(build.cache_key(CFG, TC)) == 16 and int(build.cache_key(CFG, TC), 16) >= 0


def test_nvcc_command_targets_sm90a_with_cutlass_and_torch_headers(tmp_path: Path) -> None:
    cmd = build.nvcc_command(tmp_path / "k.cu", tmp_path / "k.so", TC)
    assert cmd[0] == TC.nvcc
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd
    assert "-shared" in cmd and "--expt-relaxed-constexpr" in cmd
    assert f"-I{Path(TC.cutlass_dir) / 'include'}" in cmd
    assert any(a.startswith("-I") and a.endswith("csrc") for a in cmd)
    assert any(a.startswith("-D_GLIBCXX_USE_CXX11_ABI=") for a in cmd)
    assert cmd[-3:] == [str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.so")]


def test_build_installs_atomically_then_hits_the_cache(_cache: Path, capsys: pytest.CaptureFixture) -> None:
    first = build.build_kernel(CFG, toolchain=TC, compiler=fake_nvcc)
    assert not first.cached and first.path.is_file()
    # a first use says what it waits for (nvcc takes minutes), in two lines; a cache hit says nothing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"svdq kernels: compiling {CFG.name} for sm_90a (first use")
    assert err[1].startswith(f"svdq kernels: built {CFG.name} in ")
    stem = first.path.name[:-3]
    assert sorted(p.name for p in _cache.iterdir()) == sorted(
        [f"{stem}.so", f"{stem}.json", f"{stem}.cu", f"{stem}.lock"]
    )
    meta = (_cache / f"{stem}.json").read_text()
    assert CFG.name in meta and "4.2.0.0" in meta
    second = build.build_kernel(CFG, toolchain=TC, compiler=failing_nvcc)  # never called
    assert second.cached and second.path == first.path and capsys.readouterr().err == ""
    forced = build.build_kernel(CFG, toolchain=TC, compiler=fake_nvcc, force=True)
    assert not forced.cached


def test_failed_build_leaves_nothing_behind(_cache: Path) -> None:
    with pytest.raises(BackendError, match="undefined"):
        build.build_kernel(CFG, toolchain=TC, compiler=failing_nvcc)
    leftovers = [p.name for p in _cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def _build_in_process(args) -> str:
    cache, counter = args
    os.environ["SVDQ_KERNEL_CACHE"] = cache
    os.environ["SVDQ_TEST_COUNTER"] = counter
    return str(build.build_kernel(CFG, toolchain=TC, compiler=slow_counting_nvcc).path)


def test_concurrent_first_use_from_two_processes_builds_once(_cache: Path, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    counter.touch()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.map(_build_in_process, [(str(_cache), str(counter))] * 2)
    assert paths[0] == paths[1] and Path(paths[0]).is_file()
    assert len(counter.read_text().split()) == 1


def _hold_lock(path: str, ready, release) -> None:
    with build.file_lock(Path(path)):
        ready.set()
        release.wait(10)


def test_file_lock_excludes_and_times_out(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path / "x.lock"), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="holds the kernel build lock"):
            with build.file_lock(tmp_path / "x.lock", timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        release.set()
        proc.join(10)
    with build.file_lock(tmp_path / "x.lock", timeout=1):  # free again once the holder exits
        pass


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_nvcc_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _write_exe(tmp_path / "nvcc", "#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    monkeypatch.setenv("SVDQ_NVCC", str(fake))
    assert build.find_nvcc() == str(fake)
    tc = build.detect_toolchain()
    assert tc.nvcc_version == "12.8.93" and tc.arch == "sm_90a" and tc.cutlass_version.startswith("4.")
    bad = _write_exe(tmp_path / "nvcc2", "#!/bin/sh\necho hello\n")
    with pytest.raises(BackendError, match="cannot parse the nvcc version"):
        build.detect_toolchain(nvcc=str(bad))


def test_missing_nvcc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(BackendError, match="nvcc .* was not found"):
        build.detect_toolchain()


def test_legacy_cuda_module_names_map_onto_cuda_bindings() -> None:
    pytest.importorskip("cuda.bindings")
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from svdq_kernels._cuda_compat import ensure_legacy_cuda_modules\n"
        "first = ensure_legacy_cuda_modules()\n"
        "import cuda, cuda.cuda, cuda.cudart, cuda.bindings.driver, cuda.bindings.runtime\n"
        "assert cuda.cuda is cuda.bindings.driver and cuda.cudart is cuda.bindings.runtime\n"
        "assert isinstance(cuda.__version__, str)\n"
        "assert ensure_legacy_cuda_modules() == []\n"
        "print(sorted(first))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "cuda.cuda" in out.stdout and "cuda.cudart" in out.stdout


def test_build_kernels_compiles_several_in_parallel_in_order(_cache: Path) -> None:
    """Several configurations, two nvcc runs at a time: each is built once, results come back in
    the order given, and a second call finds them all in the cache."""
    import threading

    from svdq_kernels.configs import AUTO_GROUP64_CONFIGS

    running, peak, lock = [0], [0], threading.Lock()

    def overlapping_nvcc(cmd, log: Path) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        Path(cmd[-1]).write_bytes(b"\x7fELF fake")
        log.write_text("ok")
        with lock:
            running[0] -= 1

    configs = list(AUTO_GROUP64_CONFIGS)
    first = build.build_kernels(configs, jobs=2, toolchain=TC, compiler=overlapping_nvcc)
    assert [r.path.name.split("-")[0] for r in first] == [c.name for c in configs]
    assert not any(r.cached for r in first) and peak[0] == 2
    again = build.build_kernels(configs, jobs=2, toolchain=TC, compiler=failing_nvcc)  # never called
    assert all(r.cached for r in again) and [r.path for r in again] == [r.path for r in first]


def _fake_torch_wheel(root: Path, *, cuda: str | None = "'13.0'", version: str = "'2.11.0+cu130'") -> Path:
    """The parts of an unpacked CUDA torch wheel's ``torch/`` folder a cross build reads."""
    t = root / "torch"
    (t / "include" / "torch" / "csrc" / "api" / "include").mkdir(parents=True)
    (t / "lib").mkdir()
    for lib in ("libtorch.so", "libc10_cuda.so"):
        (t / "lib" / lib).write_bytes(b"")
    (t / "version.py").write_text(
        "from typing import Optional\n\n__all__ = ['__version__', 'cuda']\n"
        f"__version__ = {version}\ndebug = False\ncuda: Optional[str] = {cuda}\n"
        "raise SystemExit('never executed')\n")
    return t


def test_a_cross_build_takes_headers_libraries_and_key_from_the_unpacked_wheel(tmp_path: Path) -> None:
    """``svdq kernels build --torch-dir``: the GPU machine's torch (2.11.0+cu130 here) gives the
    cache key's torch version (read as text, never executed) and the -I / -L paths, so a CPU
    machine prebuilds the exact cache entries the GPU machine looks up."""
    t = _fake_torch_wheel(tmp_path)
    assert build.torch_dir_version(t) == "2.11.0+cu130+cuda13.0"
    nvcc = build.find_nvcc()  # detect_toolchain runs nvcc --version: where there is none, the same fields by hand
    tc = build.detect_toolchain(nvcc=nvcc, torch_dir=t) if nvcc else dataclasses.replace(
        TC, torch_version=build.torch_dir_version(t), torch_dir=str(t.resolve()))
    assert tc.torch_version == "2.11.0+cu130+cuda13.0" and tc.torch_dir == str(t.resolve())
    assert "torch_dir" not in tc.key_fields()  # where the wheel lies does not change the artefact
    assert build.cache_key(CFG, tc) == build.cache_key(CFG, dataclasses.replace(tc, torch_dir=""))
    cmd = build.nvcc_command(Path("k.cu"), Path("k.so"), tc)
    torch_flags = [a for a in cmd if a.startswith(("-I", "-L")) and "torch" in a]
    assert torch_flags == [f"-I{t.resolve()}/include", f"-I{t.resolve()}/include/torch/csrc/api/include",
                           f"-L{t.resolve()}/lib"]
    assert "-D_GLIBCXX_USE_CXX11_ABI=1" in cmd
    res = build.build_kernel(CFG, toolchain=tc, compiler=fake_nvcc)
    assert res.path.is_file() and res.key == build.cache_key(CFG, tc)


@pytest.mark.parametrize("damage,words", [
    ("no_lib", "no lib/libtorch.so"), ("cpu_only", "no __version__ / cuda"), ("empty", "no version.py")])
def test_a_cross_build_refuses_a_folder_that_is_not_a_cuda_torch_wheel(tmp_path: Path, damage, words) -> None:
    if damage == "empty":
        t = tmp_path / "torch"
        t.mkdir()
    else:
        t = _fake_torch_wheel(tmp_path, cuda="None" if damage == "cpu_only" else "'13.0'")
        if damage == "no_lib":
            (t / "lib" / "libtorch.so").unlink()
    with pytest.raises(BackendError, match=words) as err:
        build.torch_dir_version(t)
    assert "\n" not in str(err.value) and str(t) in str(err.value)
