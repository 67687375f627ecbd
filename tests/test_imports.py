"""The package's import graph has no cycle, counting imports inside functions (and the package
``__init__`` a submodule import runs first)."""

from __future__ import annotations

import ast
import os

import orw_diffusers

PACKAGE_DIR = os.path.dirname(orw_diffusers.__file__)


def _modules() -> dict[str, str]:
    """module name -> file, for every .py file of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
            found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (``if TYPE_CHECKING:`` blocks excepted)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    skipped = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages that
            # contain the importer: they are already being imported when it runs
            parts = name.split(".")
            for i in range(2, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                    targets.add(prefix)
    return targets


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, path, modules) for m, path in modules.items()}
    assert len(graph) > 20 and graph["orw_diffusers.trainer"], "the walk found the package's imports"
    cycle = _find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_walk_sees_imports_inside_functions():
    """The cycle finder is not vacuous: a lazy import back into the importer is a cycle."""
    graph = {"a": {"b"}, "b": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "a"]
    modules = _modules()
    config_imports = _imports("orw_diffusers.config", modules["orw_diffusers.config"], modules)
    assert "orw_diffusers.prompts" in config_imports  # imported inside validate()
