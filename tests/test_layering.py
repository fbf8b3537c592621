"""How the package is put together: imports go one way, and user errors are one type.

Read from the source with `ast`, nothing imported, so an import inside a function counts as much
as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = "resnet_jax"
# The command lines: the only modules that may import cli, and only when run as a program.
COMMAND_LINES = {
    f"{PACKAGE}.{name}" for name in ("train", "evaluate", "predict", "convert", "export")
}
CLI = f"{PACKAGE}.cli"


def module_name(path: Path) -> str:
    """resnet_jax/cpu/kernels.py -> resnet_jax.cpu.kernels; a package's __init__.py -> its name."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TREES = {
    module_name(path): ast.parse(path.read_text(), str(path))
    for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py"))
}


def imported_modules(node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules an import statement loads: `from resnet_jax.x import y` loads
    resnet_jax.x.y where that is one of `modules`, else resnet_jax.x."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
    if not isinstance(node, ast.ImportFrom):
        return set()
    assert node.level == 0, "a relative import: write it absolute, as the package does"
    if node.module is None or node.module.split(".")[0] != PACKAGE:
        return set()
    names = {f"{node.module}.{alias.name}" for alias in node.names}
    return {name if name in modules else node.module for name in names}


def is_main_block(node: ast.stmt) -> bool:
    """Whether `node` is `if __name__ == "__main__":`."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def imports(tree: ast.Module, modules: set[str]) -> dict[str, bool]:
    """Every module of the package that `tree` imports, at any level, and whether only in its
    `if __name__ == "__main__":` block."""
    in_main_block = {
        id(node) for block in tree.body if is_main_block(block) for node in ast.walk(block)
    }
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        for module in imported_modules(node, modules):
            found[module] = found.get(module, True) and id(node) in in_main_block
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as its modules in import order, the first repeated at the end; or None."""
    finished: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in finished:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target):
                return cycle
        path.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


IMPORTS = {module: imports(tree, set(TREES)) for module, tree in TREES.items()}
GRAPH = {module: set(targets) - {module} for module, targets in IMPORTS.items()}


def test_the_imports_inside_the_package_have_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_library_module_imports_the_command_line():
    library = {module for module in GRAPH if module not in COMMAND_LINES | {CLI}}
    assert sorted(m for m in library if CLI in IMPORTS[m]) == []
    # A command line is a library too (predict uses evaluate's loading): cli only when run.
    assert sorted(m for m in COMMAND_LINES if not IMPORTS[m].get(CLI, True)) == []


def test_the_graph_sees_imports_inside_functions_and_finds_a_cycle():
    source = (
        "def load():\n    from resnet_jax import tfds_data\n    import resnet_jax.cpu.kernels\n"
        'if __name__ == "__main__":\n    from resnet_jax import cli\n'
    )
    found = imports(ast.parse(source), {"resnet_jax.tfds_data", "resnet_jax.cpu.kernels", CLI})
    assert found == {"resnet_jax.tfds_data": False, "resnet_jax.cpu.kernels": False, CLI: True}
    with_cycle = {"a": {"b"}, "b": {"c"}, "c": {"b"}}
    assert find_cycle(with_cycle) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_user_error_is_a_user_error_not_a_bare_value_error():
    # cli.run_cli explains errors.UserError and nothing else: a new error class that extends
    # ValueError directly would end in a traceback.
    direct = [
        f"{module}.{node.name}"
        for module, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(isinstance(base, ast.Name) and base.id == "ValueError" for base in node.bases)
    ]
    assert direct == [f"{PACKAGE}.errors.UserError"]
