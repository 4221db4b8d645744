"""The import rules of docs/design.md, read from the source (every ``import`` statement, those
inside functions included):

* the packages depend in one direction: ``svdq_format`` imports nothing of ours, ``converters``
  and ``svdq_kernels`` never each other;
* inside each package no module imports itself back through others (no import cycle);
* no module imports another module's private (``_``-prefixed) name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("svdq_format", "svdq_kernels", "converters")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """``(imported module, names imported from it, line)`` of every import in the file, absolute names."""
    base = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                src = ".".join(parts + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            out.append((src, [a.name for a in node.names], node.lineno))
    return out


def module_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the modules of ``package`` its imports run, wherever the import statement is.

    ``from p.q import r`` names module ``p.q.r`` when that is a module, else ``p.q``; importing
    ``p.q.r`` from outside package ``p.q`` also runs ``p/q/__init__.py`` (an edge to ``p.q``).
    """
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        own = mod if mod in packages else mod.rpartition(".")[0]
        for src, names, _ in _imports(path, mod, mod in packages):
            targets = [f"{src}.{n}" if f"{src}.{n}" in files else src for n in names] or [src]
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if not target:
                    continue
                parent = target.rpartition(".")[0]
                while parent and parent in packages and not (own == parent or own.startswith(parent + ".")):
                    graph[mod].add(parent)  # its __init__ runs first
                    parent = parent.rpartition(".")[0]
                if target != mod:
                    graph[mod].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def imported_packages(package: str) -> set[tuple[str, str]]:
    """``(top-level package, file)`` of every absolute import in ``package``."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update((a.name.split(".")[0], path.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add((node.module.split(".")[0], path.name))
    return found


def test_import_direction():
    ours = set(PACKAGES)
    fmt = {(pkg, f) for pkg, f in imported_packages("svdq_format") if pkg in ours - {"svdq_format"}}
    assert fmt == set(), f"svdq_format must not import our other packages: {fmt}"
    assert not {p for p, _ in imported_packages("converters")} & {"svdq_kernels"}
    assert not {p for p, _ in imported_packages("svdq_kernels")} & {"converters"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    graph = module_graph(package)
    cycles = find_cycles(graph)
    shown = [" -> ".join(c) + "  (" + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c) + ")"
             for c in cycles]
    assert not cycles, f"import cycles in {package}:\n" + "\n".join(shown)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_imported_from_another_module(package):
    files = {_module_name(p, ROOT): p for p in (ROOT / package).rglob("*.py")}
    found = []
    for mod, path in files.items():
        for src, names, line in _imports(path, mod, path.name == "__init__.py"):
            if src.split(".")[0] not in PACKAGES:
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {n} from {src}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_finder_sees_imports_inside_functions_and_package_inits(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from .b import g\n    return g()\n",
        "pkg/b.py": "from pkg.c import h\n",
        "pkg/c.py": "import os\n\ndef h():\n    from . import a  # back to a, inside a function\n",
        "pkg/sub/__init__.py": "from ..d import D\n",
        "pkg/sub/leaf.py": "X = 1\n",
        "pkg/d.py": "D = 1\n",
        "pkg/e.py": "from pkg.sub.leaf import X  # runs pkg/sub/__init__ too\n",
        "pkg/f.py": "from .e import X\nfrom . import d\n",
    })
    graph = module_graph("pkg", tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.leaf"} and graph["pkg.f"] == {"pkg.e", "pkg.d"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    _write(tmp_path, {"pkg/d.py": "from .e import X\n"})  # d → e → sub/__init__ → d
    assert sorted(find_cycles(module_graph("pkg", tmp_path))) == [["pkg.a", "pkg.b", "pkg.c"],
                                                                   ["pkg.d", "pkg.e", "pkg.sub"]]
