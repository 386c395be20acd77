"""The package's layers: imports point down, never in a circle, and a few habits hold everywhere.

Read statically from the source (lazy imports inside functions count too), so that a circle
hidden behind a function-level import fails here rather than at a user's first call.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modellego"

# Rank of each top-level module or subpackage: a module may import only from a lower or its own rank.
LAYERS: dict[str, int] = {
    "_version": 0, "errors": 0, "memory": 0, "hooks": 0,
    "io": 1,
    "models": 2, "data": 2,
    "core": 3, "evaluation": 3,
    "calibration": 4, "training": 4,
    "cut": 5,
    "assembly": 6,
    "files": 7,
    "apps": 8,
    "demo": 9,
    "cli": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``, which never run (annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def _imports(path: Path) -> set[str]:
    """Every module of the package that `path` imports at run time, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "modellego" or target.startswith("modellego."):
                # `from pkg import x` reads module pkg.x when there is one, else a name of pkg
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in NAMES else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("modellego")}
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
NAMES = set(MODULES)
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_top_level_name_has_a_layer() -> None:
    tops = {_layer(m) for m in MODULES if m != "modellego"}
    assert tops == set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}; unknown: {sorted(set(LAYERS) - tops)}"


def test_nothing_inside_the_package_imports_its_root() -> None:
    # `import modellego`, or `from modellego import x` for an x that is no module of the package.
    offenders = {m: sorted(i for i in imps if i == "modellego" or i not in MODULES)
                 for m, imps in GRAPH.items() if m != "modellego"}
    assert not any(offenders.values()), {m: i for m, i in offenders.items() if i}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "modellego"))
def test_imports_point_down(module: str) -> None:
    rank = LAYERS[_layer(module)]
    up = sorted(i for i in GRAPH[module] if i in MODULES and i != "modellego" and LAYERS[_layer(i)] > rank)
    assert not up, f"{module} (layer {rank}) imports from higher layers: {up}"


def test_no_import_circle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if n not in MODULES or n == "modellego":
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m != "modellego" and m not in state:
            visit(m, [m])


def test_a_circle_would_be_found() -> None:
    GRAPH["modellego.io.info"].add("modellego.io.checkpoint")  # checkpoint imports info
    try:
        with pytest.raises(AssertionError, match="import circle"):
            test_no_import_circle()
    finally:
        GRAPH["modellego.io.info"].discard("modellego.io.checkpoint")


@pytest.mark.parametrize("pattern, home", [
    (r"\.train\(was_training\)|was_training\s*=", None),  # eval mode goes through hooks.eval_mode
    (r"register_forward(_pre)?_hook|register_full_backward_hook", "modellego.hooks"),  # hooks.forward_hooks
])
def test_habits_have_one_home(pattern: str, home: str | None) -> None:
    found = [f"{m}:{i + 1}" for m, p in MODULES.items() if m != home
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if re.search(pattern, line)]
    assert not found, f"{pattern!r} outside {home or 'the package'}: {found}"
