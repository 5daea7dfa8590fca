"""The package is strictly typed (``py.typed`` ships): mypy --strict, as configured, passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_passes_on_the_package() -> None:
    # Incremental, as mypy runs by default: a fresh clone checks everything, a second run
    # rechecks what changed (its cache is .mypy_cache, ignored by git).
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_ships_py_typed() -> None:
    assert (ROOT / "streamsvc" / "py.typed").is_file()
