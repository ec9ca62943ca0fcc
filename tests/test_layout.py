"""The layout: the learner's core at the root, support/ below it, tools/ above, one way only.

Run alone: python -m pytest tests/test_layout.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

SCRIPTS = {"train_model", "generate_text", "app"}  # the commands at the root
# The core's definitions: what a learner reads to follow a step, below the scripts.
DEFINITIONS = {
    "hyperparameters",
    "tokenization",
    "data_handling",
    "model_architecture",
    "optimization",
}
# The support modules that stand alone: they import nothing of the project.
LEAVES = {
    "support.common",
    "support.validation",
    "support.older_checkpoints",
    "support.fast_bpe",
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)


def project_modules() -> dict[str, Path]:
    paths = [*PROJECT_ROOT.glob("*.py"), *PROJECT_ROOT.glob("support/*.py")]
    paths += PROJECT_ROOT.glob("tools/*.py")
    return {module_name(path): path for path in paths if path.name != "__init__.py"}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (from x import y counts x, or x.y if y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


MODULES = project_modules()
IMPORTS = {name: imports_of(path, set(MODULES)) for name, path in MODULES.items()}


def test_the_root_is_the_table_of_contents():
    root = sorted(path.name for path in PROJECT_ROOT.glob("*.py"))
    assert len(root) <= 10, root
    assert {f"{name}.py" for name in SCRIPTS | DEFINITIONS} <= set(root)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("support.")))
def test_support_never_imports_the_scripts_or_the_tools(name):
    upward = {m for m in IMPORTS[name] if m in SCRIPTS or m.startswith("tools.")}
    assert not upward, f"{name} imports {upward}"


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_the_core_definitions_lean_only_on_each_other_and_on_leaves(name):
    allowed = DEFINITIONS | LEAVES
    assert IMPORTS[name] <= allowed, f"{name} imports {IMPORTS[name] - allowed}"


def test_the_model_file_is_the_math_alone():
    assert IMPORTS["model_architecture"] == {"hyperparameters"}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_a_leaf_imports_nothing_of_the_project(name):
    assert IMPORTS[name] == set()


def test_only_tools_import_tools():
    importers = {
        name for name, found in IMPORTS.items() if any(m.startswith("tools.") for m in found)
    }
    assert all(name.startswith("tools.") for name in importers), importers


def test_nothing_imports_a_script_but_the_tools():
    # tools/bench.py times train_model.train_step itself; nothing else reaches up to a script.
    for name, found in IMPORTS.items():
        if not name.startswith("tools."):
            assert not found & SCRIPTS, f"{name} imports {found & SCRIPTS}"
