"""The README's commands stay what CI and conftest run; no library code loads a pickle.

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


def test_readme_says_which_torch_build_the_pin_gives_and_how_to_get_the_cpu_one():
    """``torch==2.13.0`` pins a version, not a build: on stock Linux PyPI it is the CUDA build."""
    text = (ROOT / "README.md").read_text()
    setup = re.search(r"## Set-up: two commands(.*?)\n## ", text, re.S).group(1)
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in blocks[1].splitlines()
    assert "CUDA build" in setup and "does not pull" not in setup


def test_readme_slow_command_runs_the_slow_tests_the_test_command_leaves_out():
    """conftest's selection, driven with the README's two commands: the test command (CI's) leaves
    the ``slow`` tests out, the slow command (``-m slow``) keeps them, and so does ``--soak``."""
    import shlex
    from types import SimpleNamespace

    from tests.conftest import pytest_collection_modifyitems

    text = (ROOT / "README.md").read_text()
    (slow_cmd,) = re.search(r"## Development.*?```bash\n(.*?)```", text, re.S).group(1).splitlines()
    test_cmd = readme_commands()[1].split("&& ")[-1]
    assert test_cmd == "python -m pytest" and slow_cmd.startswith("python -m pytest -m ")
    markexpr = shlex.split(slow_cmd)[4]

    def selected(markexpr: str, soak: bool = False) -> list[str]:
        items = [SimpleNamespace(name=n, keywords={n: 1, **({"slow": 1} if n.startswith("slow") else {})})
                 for n in ("fast_a", "slow_b", "fast_c", "slow_d")]
        left_out: list = []
        options = {"--soak": soak, "markexpr": markexpr}
        config = SimpleNamespace(getoption=options.__getitem__,
                                 hook=SimpleNamespace(pytest_deselected=lambda items: left_out.extend(items)))
        pytest_collection_modifyitems(config, items)
        assert not {i.name for i in items} & {i.name for i in left_out}
        return [i.name for i in items]

    assert selected("") == ["fast_a", "fast_c"]  # the test command: no -m
    assert selected(markexpr) == ["fast_a", "slow_b", "fast_c", "slow_d"]  # pytest's -m then keeps slow_*
    assert selected("", soak=True) == ["fast_a", "slow_b", "fast_c", "slow_d"]


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
