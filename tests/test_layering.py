"""The project's packages import one way: flows -> deployments -> tasks -> patches -> wan_engine.

Imports are read from the source with `ast` (at module level and inside functions alike, since a
function-level import is a dependency too), so the test sees every import whether or not it runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a package may import only the packages listed before it.
LAYERS = ("wan_engine", "patches", "tasks", "deployments", "flows")
SETTINGS_MODULE = ROOT / "tasks" / "settings.py"


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a source file under `root`; relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return sorted(found)


def package_imports() -> dict[str, set[tuple[str, str]]]:
    """For each project package, the project packages it imports, with where (file:line) each import is."""
    edges: dict[str, set[tuple[str, str]]] = {name: set() for name in LAYERS}
    for name in LAYERS:
        for path in sorted((ROOT / name).rglob("*.py")):
            for line, module in imported_modules(path):
                target = module.split(".")[0]
                if target in LAYERS and target != name:
                    edges[name].add((target, f"{path.relative_to(ROOT)}:{line}"))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path that ends where it starts, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_the_packages():
    graph = {name: {target for target, _ in targets} for name, targets in package_imports().items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


def test_every_package_imports_only_the_ones_below_it():
    upward = [f"{where} ({name} imports {target})" for name, targets in package_imports().items()
              for target, where in targets if LAYERS.index(target) > LAYERS.index(name)]
    assert not upward, "imports pointing up " + " > ".join(reversed(LAYERS)) + ":\n" + "\n".join(sorted(upward))


def test_the_settings_module_imports_no_project_module():
    project = [f"line {line}: {module}" for line, module in imported_modules(SETTINGS_MODULE)
               if module.split(".")[0] in LAYERS]
    assert not project, f"{SETTINGS_MODULE.relative_to(ROOT)} imports " + ", ".join(project)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"c"}}, ["c", "c"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_function_level_and_relative_imports_count(tmp_path):
    source = tmp_path / "tasks" / "probe.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from flows.generate import generate_video\nfrom .gpus import read_gpu_profile\n")
    assert imported_modules(source, tmp_path) == [(2, "flows.generate"), (3, "tasks.gpus")]
