"""The layers, one way only (README "Layout"): protocol/ at the ground imports nothing
else of ours; hal/ imports protocol/; daemon/ imports both; headend/ imports protocol/
alone; and no two modules import each other in a circle. Read from the source with ast,
so an import inside a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("protocol", "hal", "daemon", "headend")
# what each layer may import of ours, besides itself
ALLOWED = {
    "protocol": set(),
    "hal": {"protocol"},
    "daemon": {"protocol", "hal"},
    "headend": {"protocol"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for layer in LAYERS
            for path in sorted((ROOT / layer).rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The modules of ours a ``from ... import ...`` names: each name that is a module
    of ours (``from daemon.journal import schema`` is daemon.journal.schema), and the
    module it is from when it names anything else (a class, a function)."""
    if node.level:
        package = module.split(".")
        if path.name != "__init__.py":
            package.pop()
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module]
                                                                    if node.module else []))
    else:
        base = node.module or ""
    named = [f"{base}.{alias.name}" for alias in node.names]
    modules = [name for name in named if name in MODULES]
    return modules if len(modules) == len(named) else [base, *modules]


def imports_of(module: str) -> set[str]:
    """The modules of ours that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path, node))
    return {name for name in found if name.split(".")[0] in LAYERS}


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` is, or is inside of (a class, a function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {module: {m for name in imports_of(module) if (m := _ours(name)) and m != module}
         for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_the_layers_below_it(module: str) -> None:
    layer = module.split(".")[0]
    wrong = sorted(name for name in imports_of(module)
                   if name.split(".")[0] not in ALLOWED[layer] | {layer})
    assert not wrong, f"{module} ({layer}/) imports {wrong}: see README 'Layout'"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as a cycle to show."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_two_modules_import_each_other_in_a_circle() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_what_they_should() -> None:
    """The checks themselves: a layer breach and a circle are found where made up."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert "protocol.errors" in imports_of("protocol.tgp1.apdu")
    assert {"protocol", "hal"} <= {name.split(".")[0] for name in imports_of("daemon.tap")}
    # relative imports resolve: "from . import x" inside a package counts as that package
    node = ast.parse("from .. import errors").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("protocol.tgp1.apdu", MODULES["protocol.tgp1.apdu"], node) == [
        "protocol.errors"]
    node = ast.parse("from protocol.entry import Entry").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("daemon.tap", MODULES["daemon.tap"], node) == ["protocol.entry"]
