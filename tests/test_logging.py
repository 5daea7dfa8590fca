"""Logs: one JSON object per line on request, 499 for a client that hung up, no prompt."""

from __future__ import annotations

import json
import logging
import signal
import subprocess

import aiohttp
import pytest

from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, spawn_serve, wait_until


async def test_json_log_format_has_one_object_per_line_with_the_request_id() -> None:
    process, url = await spawn_serve({"STREAMSVC__LOG__FORMAT": "json"}, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session, session.get(
            url + "/v1/chat/stream", params={"model": "echo", "q": "secret prompt"},
            headers={"X-Request-ID": "req-json-1"},
        ) as response:
            body = await response.text()
        assert "event: done" in body
    finally:
        process.send_signal(signal.SIGTERM)
        _, raw = process.communicate(timeout=30)
    stderr = raw.decode()
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


async def test_sigusr1_logs_every_pending_task_and_the_process_serves_on() -> None:
    process, url = await spawn_serve({"STREAMSVC__LOG__FORMAT": "json"}, stderr=subprocess.PIPE)
    try:
        process.send_signal(signal.SIGUSR1)
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as response:
            assert response.status == 200  # it did not stop
    finally:
        process.send_signal(signal.SIGTERM)
        _, raw = process.communicate(timeout=30)
    assert process.returncode == 0
    records = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    (dump,) = [r for r in records if "tasks pending" in r["message"]]
    assert dump["level"] == "WARNING"
    assert "Stack for <Task" in dump["message"]  # where each one waits
    assert any(r["message"].startswith("shut down in ") for r in records)
