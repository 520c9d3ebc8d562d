"""The modules of ``apd`` import each other without a circle, lazy imports inside functions included.

Every ``apd/**/*.py`` is parsed (not imported) and each ``import apd.x`` / ``from apd.x import y`` /
relative import names an edge to the apd module it loads (``from apd.pkg import name`` loads
``apd.pkg.name`` when that is a module, else ``apd.pkg``). Imports under ``if TYPE_CHECKING:`` are
left out: they never run. The parent packages Python executes on the way (``apd/__init__.py`` for
every ``apd.x``) are not edges: every module would then sit in one circle through ``apd``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "apd"

KNOWN_CYCLES: list[set[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def import_graph() -> dict[str, set[str]]:
    """{apd module: the apd modules it imports anywhere in its file, TYPE_CHECKING blocks aside}."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

    def resolve(name: str) -> str | None:  # the longest prefix of ``name`` that is an apd module
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name == "apd" or name.startswith("apd."):
                    target = resolve(name)
                    if target is not None and target != mod:
                        edges.add(target)
        graph[mod] = edges
    return graph


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each module of one
    reaches every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def circle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One closed path inside the component ``comp``, starting at its first module by name."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def test_the_graph_sees_module_level_function_level_and_relative_imports():
    graph = import_graph()
    assert "apd.checkpoint" in graph["apd.decomposition"]  # module level
    assert "apd.methods" in graph["apd.decomposition"]  # inside a function (Decomposition.attach)
    assert "apd.targets.base" in graph["apd.targets.tms"]
    assert all(m.startswith("apd") for edges in graph.values() for m in edges)
    # the finder itself: a hand-made circle is reported as a path, a chain is not
    hand_made = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert tangles(hand_made) == [{"a", "b", "c"}] and circle(hand_made, {"a", "b", "c"}) == ["a", "b", "a"]
    assert tangles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_apd_has_no_import_circle():
    graph = import_graph()
    unknown = [t for t in tangles(graph) if t not in KNOWN_CYCLES]
    assert not unknown, "import circles among apd modules (break each, e.g. by moving the shared part into a module "\
        "that imports neither): " + "; ".join(" -> ".join(circle(graph, t)) for t in unknown)  # fmt: skip


def test_the_known_cycles_are_still_there():
    """An entry of KNOWN_CYCLES that no longer exists must be deleted (so the list only shrinks)."""
    found = tangles(import_graph())
    stale = [sorted(k) for k in KNOWN_CYCLES if k not in found]
    assert not stale, f"these circles are gone: delete them from KNOWN_CYCLES in tests/test_imports.py: {stale}"
