"""The documentation generated from code stays in sync with it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    doc = (ROOT / "docs" / "config_reference.md").read_text()
    table = subprocess.run(
        [sys.executable, "-m", "kfac_tn", "reference"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert table.strip() in doc, "regenerate docs/config_reference.md with `kfac-tn reference`"


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "bash scripts/bootstrap.sh && .venv/bin/python -m pytest -q"
    assert test_command in readme
    assert test_command in ci
    assert "bash scripts/bootstrap.sh && .venv/bin/kfac-tn train" in readme
