"""No import cycles inside seqpar/kernels, counting imports inside functions too.

The graph is read with `ast` (nothing is imported): an edge for every `import` /
`from ... import` statement anywhere in a module, to the seqpar module it names (to the
submodule where `from pkg import name` names one). Run as a script to print every cycle
(strongly connected component) of the whole package: `python tests/test_import_cycles.py`.
"""
import ast
import os
import sys
from typing import Dict, List, Set

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seqpar")


def _modules(root: str = ROOT) -> Dict[str, str]:
    """Dotted name -> path of every module under `root` (a package's name is its __init__)."""
    base = os.path.dirname(root)
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    modules = _modules(root)
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import seqpar.a.b` -> seqpar.a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_kernels():
    graph = import_graph()
    kernels = {name: {t for t in targets if t.startswith("seqpar.kernels")}
               for name, targets in graph.items() if name.startswith("seqpar.kernels")}
    assert cycles(kernels) == []


def test_kernels_import_nothing_above_them():
    """Kernels never communicate and know no strategy: seqpar.kernels imports only itself."""
    graph = import_graph()
    outside = {(name, t) for name, targets in graph.items() if name.startswith("seqpar.kernels")
               for t in targets if t.startswith("seqpar") and not t.startswith("seqpar.kernels")}
    assert outside == set()


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    kernels = {name: {t for t in targets if t.startswith("seqpar.kernels")}
               for name, targets in graph.items() if name.startswith("seqpar.kernels")}
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges")
    print(f"cycles in seqpar: {len(found)}")
    for component in found:
        print("  {" + ", ".join(component) + "}")
    print(f"cycles in seqpar.kernels: {cycles(kernels)}")
