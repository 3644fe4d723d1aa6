"""The package's import graph, read from the source (ast; no import is executed): no circles, and the
low layers import nothing above them.

Every import counts, the late ones inside functions included (a late import hides a circle from
Python's import machinery, not from the design), except those under `if TYPE_CHECKING:`. An import of
`vipamin_scale.a.b` also depends on the package `vipamin_scale.a` (its `__init__` runs first), except from
inside `vipamin_scale.a` itself (a package's `__init__` may late-import its own modules, a registry);
the top package `vipamin_scale` is the public face and is counted only when imported by name.

Layers, lowest first (../shared/STYLE.md): `config`, `distributed` -> `linalg` -> pure math -> `models`,
`data` -> capture / sharded init -> `engine` -> `train` -> `tune`, `report` -> `cli`. `paths` is a leaf
helper (it imports nothing of ours) that any layer may use.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vipamin_scale"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# What each low module may import from the package, and nothing else. `distributed` may raise the
# config's ConfigError (a late import); `linalg/` sits on `distributed` (the communicator).
LEAVES = {f"{PACKAGE}.paths"}
ALLOWED_BELOW = {
    f"{PACKAGE}.paths": set(),
    f"{PACKAGE}.config": LEAVES,
    f"{PACKAGE}.distributed": LEAVES | {f"{PACKAGE}.config"},
    f"{PACKAGE}.linalg": LEAVES | {f"{PACKAGE}.config", f"{PACKAGE}.distributed", f"{PACKAGE}.linalg"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The package module an imported dotted name lives in (the longest known prefix)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in modules:
            return name
    return None


def import_edges(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """{importer: {imported module: ["file:line", ...]}} over the modules of the package at `root`."""
    package = root.name
    modules = _modules(root)
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
                if any(_resolve(f"{prefix}.{a.name}", modules) == f"{prefix}.{a.name}" for a in node.names):
                    targets = targets[:-1]
            for target in targets:
                if not (target == package or target.startswith(package + ".")):
                    continue
                dep = _resolve(target, modules)
                if dep is None or dep == mod:
                    continue
                deps = {dep}
                parent = dep.rpartition(".")[0]
                while parent and parent != package:  # a subpackage's __init__ runs before its module
                    deps.add(parent)
                    parent = parent.rpartition(".")[0]
                for d in deps - {mod}:
                    if mod.startswith(d + "."):  # a module of a package needs not its own __init__
                        continue
                    where = graph[mod].setdefault(d, [])
                    line = f"{path.relative_to(root.parent)}:{node.lineno}"
                    if line not in where:
                        where.append(line)
    return graph


def circles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(graph, comp: list[str]) -> str:
    inside = set(comp)
    edges = [f"  {a} -> {b} ({', '.join(where)})" for a in comp for b, where in sorted(graph[a].items())
             if b in inside]
    return " <-> ".join(comp) + "\n" + "\n".join(edges)


def _layer(mod: str) -> str | None:
    for low in ALLOWED_BELOW:
        if mod == low or mod.startswith(low + "."):
            return low
    return None


def test_the_graph_reader_sees_late_relative_and_parent_imports(tmp_path):
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low.py": "import os\n",
        "sub/__init__.py": "from .a import f\n",
        "sub/a.py": "from pkg import low\n\ndef f():\n    from pkg.high import g  # late\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import g\nfrom . import a\n",
        "high.py": "import pkg.sub.b\n\ndef g():\n    pass\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_edges(pkg)
    assert set(graph["pkg.sub"]) == {"pkg.sub.a"}  # relative, in a package's __init__
    assert set(graph["pkg.sub.a"]) == {"pkg.low", "pkg.high"}  # `from pkg import low`; the late import
    assert set(graph["pkg.sub.b"]) == {"pkg.sub.a"}  # TYPE_CHECKING skipped; its own package: no edge
    assert set(graph["pkg.high"]) == {"pkg.sub.b", "pkg.sub"}  # a subpackage's __init__ runs first
    assert circles(graph) == [["pkg.high", "pkg.sub", "pkg.sub.a", "pkg.sub.b"]]
    assert circles({"a": {"b": []}, "b": {"c": []}, "c": {}, "d": {"a": []}}) == []


def test_no_import_circles():
    graph = import_edges()
    found = circles(graph)
    assert not found, "import circles in vipamin_scale/:\n" + "\n".join(_describe(graph, c) for c in found)


def test_low_layers_import_nothing_above_them():
    graph = import_edges()
    wrong = []
    for mod, deps in sorted(graph.items()):
        layer = _layer(mod)
        if layer is None:
            continue
        for dep, where in sorted(deps.items()):
            if _layer(dep) not in ALLOWED_BELOW[layer] and dep not in ALLOWED_BELOW[layer]:
                wrong.append(f"{mod} -> {dep} ({', '.join(where)})")
    assert not wrong, ("a low layer imports from above it (allowed: "
                       + "; ".join(f"{k}: {sorted(v) or 'nothing'}" for k, v in ALLOWED_BELOW.items())
                       + "):\n" + "\n".join(wrong))
