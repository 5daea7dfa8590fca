"""Logs: one JSON object per line on request, 499 for a client that hung up, no prompt."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from streamsvc.upstream.simulator import SimulatorServer
from tests.conftest import RunningServer, wait_until
from tests.test_slow_consumer import _free_port


def test_json_log_format_has_one_object_per_line_with_the_request_id() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env["STREAMSVC__LOG__FORMAT"] = "json"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/stream?model=echo&q=secret%20prompt"
        deadline = time.monotonic() + 20
        while True:
            try:
                import urllib.request
                request = urllib.request.Request(url, headers={"X-Request-ID": "req-json-1"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "streamsvc serve did not start"
                time.sleep(0.1)
        assert "event: done" in body
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    (access,) = [r for r in records if r.get("request_id") == "req-json-1"
                 and r["logger"] == "aiohttp.access"]
    assert access["status"] == 200 and access["path"] == "/v1/chat/stream"
    assert "secret" not in stderr  # the prompt (in the query) is never logged


async def test_a_client_that_hung_up_is_logged_as_499(
    relay: RunningServer, simulator: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
            "simulate": {"tokens": 200, "rate": 50}}
    async with aiohttp.ClientSession() as session, session.post(
        relay.url + "/v1/chat/stream", json=body, headers={"X-Request-ID": "req-499"}
    ) as response:
        await response.content.readline()
        response.close()

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "req-499"]

    assert await wait_until(lambda: bool(logged()), timeout=5)
    assert {getattr(r, "status", None) for r in logged()} == {499}
