"""The README's two set-up commands stay what CI runs; no library code loads a pickle.

(The import rules of docs/design.md are tests/test_imports.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert demo.endswith("svdq demo") and "torch==2.13.0" in demo
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_no_pickle_loading_in_the_library():
    pattern = re.compile(r"\bpickle\.loads?\(|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    for package in ("svdq_format", "svdq_kernels", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path}: loads a pickle"
