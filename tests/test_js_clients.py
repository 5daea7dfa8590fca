"""Third-party JavaScript clients, unchanged, against streamsvc over real sockets.

The packages are in ``tests/js/package.json`` (the README's test command
installs them with npm); Node.js is the machine's own.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from streamsvc.server.state import METRICS
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer
from tests.test_openai_endpoint import TORTURE

JS = Path(__file__).resolve().parent / "js"


async def _node(script: str, *args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "node", str(JS / script), *args, cwd=JS,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_vercel_ai_sdk_default_openai_provider_gets_the_exact_text(
    relay: RunningServer, simulator: SimulatorServer, tmp_path: Path,
) -> None:
    """AI SDK 5's ``createOpenAI({baseURL})(model)`` calls ``POST /v1/responses``."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TORTURE, encoding="utf-8")
    result = await _node("ai_sdk_stream_text.mjs", relay.url + "/v1", "echo", str(prompt))
    assert result["text"] == TORTURE
    assert result["finishReason"] == "stop"
    assert result["usage"]["outputTokens"] > 0
    metrics = relay.app[METRICS].render().decode()
    assert 'streamsvc_streams_started_total{kind="responses"} 1.0' in metrics
    assert simulator.stats.requests == 1
