"""The Python examples in docs/operators.md run as shown and print what the doc says."""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_readme import FENCE

ROOT = Path(__file__).resolve().parent.parent
OPERATORS_MD = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")


def _examples() -> list[tuple[str, str]]:
    """(python block, the plain block right after it: its printed output)."""
    found = list(FENCE.finditer(OPERATORS_MD))
    pairs = []
    for block, after in itertools.pairwise(found):
        if block["lang"] == "python" and after["lang"] == "":
            pairs.append((textwrap.dedent(block["body"]), textwrap.dedent(after["body"])))
    return pairs


def _run(example: str, tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_operators_md_has_its_three_examples() -> None:
    assert len(_examples()) == 3


def test_composing_example_prints_the_whole_text_in_merged_pieces(tmp_path: Path) -> None:
    example, _ = _examples()[0]
    pieces = [ast.literal_eval(line) for line in _run(example, tmp_path).splitlines()]
    assert "".join(pieces) == "One two three four five six seven eight nine ten"
    assert 1 < len(pieces) < 10  # merged by throttle, not one per token


@pytest.mark.parametrize("index", [1, 2], ids=["idle-timeout", "virtual-time"])
def test_example_prints_what_the_doc_shows(index: int, tmp_path: Path) -> None:
    example, shown = _examples()[index]
    assert _run(example, tmp_path).split() == shown.split()
