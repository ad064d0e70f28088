"""The code base stays ruff clean and ruff formatted (rules and line length in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "t2i_dist", "tests", "tools"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_formatted():
    # ruff format at the configured line length (pyproject [tool.ruff]); E501 above covers what it cannot wrap
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "t2i_dist", "tests", "tools"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, "run `ruff format t2i_dist tests tools`:\n" + proc.stdout + proc.stderr
