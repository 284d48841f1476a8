"""The two packages' layering (DESIGN's layout, the project's code style): `proxy/` (the network
half) imports `policy/` (the trust half), never the reverse, and no module imports itself back
through others, not even by an import inside a function (a lazy import only hides a cycle).

Read from the source with `ast`, so the check sees every import statement, wherever it is.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "policy")


def _imports() -> dict[str, set[str]]:
    """Module name -> the project's modules it imports (anywhere in its source)."""
    modules = {f"{pkg}.{path.stem}": path for pkg in PACKAGES for path in (REPO / pkg).glob("*.py")
               if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = found & modules.keys()
    return graph


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph[node]):
            if dep == start:
                return path + [start]
            if dep not in path:
                stack.append((dep, path + [dep]))
    return None


def test_the_trust_half_never_imports_the_network_half():
    graph = _imports()
    assert len(graph) > 40     # the walk found the modules
    wrong = sorted((name, dep) for name, deps in graph.items() if name.startswith("policy.")
                   for dep in deps if dep.startswith("proxy."))
    assert wrong == []


def test_no_module_imports_itself_back():
    graph = _imports()
    assert graph["proxy.runner"] and graph["proxy.worker_main"]   # imports are seen, lazy ones too
    cycles = {tuple(c) for name in graph if (c := _cycle_from(name, graph))}
    assert cycles == set()
