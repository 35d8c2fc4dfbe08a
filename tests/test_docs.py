"""The documentation generated from code stays in sync with it."""

import re
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


def test_gpu_checks_name_existing_test_files():
    """Regression: the GPU script named tests/test_optimizer.py and tests/test_train.py after
    the tests moved under tests/optim and tests/training, so pytest ran none of them there."""
    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    named = set(re.findall(r"tests/[\w/]+\.py", script))
    assert named, "the script names no test files"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []
    # every test file that has CUDA cases is run
    with_cuda = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"def test_\w*cuda", p.read_text(), re.IGNORECASE)
    }
    assert with_cuda <= named
