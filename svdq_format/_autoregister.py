"""Register svdquant into diffusers and transformers without importing them at ``import svdq_format``.

``import diffusers.quantizers`` costs seconds, and diffusers and transformers are optional for the
format itself. So :func:`install` registers right away only where the library's quantizer
registry is already imported; otherwise it adds a tiny import hook that runs the registration the
moment ``diffusers.quantizers.auto`` (``transformers.quantizers.auto``) finishes importing (which
every ``from_pretrained`` does).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["install"]


def _register_diffusers() -> None:
    partial = sys.modules.get(f"{__package__}.diffusers")
    if partial is not None and not hasattr(partial, "register"):
        return  # our diffusers module is importing diffusers; it registers itself when done
    from .diffusers import register

    register()


def _register_transformers() -> None:
    partial = sys.modules.get(f"{__package__}.transformers")
    if partial is not None and not hasattr(partial, "register"):
        return  # our transformers module is importing transformers; it registers itself when done
    from .transformers import register

    register()


#: module name → registration to run once that module is imported.
_HOOKS: dict[str, Callable[[], None]] = {"diffusers.quantizers.auto": _register_diffusers,
                                         "transformers.quantizers.auto": _register_transformers}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, after: Callable[[], None]) -> None:
        self._inner = inner
        self._after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            self._after()
        except Exception as exc:  # never break the host library's import
            warnings.warn(f"svdquant could not register with {module.__name__}: {exc}", stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... for tools
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        after = _HOOKS.get(fullname)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, after)
                return spec
        return None


def install() -> None:
    """Register now if the target module is loaded, else when it gets imported (idempotent)."""
    pending = False
    for name, register in _HOOKS.items():
        if name in sys.modules:
            register()
        else:
            pending = True
    if pending and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
