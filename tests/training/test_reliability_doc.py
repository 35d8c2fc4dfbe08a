"""docs/reliability.md cites tests by ``file::name``: every one of them exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"


def _cited() -> list[tuple[str, str]]:
    """``(file, test)`` pairs, with ``::name`` shorthands resolved to the last file named."""
    pairs, current = [], None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::|\.\.\.)?(test_\w+)?", DOC.read_text()):
        file, name = match.groups()
        current = file or current
        if name and current:
            pairs.append((current, name))
    return pairs


def test_every_cited_test_exists():
    cited = _cited()
    assert len(cited) > 30
    missing = []
    for file, name in cited:
        tree = ast.parse((ROOT / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if name not in names:
            missing.append(f"{file}::{name}")
    assert not missing, missing
