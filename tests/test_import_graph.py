"""The import graph of src/xmoe has no cycle.

Each module's imports are read with ``ast`` (nothing is imported), in two sets: those at the top
level of the module (including under ``if``/``try``, excluding ``if TYPE_CHECKING:``), and those
inside functions. Module-level imports must form no cycle (Python would fail on one at import
time, depending on which module is imported first). Imports inside functions are deferred so
that a command loads only what it uses; they must form no cycle with the rest either, since a
circle of modules that call into each other is one module in several files. A cycle is reported
as the modules that form it, in order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import xmoe

SRC = Path(xmoe.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute module name ``from ... import`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, here: str, is_package: bool, modules: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, function-level) xmoe modules imported by one module's syntax tree."""
    top, deferred = set(), set()

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {alias.name for alias in node.names}
        base = _resolve(node, here, is_package)
        # `from xmoe.a import b` imports xmoe.a.b when b is a module, and xmoe.a in any case.
        return {base} | {f"{base}.{alias.name}" for alias in node.names}

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if in_function else top).update(t for t in targets(child) if t in modules)
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(tree, False)
    return top - {here}, deferred - {here}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: modules it imports at module level}, {module: modules imported in functions})."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(paths)
    top, deferred = {}, {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top[name], deferred[name] = _imports(tree, name, path.name == "__init__.py", modules)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    for name in modules:
        parent = name.rpartition(".")[0]
        if parent in modules:
            top[name].add(parent)
    return top, deferred


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm),
    given as a path that returns to its start. A package importing its own submodule while the
    submodule imports the package's __init__ is Python's normal layout and is not counted."""
    graph = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component (breadth first)."""
    start = min(component)
    parents, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [start] + path[::-1][1:] + [start] if path[-1] == start else path[::-1] + [start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle found in the component {sorted(component)}")


def test_find_cycles_finds_a_planted_cycle_and_nothing_in_a_tree() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": set(), "p.x": {"p"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"p"}}) == []


def test_imports_are_read_at_the_right_level(tmp_path) -> None:
    source = ("import xmoe.a\nfrom . import b\nif TYPE_CHECKING:\n    import xmoe.c\n"
              "def f():\n    from xmoe.d import e\n")
    modules = {"xmoe.a", "xmoe.b", "xmoe.c", "xmoe.d", "xmoe.d.e", "xmoe.z"}
    top, deferred = _imports(ast.parse(source), "xmoe.z", False, modules)
    assert (top, deferred) == ({"xmoe.a", "xmoe.b"}, {"xmoe.d", "xmoe.d.e"})


def _report(cycles: list[list[str]], which: str) -> str:
    return f"import cycles ({which}):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_cycle_among_module_level_imports() -> None:
    top, _ = import_graph()
    assert len(top) > 50  # the whole package was read
    assert find_cycles(top) == [], _report(find_cycles(top), "module-level imports")


def test_no_cycle_with_imports_inside_functions() -> None:
    top, deferred = import_graph()
    graph = {name: top[name] | deferred[name] for name in top}
    assert find_cycles(graph) == [], _report(find_cycles(graph), "module-level and function-level imports")
