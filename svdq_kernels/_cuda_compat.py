"""Import nvidia-cutlass's Python packages on machines with cuda-bindings 13.

``cutlass_cppgen`` (nvidia-cutlass 4.2) reads ``cuda.__version__`` and lazily imports the
legacy cuda-python module names ``cuda.cuda`` / ``cuda.cudart`` / ``cuda.nvrtc``. cuda-bindings
13 provides neither: it ships ``cuda.bindings.driver`` / ``.runtime`` / ``.nvrtc``. This module
maps the legacy names onto the new modules (only where they are missing, never replacing
anything that exists) before ``cutlass_cppgen`` is imported. ``cutlass_library`` (the kernel
generator we use for source generation) needs no CUDA at all and is imported directly.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from svdq_format.errors import BackendError

__all__ = ["ensure_legacy_cuda_modules", "import_cutlass_library", "import_cutlass_cppgen",
           "cutlass_source_dir", "cutlass_version"]

_LEGACY = {"cuda.cuda": "driver", "cuda.cudart": "runtime", "cuda.nvrtc": "nvrtc"}


def ensure_legacy_cuda_modules() -> list[str]:
    """Register the cuda-bindings 13 modules under the legacy cuda-python names.

    Returns:
        The legacy names that were added (empty when nothing was needed or cuda-bindings is
        absent).
    """
    try:
        import cuda
        import cuda.bindings
    except ImportError:
        return []
    added: list[str] = []
    if not hasattr(cuda, "__version__"):
        cuda.__version__ = getattr(cuda.bindings, "__version__", "13.0.0")
    for legacy, new in _LEGACY.items():
        if legacy in sys.modules:
            continue
        try:
            importlib.import_module(legacy)  # a real legacy module wins
            continue
        except ImportError:
            pass
        try:
            module = importlib.import_module(f"cuda.bindings.{new}")
        except ImportError:
            continue
        sys.modules[legacy] = module
        setattr(cuda, legacy.split(".", 1)[1], module)
        added.append(legacy)
    return added


def import_cutlass_library() -> ModuleType:
    """Import ``cutlass_library`` (pure Python) or raise :class:`BackendError`."""
    try:
        return importlib.import_module("cutlass_library")
    except ImportError as exc:
        raise BackendError(
            "nvidia-cutlass is not installed (pip install 'svdquant[kernels]'): " + str(exc)
        ) from None


def import_cutlass_cppgen() -> ModuleType:
    """Import ``cutlass_cppgen`` after :func:`ensure_legacy_cuda_modules`."""
    ensure_legacy_cuda_modules()
    try:
        return importlib.import_module("cutlass_cppgen")
    except ImportError as exc:
        raise BackendError(f"cannot import cutlass_cppgen: {exc}") from None


def cutlass_source_dir() -> Path:
    """The CUTLASS C++ tree shipped inside the nvidia-cutlass wheel (``include/``, ``tools/``)."""
    lib = import_cutlass_library()
    if lib.__file__ is None:  # a namespace package: no wheel behind it
        raise BackendError("cutlass_library has no __file__: the nvidia-cutlass install is incomplete")
    path = Path(lib.__file__).resolve().parent / "source"
    if not (path / "include" / "cutlass" / "cutlass.h").is_file():
        raise BackendError(f"{path}: the nvidia-cutlass wheel has no CUTLASS C++ headers")
    return path


def cutlass_version() -> str:
    """Installed nvidia-cutlass version (distribution metadata), e.g. ``"4.2.0.0"``."""
    from importlib import metadata

    try:
        return metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        raise BackendError("nvidia-cutlass is not installed (pip install 'svdquant[kernels]')") from None
