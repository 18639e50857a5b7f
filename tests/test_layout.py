"""The package layout holds: each package imports only the floors below it (its `__init__`
docstring says which), there is no import cycle, Ray is imported only by moegrok/pipeline, and no
test module imports another test module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moegrok"
TOP = {"config", "errors", "store"}
# what each package may import besides itself and the top-level modules
ALLOWED = {
    "data": set(),
    "evaluation": {"data"},
    "routing": {"data"},
    "metrics": {"data", "routing"},
    "analysis": {"data", "routing", "metrics"},
    "report": {"data", "routing", "metrics", "analysis"},
    "toy": {"data", "routing", "metrics", "analysis"},
    "pipeline": {"data", "routing", "metrics", "analysis", "report", "evaluation"},
    "study": {"data", "routing", "metrics", "analysis", "report", "evaluation", "pipeline", "toy"},
}
TOP_ALLOWED = {"errors": set(), "config": {"errors"}, "store": {"errors"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports in functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def floor(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "moegrok"))
def test_each_module_imports_only_the_floors_below_it(module):
    own = floor(module)
    allowed = TOP_ALLOWED[own] if own in TOP_ALLOWED else ALLOWED[own] | TOP | {own}
    outside = {m for m in GRAPH[module] if floor(m) not in allowed and m != "moegrok"}
    assert not outside, f"{module} imports {sorted(outside)}; its floor may import {sorted(allowed)}"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycle = [*path[path.index(imported):], imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_only_the_pipeline_imports_ray():
    users = sorted(name for name, path in MODULES.items() if any(m == "ray" or m.startswith("ray.")
                                                                  for m in imports(path)))
    assert all(name.startswith("moegrok.pipeline") for name in users), users


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_says_what_lives_there_and_what_it_may_import(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert len(docstring) > 80 and "Imports" in docstring, package


def test_no_test_module_imports_another():
    for path in (ROOT / "tests").rglob("test_*.py"):
        imported = {m for m in imports(path) if m.startswith("tests.")}
        tests = {m for m in imported if m.rsplit(".", 1)[-1].startswith("test_")
                 or any(part.startswith("test_") for part in m.split("."))}
        assert not tests, f"{path.relative_to(ROOT)} imports test modules {sorted(tests)}"
