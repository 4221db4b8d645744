"""The repository is ruff-clean: ``ruff check .`` reports no problem.

The settings are pyproject.toml's ``[tool.ruff]`` (line length 120, rules E, F, W and I); the
dev extra pins the ruff version, so a newer ruff's new checks do not fail this test. Takes
well under a second.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')"
)
def test_ruff_reports_no_problems():
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"ruff check . (exit status {proc.returncode}):\n{report}"
