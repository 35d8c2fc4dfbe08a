"""Package layout: the library needs none of the front end's packages and never imports the front
end; the front end's old module paths still work."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kfac_tn"
MOVED = ("cli", "config", "train", "data", "models", "checkpoint", "plots")
"""Front-end modules that moved into ``kfac_tn.training`` (the old paths are aliases)."""


FRONT_END_PACKAGES = ("yaml", "tqdm", "matplotlib", "sklearn", "torchvision")
"""Imports of the ``train`` extra (PyYAML, tqdm, matplotlib, scikit-learn, torchvision)."""

_NEW_MODULES = f"""
import json, sys
front_end = {FRONT_END_PACKAGES!r}
import torch, opt_einsum, einops  # the library's dependencies (torch.hub loads tqdm if present)
deps = set(sys.modules)
import kfac_tn
from kfac_tn import KFAC
new = sorted(m for m in set(sys.modules) - deps if m.split(".")[0] in front_end)
print(json.dumps(new))
"""

_WITHOUT_EXTRAS = f"""
import sys

for name in {FRONT_END_PACKAGES!r}:  # as if not installed: import fails, find_spec gives None
    sys.modules[name] = None
import torch
from kfac_tn import KFAC

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
optimizer = KFAC(model, inverse_update_period=1)
x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
for _ in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
print("ok")
"""


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_loads_no_front_end_package():
    """`import kfac_tn` / `from kfac_tn import KFAC` (fresh process) import none of the extra."""
    assert json.loads(_python(_NEW_MODULES)) == []


def test_library_works_without_the_train_extra():
    """With PyYAML, tqdm, matplotlib, scikit-learn and torchvision absent, KFAC trains."""
    assert _python(_WITHOUT_EXTRAS).strip().endswith("ok")


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
