"""The package's layout (docs/design.md, "Code layout"): each subpackage imports only those below it, no module
imports another subpackage's private names, no modules of one subpackage import each other in a loop (imports for
type hints aside), no module is over 400 lines unless docs/design.md says why, the README's map lists every module
there is, and the tests have a folder per subpackage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import REPO

# Lowest first: a subpackage may import those before it, never one after it; slm's top-level modules (the `slm`
# command, slm/train.py, slm.open) may import any.
LAYERS = ["core", "cluster", "data", "hub", "training", "analysis"]
PACKAGE = REPO / "slm"
MODULES = sorted(PACKAGE.rglob("*.py"))


def subpackage(module: Path) -> str | None:
    """The subpackage a module of slm/ is in (None: a top-level module)."""
    parts = module.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imports(module: Path) -> list[tuple[str, list[str]]]:
    """Every `slm` import of a module, at the top or inside a function: (module imported, names taken from it)."""
    found = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slm":
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "slm"]
    return found


def imported_subpackages(target: str, names: list[str]) -> set[str]:
    """The subpackages an import reaches: `slm.data.shards`, or `from slm import data`."""
    parts = target.split(".")
    return {parts[1]} & set(LAYERS) if len(parts) > 1 else set(names) & set(LAYERS)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(REPO)))
def test_no_subpackage_imports_one_above_it(module):
    own = subpackage(module)
    if own is None:
        return
    above = [(target, names) for target, names in imports(module)
             if any(LAYERS.index(other) > LAYERS.index(own) for other in imported_subpackages(target, names))]
    assert not above, f"slm.{own} sits below what {module.relative_to(REPO)} imports: {above}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: str(m.relative_to(REPO)))
def test_no_private_name_crosses_a_subpackage(module):
    crossing = [(target, name) for target, names in imports(module) for name in names
                if name.startswith("_") and target.split(".")[1:2] != [subpackage(module)]]
    assert not crossing, f"{module.relative_to(REPO)} imports private names of another subpackage: {crossing}"


def test_every_subpackage_is_a_layer_and_every_test_folder_a_subpackage():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS)
    test_folders = {p.parent.name for p in (REPO / "tests").glob("*/test_*.py")}
    assert test_folders == set(LAYERS), test_folders


def test_the_readme_map_lists_every_module():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Where things are", 1)[1].split("```", 2)[1]
    listed = re.findall(r"^(slm/\S+)", block, re.M)
    modules = [str(m.relative_to(REPO)) for m in MODULES if m.name != "__init__.py"]
    packages = [f"slm/{name}/" for name in LAYERS]
    assert sorted(listed) == sorted(modules + packages), (
        f"missing from README's map: {sorted(set(modules + packages) - set(listed))}; "
        f"listed but not there: {sorted(set(listed) - set(modules + packages))}")


def runtime_imports(module: Path, package: Path) -> set[str]:
    """The modules of `package` (dotted, from its parent) that a module imports when it runs, at the top or inside a
    function: what `if TYPE_CHECKING:` imports for type hints aside."""
    tree = ast.parse(module.read_text())
    hints = {id(sub) for node in ast.walk(tree)
             if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package.name}
    return found


def import_loops(package: Path) -> list[list[str]]:
    """Every loop of imports between modules of one subpackage of `package` (each once, from its first module)."""
    names = {".".join((package.name, *m.relative_to(package).with_suffix("").parts)): m for m in package.rglob("*.py")}
    graph = {name: {t for t in runtime_imports(path, package) if t in names and t != name and
                    t.split(".")[1] == name.split(".")[1] and len(t.split(".")) > 2}
             for name, path in names.items() if len(name.split(".")) > 2}
    loops, seen = [], set()

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start and frozenset(path) not in seen:
                seen.add(frozenset(path))
                loops.append([*path, start])
            elif nxt not in path and nxt > start:
                walk(start, [*path, nxt])

    for name in sorted(graph):
        walk(name, [name])
    return loops


def test_no_modules_of_a_subpackage_import_each_other_in_a_loop():
    assert import_loops(PACKAGE) == []


def test_the_loop_check_finds_a_planted_loop(tmp_path):
    """Two modules of one subpackage importing each other (one of them inside a function) are a loop; an import for
    type hints only is not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py"):
        (package / name).write_text("")
    (package / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from pkg.sub import a\n")
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.a "
                                          "import thing\n")
    (package / "sub" / "d.py").write_text("from pkg.sub.c import x\n")
    assert import_loops(package) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]]


MAX_LINES = 400


def long_modules(package: Path, design: str) -> list[str]:
    """The modules of `package` over MAX_LINES lines that `design` (docs/design.md) does not name in its sentence
    "Modules over 400 lines: ..." with why each must stay one."""
    named = re.search(r"Modules over 400 lines: (.*?)(?:\n\n|$)", design, re.S)
    allowed = set(re.findall(r"`([^`]+\.py)`", named.group(1))) if named else set()
    return [f"{m.relative_to(package.parent)} ({len(m.read_text().splitlines())} lines)"
            for m in sorted(package.rglob("*.py"))
            if len(m.read_text().splitlines()) > MAX_LINES and str(m.relative_to(package.parent)) not in allowed]


def test_no_module_is_over_400_lines_unless_the_design_says_why():
    assert long_modules(PACKAGE, (REPO / "docs" / "design.md").read_text()) == [], (
        "split it by concern, or name it in docs/design.md's \"Modules over 400 lines\" with why it must be one")


def test_the_length_check_finds_a_planted_long_module(tmp_path):
    """A 500-line module is found, until the design names it."""
    package = tmp_path / "slm"
    (package / "core").mkdir(parents=True)
    (package / "core" / "short.py").write_text("x = 1\n" * 400)
    (package / "core" / "long.py").write_text("x = 1\n" * 500)
    assert long_modules(package, "Modules over 400 lines: none.") == ["slm/core/long.py (500 lines)"]
    assert long_modules(package, "Modules over 400 lines: `slm/core/long.py`, because it must.") == []
