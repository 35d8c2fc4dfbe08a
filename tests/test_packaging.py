"""Package layout: the library never imports the training front end; old module paths still work."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kfac_tn"
MOVED = ("cli", "config", "train", "data", "models", "checkpoint", "plots")
"""Front-end modules that moved into ``kfac_tn.training`` (the old paths are aliases)."""


def _library_files() -> list[Path]:
    """Every library module: all of kfac_tn except training/, benchmarks/, the aliases, __main__."""
    skip = {f"{m}.py" for m in MOVED} | {"__main__.py"}
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] not in ("training", "benchmarks")
        and not (p.parent == PACKAGE and p.name in skip)
    ]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_library_never_imports_the_front_end():
    front_end = ("kfac_tn.training", *(f"kfac_tn.{m}" for m in MOVED))
    files = _library_files()
    assert any(p.name == "optimizer.py" for p in files) and any("tn" in p.parts for p in files)
    for path in files:
        bad = sorted(
            name
            for name in _imported_modules(path)
            if any(name == f or name.startswith(f + ".") for f in front_end)
        )
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports the front end: {bad}"


@pytest.mark.parametrize("name", MOVED)
def test_old_module_paths_alias_the_new_ones(name, monkeypatch):
    new = importlib.import_module(f"kfac_tn.training.{name}")
    monkeypatch.delitem(sys.modules, f"kfac_tn.{name}", raising=False)
    with pytest.warns(DeprecationWarning, match=f"kfac_tn.training.{name}"):
        old = importlib.import_module(f"kfac_tn.{name}")
    assert old is new
