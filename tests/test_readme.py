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


#: Every call that unpickles, anywhere in the packages: ``pickle.load(s)``, ``torch.load`` without
#: ``weights_only=True``, and torch.distributed's object collectives (they pickle between ranks).
UNPICKLING = re.compile(r"\bpickle\.loads?\(|\bUnpickler\b|\bmarshal\.loads?\(|\bdill\.|\bjoblib\.load\("
                        r"|torch\.load\((?![^)]*weights_only\s*=\s*True)"
                        r"|\b(?:all_gather_object|gather_object|broadcast_object_list|scatter_object_list"
                        r"|recv_object_list|send_object_list)\(")

#: The accepted ones: (file, call) → named in docs/reliability.md ("Pickles between ranks").
ALLOWED_UNPICKLING = {("converters/quantize/distributed.py", "all_gather_object(")}


def unpickling_calls() -> set[tuple[str, str]]:
    found = set()
    for package in ("svdq_format", "svdq_kernels", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            for m in UNPICKLING.finditer(path.read_text()):
                found.add((str(path.relative_to(ROOT)), m.group(0).removeprefix("dist.")))
    return found


def test_no_pickle_loading_in_the_library():
    calls = unpickling_calls()
    assert calls - ALLOWED_UNPICKLING == set(), "loads a pickle (or add it to ALLOWED_UNPICKLING and the docs)"
    assert calls == ALLOWED_UNPICKLING  # (an allowed one that is gone is removed from the list)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    for path, call in ALLOWED_UNPICKLING:
        assert path in doc and call.rstrip("(") in doc, f"docs/reliability.md does not name {path} {call}"


def test_the_scan_sees_object_collectives(tmp_path):
    sample = "out = [None]\ndist.all_gather_object(out, obj)\ntorch.distributed.broadcast_object_list(x)\n"
    assert [m.group(0) for m in UNPICKLING.finditer(sample)] == ["all_gather_object(", "broadcast_object_list("]
    assert UNPICKLING.search("torch.load(f)") and not UNPICKLING.search("torch.load(f, weights_only=True)")
