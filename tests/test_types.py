"""The package type-checks under mypy (settings in pyproject.toml's [tool.mypy]).

mypy keeps its incremental cache in .mypy_cache at the repository root: the first run analyses torch,
diffusers and the other typed dependencies (a minute or two), later runs only what changed (seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy", "t2i_dist"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"
