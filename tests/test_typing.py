"""The three packages type-check: ``mypy svdq_format svdq_kernels converters`` reports no error.

The settings are pyproject.toml's ``[tool.mypy]`` (third-party packages without type
information are listed there). A fresh cache under ``tmp_path`` makes this a full check
(about a minute; two mypy worker processes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["svdq_format", "svdq_kernels", "converters"]


def test_mypy_reports_no_errors(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[dev]')")
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "mypy_cache"),
        "--num-workers", "2",  # CI's two cores (a third of the wall time off; same report)
        "--no-color-output",
        *PACKAGES,
    ])
    report = (stdout + stderr).strip()
    assert status == 0, f"mypy {' '.join(PACKAGES)} (exit status {status}):\n{report}"
