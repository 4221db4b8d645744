"""mypy over the three packages, started in the background when the test session begins.

A full check takes over a minute of CPU (a fresh cache: CI is a clean clone, so an incremental
cache would never be warm there). The suite's tests are single-threaded, so on CI's two cores
one core is mostly idle: ``tests/conftest.py`` starts mypy when ``tests/test_typing.py``'s test
is selected, at a lower priority than the tests, and that test waits for its report. Same
command, settings and report as ``mypy svdq_format svdq_kernels converters``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["svdq_format", "svdq_kernels", "converters"]
TEST_ID = "tests/test_typing.py::test_mypy_reports_no_errors"


@dataclass
class _Run:
    proc: subprocess.Popen
    workdir: Path  # the fresh cache and the report file


_run: _Run | None = None


def available() -> bool:
    """Whether mypy is installed (the ``dev`` extra)."""
    return importlib.util.find_spec("mypy") is not None


def start() -> None:
    """Start the check (once per process; a no-op without mypy or when already started)."""
    global _run
    if _run is not None or not available():
        return
    workdir = Path(tempfile.mkdtemp(prefix="svdq-mypy-"))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(workdir / "cache"),
           "--num-workers", "2",  # CI's two cores (same report); niced below the tests
           "--no-color-output", *PACKAGES]
    with open(workdir / "report.txt", "wb") as out:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=lambda: os.nice(10))
    _run = _Run(proc, workdir)


def result(timeout_s: float) -> tuple[int, str]:
    """Wait for the check (starting it if needed) and return ``(exit status, report)``."""
    start()
    assert _run is not None
    try:
        status = _run.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop()
        return -1, f"mypy did not finish within {timeout_s:g} s"
    report = (_run.workdir / "report.txt").read_text(errors="replace").strip()
    stop()
    return status, report


def stop() -> None:
    """End a check still running and remove its cache (the session's end, or after :func:`result`)."""
    global _run
    if _run is None:
        return
    if _run.proc.poll() is None:
        os.killpg(_run.proc.pid, signal.SIGKILL)  # its worker processes too (own session)
        _run.proc.wait()
        for status_file in ROOT.glob(".mypy_worker.*.json"):  # what the killed workers left in the tree
            status_file.unlink(missing_ok=True)
    shutil.rmtree(_run.workdir, ignore_errors=True)
    _run = None
