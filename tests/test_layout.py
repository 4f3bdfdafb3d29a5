"""The code's shape: imports point down the layers below, and each shared piece (the errors, wrapper-prefix stripping,
the configs folder) is defined once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Lower layers first. A module may import project modules of lower layers and of its own package only.
LAYERS = [
    {"errors", "logger"},
    {"utils"},
    {"config"},
    {"checkpoint"},
    {"models", "data"},
    {"optimizer", "lr_scheduler", "distillation"},
    {"engine"},
    {"main", "predict", "hubconf", "benchmarks", "export"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", ".venv"))


def top_name(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def imported_project_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYER_OF)


def test_every_project_module_has_a_layer():
    assert {top_name(p) for p in project_files()} <= set(LAYER_OF)


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    own = top_name(path)
    upward = {name for name in imported_project_modules(path) if name != own and LAYER_OF[name] >= LAYER_OF[own]}
    assert not upward, f"{path.relative_to(ROOT)} (layer {LAYER_OF[own]}) imports {sorted(upward)}"


def definitions(kind: type, predicate) -> list[str]:
    found = []
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) and predicate(node):
                found.append(str(path.relative_to(ROOT)))
    return found


def test_user_errors_are_defined_once_in_errors_py():
    def is_exception(node: ast.ClassDef) -> bool:
        return any(getattr(base, "id", "").endswith(("Error", "Exception")) for base in node.bases)

    assert set(definitions(ast.ClassDef, is_exception)) == {"errors.py"}


@pytest.mark.parametrize(
    "literal,home",
    [("module.", "utils.py"), ("_orig_mod.", "utils.py"), ("configs", "config.py")],
)
def test_shared_constants_live_in_one_module(literal, home):
    def is_literal(node: ast.Constant) -> bool:
        return node.value == literal

    assert set(definitions(ast.Constant, is_literal)) == {home}
