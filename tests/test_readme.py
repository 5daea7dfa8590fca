"""The README's commands and its embedded example are real: CI runs them, they run as shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# A fenced block, also when indented under a list item: (indent, language, body).
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
                   re.MULTILINE | re.DOTALL)


def blocks(lang: str) -> list[str]:
    return [
        textwrap.dedent(m["body"]) for m in FENCE.finditer(README) if m["lang"] == lang
    ]


def command_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_first_sh_block_starts_the_service() -> None:
    (command,) = command_lines(blocks("sh")[0])
    assert "streamsvc serve" in command


def test_readme_test_command_is_what_ci_runs_verbatim() -> None:
    (command,) = command_lines(blocks("sh")[1])
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines()


def test_readme_embedded_example_runs_and_prints_the_echo(tmp_path: Path) -> None:
    (example,) = [b for b in blocks("python") if "chat_stream" in b]
    script = tmp_path / "readme_example.py"
    script.write_text(example, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60,
        env=env, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Hello, reactive world" in result.stdout
    assert result.stdout.strip() == "Hello, reactive world"
