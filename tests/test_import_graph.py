"""The import graph of our packages, read from the source with `ast` (every import,
module level and inside functions alike), and the layering rules it must keep:

- no cycles between our modules;
- the library packages (`cascade`, `decoding`, `calibration`) never import the
  application layer (`app`) or the benchmark package (`bench`);
- `bench` never imports `app` (the application layer sits on top of both);
- no private name (`_x`) is imported from another module.

Run as a script (`python tests/test_import_graph.py`) it prints the graph's cycles and
private imports, which is how the before/after figures of issue 20 were taken.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "bench", "calibration", "cascade", "decoding")
LIBRARY = ("calibration", "cascade", "decoding")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(module: str, node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for each import of our packages in `path`;
    `from pkg import sub` where sub is a module counts as an import of pkg.sub."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.append((alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node, name, path.name == "__init__.py")
            if target.split(".")[0] not in PACKAGES:
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.append((sub, []))
                else:
                    plain.append(alias.name)
            if plain:
                found.append((target, plain))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target, _ in imports_of(name, path, modules):
            while target and target not in modules:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_imports(root: Path = ROOT) -> list[str]:
    """`from x import _name` across modules (a module's own package __init__ may not
    reach into it either: private means private to its module)."""
    modules = module_files(root)
    bad = []
    for name, path in modules.items():
        for target, names in imports_of(name, path, modules):
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    bad.append(f"{name}: from {target} import {imported}")
        for target, _ in imports_of(name, path, modules):  # `from pkg import _module`
            last = target.rpartition(".")[2]
            if last.startswith("_") and not last.startswith("__") and target != name \
                    and target.rpartition(".")[0] != name.rpartition(".")[0]:
                bad.append(f"{name}: imports private module {target}")
    return bad


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if top in LIBRARY and other in ("app", "bench"):
                bad.append(f"{module} -> {target}")
            if top == "bench" and other == "app":
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_library_never_imports_the_application_or_bench():
    assert layer_violations(import_graph()) == []


def test_no_private_name_crosses_modules():
    assert private_imports() == []


def test_the_graph_sees_function_level_imports(tmp_path):
    """The checks can fail: a cycle made only by an import inside a function is found, and
    so is a private import and a library module reaching into bench."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "cascade" / "a.py").write_text("from cascade.b import thing\n")
    (tmp_path / "cascade" / "b.py").write_text("def thing():\n    from cascade.a import _hidden\n"
                                               "    import bench.harness\n")
    (tmp_path / "bench" / "harness.py").write_text("")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["cascade.a", "cascade.b"]]
    assert private_imports(tmp_path) == ["cascade.b: from cascade.a import _hidden"]
    assert layer_violations(graph) == ["cascade.b -> bench.harness"]


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    print(f"modules: {len(graph)}, edges: {sum(len(v) for v in graph.values())}")
    print(f"cycles (strongly connected components > 1 module): {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print("layer violations:", len(layer_violations(graph)))
    for line in layer_violations(graph):
        print("  " + line)
    private = private_imports()
    print("private imports across modules:", len(private))
    for line in private:
        print("  " + line)
