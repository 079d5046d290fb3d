"""The one direction of dependence (DESIGN §6), read from the source's import statements (AST, no
imports run): the shared core (specpipe/, its offline tools included) imports no process package
(coordinator/, draft_worker/, target_worker/, launch/); nothing on the serving path imports the
offline tools (specpipe/tools/), except lazily where a command runs them; and the modules import
each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's package-dir: import name -> folder.
PACKAGE_DIRS = {
    "specpipe": "specpipe",
    "specpipe.coordinator": "coordinator",
    "specpipe.draft_worker": "draft_worker",
    "specpipe.target_worker": "target_worker",
    "specpipe.launch": "launch",
    "specpipe.proto": "proto",
}
PROCESS_PACKAGES = ("specpipe.coordinator", "specpipe.draft_worker", "specpipe.target_worker", "specpipe.launch")
TOOLS = "specpipe.tools"
# The measuring tool (`specpipe bench`) may use the offline tools, but only inside functions: the
# CLI imports it for its flags, also when it serves.
MEASURING = "specpipe.launch.bench"
# Where a runtime module may reach the tools, inside these functions only: the commands that run
# them, and the first-use build of the demo pair.
LAZY_TOOL_USES = {
    ("specpipe.demo_pair", "demo_pair_dir"),
    ("specpipe.launch.cli", "cmd_build_demo"),
    ("specpipe.launch.cli", "cmd_train_predictor"),
    ("specpipe.launch.cli", "cmd_calibrate_draft"),
}
# Cycles known and being removed: none (the schedules' rewrite removed scheduler <-> pipeline).
KNOWN_CYCLES: list[list[str]] = []


def _modules() -> dict[str, Path]:
    """Every module of the installed namespace, by import name (the generated protobuf code and
    the assets aside)."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        if package == "specpipe.proto":
            continue
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[0] != "assets":
                modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported specpipe module, enclosing function or None at module level) for each import."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, function))
            visit(child, inner)

    visit(ast.parse(path.read_text()), None)
    return [(target, function) for target, function in found if target.startswith("specpipe")]


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_sees_the_packages():
    for module in (
        "specpipe.config",
        "specpipe.tools.build_demo",
        "specpipe.coordinator.servicer",
        "specpipe.draft_worker.engine",
        "specpipe.target_worker.verify",
        "specpipe.launch.cli",
        "specpipe.launch.bench.run",
    ):
        assert module in MODULES, module
    # The rules below can fail: the walk sees a lazy import inside a function, by its function.
    assert ("specpipe.tools.build_demo", "cmd_build_demo") in IMPORTS["specpipe.launch.cli"]
    assert ("specpipe.config", None) in IMPORTS["specpipe.launch.cli"]


@pytest.mark.parametrize(
    "name", [name for name in MODULES if not any(_inside(name, package) for package in PROCESS_PACKAGES)]
)
def test_the_shared_core_imports_no_process_package(name):
    wrong = [target for target, _ in IMPORTS[name] if any(_inside(target, package) for package in PROCESS_PACKAGES)]
    assert not wrong, f"{name} (shared core) imports {wrong}"


@pytest.mark.parametrize("name", [name for name in MODULES if not _inside(name, TOOLS)])
def test_nothing_at_run_time_imports_the_offline_tools(name):
    for target, function in IMPORTS[name]:
        if not _inside(target, TOOLS):
            continue
        if _inside(name, MEASURING):
            assert function is not None, f"{name} imports {target} at module level: the CLI imports it to serve"
        else:
            assert (name, function) in LAZY_TOOL_USES, f"{name} imports {target} (in {function or 'the module'})"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def test_no_import_cycle():
    """Imports inside functions count too: a lazy import that closes a loop is still a cycle."""
    edges = {
        name: {target for target, _ in imports if target in MODULES and target != name}
        for name, imports in IMPORTS.items()
    }
    cycles = _cycles(edges)
    assert [cycle for cycle in cycles if cycle not in KNOWN_CYCLES] == [], cycles
