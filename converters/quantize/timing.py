"""Per-phase wall-clock accounting (exclusive: a nested phase's time is not its parent's)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

__all__ = ["PhaseTimer", "PHASES"]

#: Phases reported by the quantizer.
#: (several processes: ``wait`` is time spent waiting for the slowest rank before an exchange,
#: ``exchange`` moving and unpacking the data)
PHASES = ("calibration", "smoothing_search", "svd", "residual", "report", "io", "wait", "exchange")


class PhaseTimer:
    """Accumulates exclusive seconds per phase; synchronises CUDA at phase boundaries."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {p: 0.0 for p in PHASES}
        self._stack: list[list[float]] = []  # [start, child_seconds]

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name``."""
        self._sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            total = time.perf_counter() - frame[0]
            self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[1]
            if self._stack:
                self._stack[-1][1] += total

    def add(self, other: dict[str, float]) -> None:
        """Add seconds recorded elsewhere (e.g. a resumed run's earlier blocks)."""
        for k, v in other.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + float(v)
