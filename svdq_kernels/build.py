"""Compile generated kernels for sm_90a with nvcc on first use; cache them on disk.

Layout of the cache (``$SVDQ_KERNEL_CACHE``, default ``~/.cache/svdquant/kernels``)::

    <cache>/<name>-<key>.so      the built torch-op library (its presence = complete)
    <cache>/<name>-<key>.json    what it was built from (config, toolchain, seconds)
    <cache>/<name>-<key>.cu      the rendered source (for debugging; never read back)
    <cache>/<name>-<key>.lock    per-kernel lock file (fcntl) held while building

The key is a hash of the kernel configuration, nvidia-cutlass version, target arch, our
version, the nvcc version and the torch build (the library links against libtorch). A
process that finds the ``.so`` loads it without locking. Otherwise it takes the kernel's lock,
checks again (another process may have finished meanwhile), compiles into a private temporary
directory and installs with ``os.replace`` — so concurrent first use from several processes
builds once and nobody ever loads a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from svdq_format.errors import BackendError

from ._cuda_compat import cutlass_source_dir, cutlass_version
from .codegen import CSRC_DIR, render_source
from .configs import CutlassGemmConfig

__all__ = [
    "ARCH",
    "Toolchain",
    "BuildResult",
    "cache_dir",
    "cache_key",
    "sources_digest",
    "detect_toolchain",
    "find_nvcc",
    "nvcc_command",
    "file_lock",
    "build_kernel",
    "load_kernel",
]

#: Target architecture (wgmma / setmaxnreg need the arch-specific ``a`` variant).
ARCH = "sm_90a"
_LOCK_TIMEOUT_S = float(os.environ.get("SVDQ_KERNEL_LOCK_TIMEOUT", "1800"))


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Everything besides the kernel config that changes the built artefact."""

    nvcc: str
    nvcc_version: str
    cutlass_version: str
    cutlass_dir: str
    arch: str
    torch_version: str
    svdquant_version: str
    #: An unpacked torch wheel (its ``torch/`` folder) whose headers and libraries the kernels are
    #: built against instead of the running torch's (:func:`torch_dir_version`); "" = the running one.
    torch_dir: str = ""

    def key_fields(self) -> dict[str, str]:
        """The fields that enter the cache key (paths excluded: a moved venv keeps its cache)."""
        return {
            "nvcc_version": self.nvcc_version,
            "cutlass_version": self.cutlass_version,
            "arch": self.arch,
            "torch_version": self.torch_version,
            "svdquant_version": self.svdquant_version,
        }


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Where a kernel library is and how it got there."""

    path: Path
    key: str
    cached: bool
    seconds: float


def cache_dir() -> Path:
    """The kernel cache directory (``$SVDQ_KERNEL_CACHE`` or ``~/.cache/svdquant/kernels``)."""
    env = os.environ.get("SVDQ_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "svdquant" / "kernels"


def find_nvcc() -> Optional[str]:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else ``nvcc`` on ``PATH``, else ``None``."""
    for var in ("SVDQ_NVCC", "CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if not root:
            continue
        cand = Path(root) if var == "SVDQ_NVCC" else Path(root) / "bin" / "nvcc"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


@functools.lru_cache(maxsize=8)
def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"{nvcc}: cannot run nvcc --version: {exc}") from None
    match = re.search(r"release\s+([\d.]+),\s*V([\d.]+)", out)
    if not match:
        raise BackendError(f"{nvcc}: cannot parse the nvcc version from {out.strip()[-200:]!r}")
    return match.group(2)


_VERSION_LINE = re.compile(r"^(__version__|cuda)(?:\s*:\s*[^=]+)?\s*=\s*'([^']*)'\s*$", re.MULTILINE)


def torch_dir_version(torch_dir: str | os.PathLike[str]) -> str:
    """The cache-key torch version (``"<__version__>+cuda<cuda>"``) of an unpacked torch wheel.

    Read from ``torch/version.py`` as text (never imported or executed), with the checks that
    the folder holds what a build needs (``include/torch``, ``lib/libtorch.so``).

    Raises:
        BackendError: one line naming the folder and what is missing or unreadable.
    """
    root = Path(torch_dir)
    for need in ("version.py", "include/torch", "lib/libtorch.so", "lib/libc10_cuda.so"):
        if not (root / need).exists():
            raise BackendError(f"{root}: not an unpacked CUDA torch wheel's torch/ folder (no {need})")
    found = dict(_VERSION_LINE.findall((root / "version.py").read_text(encoding="utf-8", errors="replace")))
    if not found.get("__version__") or not found.get("cuda"):
        raise BackendError(f"{root / 'version.py'}: no __version__ / cuda string (a CPU-only torch cannot "
                           "build the kernels)")
    return f"{found['__version__']}+cuda{found['cuda']}"


