"""The import structure: no import cycle anywhere in seqpar (imports inside functions
count), the kernels import nothing above them, and the planner's layering. Run as a
script to print the cycles, if any."""
import ast
from pathlib import Path

import seqpar

ROOT = Path(seqpar.__file__).parent


def _modules():
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _imports(mods):
    """module -> [(imported module, at module level?)]. `from pkg import name` imports the
    submodule pkg.name when there is one, else pkg; a dotted import also runs the packages
    above it (all but seqpar/__init__, which is always loaded first)."""
    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = {}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                src = ".".join(base + [node.module]) if node.module else ".".join(base)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("seqpar"):
                    continue
                target = resolve(target)
                while target and target != "seqpar":
                    if target != mod and not mod.startswith(target + "."):
                        found.append((target, id(node) in top))
                    target = target.rpartition(".")[0]
        edges[mod] = found
    return edges


def _cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _ in e}) for m, e in edges.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_seqpar():
    edges = _imports(_modules())
    assert "seqpar.planner.model" in edges and "seqpar.strategies.ring" in edges and "seqpar.kernels.block" in edges
    cycles = _cycles(edges)
    assert not cycles, cycles


def test_kernels_import_nothing_above_them():
    """Kernels never communicate and know no strategy: seqpar.kernels imports only itself."""
    for mod, found in _imports(_modules()).items():
        if mod.startswith("seqpar.kernels"):
            outside = [t for t, _ in found if not t.startswith("seqpar.kernels")]
            assert not outside, (mod, outside)


def test_the_planner_reaches_strategies_through_the_registry_only():
    edges = _imports(_modules())
    for mod, found in edges.items():
        if mod.startswith("seqpar.planner"):
            bad = [t for t, _ in found if t.startswith("seqpar.strategies") or t in ("seqpar.attention", "seqpar")]
            assert not bad, (mod, bad)
        if mod.startswith("seqpar.strategies"):
            # strategies price themselves in the planner's terms, imported when the planner asks
            eager = [t for t, top in found if top and t.startswith("seqpar.planner")]
            assert not eager, (mod, eager)


def test_the_planner_talks_through_seqpar_comm():
    for path in (ROOT / "planner").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith("torch.distributed")], (path.name, node.lineno)


if __name__ == "__main__":
    print(_cycles(_imports(_modules())) or "no import cycle in seqpar")
