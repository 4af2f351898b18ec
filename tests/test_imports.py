"""The import graph of crossray/, rayenv/, jobs/ and serve/, read with `ast` (imports inside functions
included): no cycle between modules, no import from a lower layer to a higher one (the library, then
the Ray environment, then the jobs and the Serve app), and jobs/ and serve/ not importing each other
both ways."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crossray", "rayenv", "jobs", "serve")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (`from a import b` counts a.b
    when b is a module, else a)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for t in targets if (m := owner(t)) and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycle_and_no_import_from_below():
    graph = import_graph()
    assert len(graph) >= 50 and "crossray.pipeline.runner" in graph
    assert cycles(graph) == []
    layer = {"crossray": 0, "rayenv": 1, "jobs": 2, "serve": 2}
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if layer[b.split(".")[0]] > layer[a.split(".")[0]])
    assert upward == []
    between = {(a.split(".")[0], b.split(".")[0]) for a, deps in graph.items() for b in deps}
    assert not {("jobs", "serve"), ("serve", "jobs")} <= between  # one way at most
    # the check sees cycles, lazy imports included
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
