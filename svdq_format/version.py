"""The package version (one place; ``svdq_format.__version__`` and the files' ``producer`` read it)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
