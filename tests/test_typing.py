"""The three packages type-check: ``mypy svdq_format svdq_kernels converters`` reports no error.

The settings are pyproject.toml's ``[tool.mypy]`` (third-party packages without type
information are listed there). A fresh cache makes this a full check (over a minute of CPU;
two mypy worker processes). It runs in the background from the start of the session
(``tests/mypy_background.py``, started by ``tests/conftest.py``) on the core the
single-threaded tests leave idle; this test waits for its report.
"""

from __future__ import annotations

import pytest

from tests import mypy_background


def test_mypy_reports_no_errors():
    if not mypy_background.available():
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    status, report = mypy_background.result(timeout_s=900)
    assert status == 0, f"mypy {' '.join(mypy_background.PACKAGES)} (exit status {status}):\n{report}"