def detect_toolchain(*, nvcc: Optional[str] = None, arch: str = ARCH,
                     torch_dir: str | os.PathLike[str] | None = None) -> Toolchain:
    """Find nvcc and nvidia-cutlass; raise :class:`BackendError` naming what is missing.

    ``torch_dir``: build against an unpacked torch wheel (its ``torch/`` folder) instead of the
    running torch — how a CPU machine prebuilds the kernel cache of a GPU machine whose torch
    differs (the cache key then carries that torch's version, so the GPU machine finds them)."""
    import torch

    from svdq_format import __version__

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BackendError(
            "nvcc (the CUDA compiler) was not found: install the CUDA toolkit >= 12.3 and set "
            "CUDA_HOME, or put nvcc on PATH"
        )
    return Toolchain(
        nvcc=nvcc,
        nvcc_version=_nvcc_version(nvcc),
        cutlass_version=cutlass_version(),
        cutlass_dir=str(cutlass_source_dir()),
        arch=arch,
        torch_version=(torch_dir_version(torch_dir) if torch_dir is not None
                       else f"{torch.__version__}+cuda{torch.version.cuda}"),
        svdquant_version=__version__,
        torch_dir=str(Path(torch_dir).resolve()) if torch_dir is not None else "",
    )


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    """sha256 over our C++ templates and headers (``csrc/``): editing one rebuilds every kernel."""
    h = hashlib.sha256()
    for path in sorted(CSRC_DIR.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_key(config: CutlassGemmConfig, toolchain: Toolchain) -> str:
    """16 hex digits identifying the built artefact of ``config`` under ``toolchain`` (and our
    C++ sources, :func:`sources_digest`)."""
    payload = {"kernel": config.as_dict(), "toolchain": toolchain.key_fields(), "layout": 1,
               "sources": sources_digest()}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def nvcc_command(source: Path, output: Path, toolchain: Toolchain) -> list[str]:
    """The nvcc command line that builds ``source`` into a shared library of torch ops."""
    import torch
    from torch.utils import cpp_extension

    cutlass = Path(toolchain.cutlass_dir)
    arch_num = toolchain.arch.removeprefix("sm_")
    cmd = [
        toolchain.nvcc, "-O3", "-std=c++17", "-DNDEBUG",
        f"-gencode=arch=compute_{arch_num},code={toolchain.arch}",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "-shared", "-Xcompiler", "-fPIC",
        # a wheel in torch_dir: every torch wheel since 2.7 is built with the C++11 ABI
        f"-D_GLIBCXX_USE_CXX11_ABI={1 if toolchain.torch_dir else int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}", f"-I{CSRC_DIR}",
    ]
    if toolchain.torch_dir:
        root = Path(toolchain.torch_dir)
        cmd += [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                f"-L{root / 'lib'}"]
    else:
        cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
        for lib_dir in cpp_extension.library_paths():
            cmd += [f"-L{lib_dir}"]  # libtorch is already loaded when torch.ops.load_library runs
    cmd += ["-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu"]
    cmd += [str(source), "-o", str(output)]
    return cmd


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float = _LOCK_TIMEOUT_S, poll: float = 0.1) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (``fcntl.flock``; released on exit or crash).

    Raises:
        BackendError: when the lock is not obtained within ``timeout`` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for the kernels
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"{path}: another process holds the kernel build lock for more than "
                        f"{timeout:.0f} s"
                    ) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


Compiler = Callable[[Sequence[str], Path], None]


