"""The package's import graph has no circle, counting every import a module can execute: its top-level
ones and those inside functions (a function-level import that points back up the graph only hides a
circle). `if TYPE_CHECKING:` blocks never run and are not counted."""

import ast
from pathlib import Path

import forgetless

PACKAGE = Path(forgetless.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ("forgetless",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _executed(tree: ast.AST):
    """The nodes of `tree`, skipping `if TYPE_CHECKING:` bodies (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_executed(child)])
            continue
        yield node
        yield from _executed(node)


def imports_of(path: Path, modules: set[str], this: str | None = None) -> set[str]:
    """The package modules `path` imports (`from forgetless import data` names the module forgetless.data),
    with the packages above each (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    this = this or module_name(path)
    found = set()
    for node in _executed(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {name for name in found if name in modules and name != this and not this.startswith(name + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_function_level_relative_and_package_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport p.top\nif TYPE_CHECKING:\n    import p.hidden\n"
                      "if not TYPE_CHECKING:\n    import p.shown\ndef f():\n    from .sub import leaf\n"
                      "    from p import lazy\n")
    modules = {"p", "p.top", "p.hidden", "p.shown", "p.sub", "p.sub.leaf", "p.lazy", "p.m"}
    # relative: `.sub` from p.m is p.sub; a package's __init__ runs before its module: p is an edge too
    assert imports_of(source, modules, this="p.m") == {"p.top", "p.shown", "p.sub", "p.sub.leaf", "p.lazy"}
    # the real graph: function-level imports are edges (a loop hidden inside a function is still a loop)
    real = import_graph()
    assert "forgetless.data" in real["forgetless.identity"]
    assert "forgetless.regularizers.base" in real["forgetless.regularizers"]


def test_the_package_import_graph_has_no_circle():
    assert circles(import_graph()) == []


def test_leaves_import_nothing_of_the_package_above_them():
    """The small modules everything builds on stay leaves."""
    graph = import_graph()
    # environment: stdlib only, so a leaf may wrap a third-party import in it and stay a leaf
    allowed = {"forgetless.errors", "forgetless.environment"}
    for leaf in ["forgetless.errors", "forgetless.environment", "forgetless.schema", "forgetless.losses",
                 "forgetless.stats", "forgetless.registry", "forgetless.sections"]:
        assert graph[leaf] <= allowed | {"forgetless.schema"}, (leaf, graph[leaf])