def _run_nvcc(cmd: Sequence[str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise BackendError(
            f"nvcc failed (exit {proc.returncode}) building {cmd[-1]}:\n" + "\n".join(tail)
        )


def build_kernel(
    config: CutlassGemmConfig,
    *,
    toolchain: Optional[Toolchain] = None,
    force: bool = False,
    compiler: Optional[Compiler] = None,
    verbose: bool = False,
) -> BuildResult:
    """Build ``config`` into the cache unless it is there already.

    Args:
        config: The kernel.
        toolchain: Default :func:`detect_toolchain`.
        force: Rebuild even when a cached library exists.
        compiler: ``compiler(cmd, log_path)``; default runs nvcc (tests substitute one).
        verbose: Print the command and timing to stderr.

    Returns:
        The installed library's path and whether it came from the cache.
    """
    toolchain = toolchain or detect_toolchain()
    compiler = compiler or _run_nvcc
    root = cache_dir()
    key = cache_key(config, toolchain)
    stem = f"{config.name}-{key}"
    final = root / f"{stem}.so"
    t0 = time.perf_counter()
    if final.is_file() and not force:
        return BuildResult(final, key, True, 0.0)
    try:  # an unusable cache (read-only, under /proc, a file in the way) is a clear error
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise BackendError(
            f"{root}: cannot write to the kernel cache directory ({exc.strerror or exc}); "
            "set SVDQ_KERNEL_CACHE to a writable directory"
        ) from None
    with file_lock(root / f"{stem}.lock"):
        if final.is_file() and not force:  # built by another process while we waited
            return BuildResult(final, key, True, time.perf_counter() - t0)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=root))
        try:
            source = tmp / f"{stem}.cu"
            source.write_text(render_source(config), encoding="utf-8")
            out = tmp / f"{stem}.so"
            cmd = nvcc_command(source, out, toolchain)
            # one line even when not verbose: a first use waits ~2 min per kernel in nvcc
            print(f"svdq kernels: compiling {config.name} for {toolchain.arch} (first use; ~2 min, cached in "
                  f"{root}; `svdq kernels build` prebuilds them all)"
                  + (f": {' '.join(cmd)}" if verbose else ""), file=sys.stderr, flush=True)
            compiler(cmd, tmp / "build.log")
            if not out.is_file():
                raise BackendError(f"{out}: the compiler reported success but wrote no library")
            seconds = time.perf_counter() - t0
            meta: dict[str, Any] = {
                "kernel": config.as_dict(), "name": config.name, "key": key,
                "toolchain": dataclasses.asdict(toolchain), "build_seconds": round(seconds, 1),
                "command": list(cmd),
            }
            (tmp / f"{stem}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            os.replace(source, root / f"{stem}.cu")
            os.replace(tmp / f"{stem}.json", root / f"{stem}.json")
            os.replace(out, final)  # last: the .so's presence means "complete"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"svdq kernels: built {config.name} in {seconds:.0f} s -> {final}", file=sys.stderr, flush=True)
    return BuildResult(final, key, False, seconds)


def build_kernels(
    configs: Sequence[CutlassGemmConfig], *, jobs: int = 0, toolchain: Optional[Toolchain] = None,
    force: bool = False, compiler: Optional[Compiler] = None, verbose: bool = False,
) -> list[BuildResult]:
    """:func:`build_kernel` for several configurations, ``jobs`` nvcc processes at a time (default:
    one per 3 CPU cores, at most one per configuration: the five kernels ``fast8`` builds on first
    use compile at once on a 16-core host, ~2 minutes); results in the order given."""
    toolchain = toolchain or detect_toolchain()
    jobs = jobs or max(1, min(len(configs), (os.cpu_count() or 1) // 3))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(
            lambda c: build_kernel(c, toolchain=toolchain, force=force, compiler=compiler, verbose=verbose), configs))


_LOADED: dict[str, Callable[..., Any]] = {}


def load_kernel(
    config: CutlassGemmConfig, *, also_build: Sequence[CutlassGemmConfig] = (), **build_kwargs: Any,
) -> Callable[..., Any]:
    """Build (or find) ``config`` and return its op ``torch.ops.svdq_kernels.<name>``.

    ``also_build``: configurations to compile in parallel with it when it is not loaded yet (the
    others a model is about to ask for: one first-use wait instead of one per kernel)."""
    import torch

    op = _LOADED.get(config.name)
    if op is not None:
        return op
    others = [c for c in also_build if c.name != config.name and c.name not in _LOADED]
    result = build_kernels([config, *others], **build_kwargs)[0] if others else build_kernel(config, **build_kwargs)
    try:
        torch.ops.load_library(str(result.path))
        op = getattr(torch.ops.svdq_kernels, config.name)
    except (OSError, RuntimeError, AttributeError) as exc:  # e.g. built against another torch/CUDA
        raise BackendError(f"{result.path}: cannot load kernel {config.name}: {exc}") from exc
    _LOADED[config.name] = op
    return op
