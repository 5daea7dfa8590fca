"""The access log's byte count is what the client got, on every endpoint.

Regression: frames written straight to the transport were not counted (640
bytes logged for a 45,170-byte answer on /v1/chat/completions, 467 for
12,878 on /v1/chat/stream).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from streamsvc.server.state import METRICS
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, wait_until

STORY = {"model": "sim-small", "messages": [{"role": "user", "content": "tell me a story"}],
         "simulate": {"tokens": 2000, "rate": 0}}


def _logged_bytes(caplog: pytest.LogCaptureFixture, request_id: str) -> int | None:
    for record in caplog.records:
        if record.name == "aiohttp.access" and getattr(record, "request_id", None) == request_id:
            return int(getattr(record, "bytes"))
    return None


CASES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("completions-stream", "POST", "/v1/chat/completions", {**STORY, "stream": True}),
    ("completions", "POST", "/v1/chat/completions", STORY),
    ("chat-stream-post", "POST", "/v1/chat/stream", STORY),
    ("chat-stream-get", "GET", "/v1/chat/stream?model=sim-small&q=hello&simulate=%7B%22tokens"
                              "%22%3A500%2C%22rate%22%3A0%7D", None),
    ("models", "GET", "/v1/models", None),
    ("not-found", "GET", "/v1/nothing-here", None),
    ("bad-request", "POST", "/v1/chat/completions", {"model": "echo"}),
]


@pytest.mark.parametrize(("name", "method", "path", "body"), CASES, ids=[c[0] for c in CASES])
async def test_access_log_counts_the_body_bytes_the_client_received(
    relay: RunningServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    name: str, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    request_id = f"bytes-{name}"
    metrics = relay.app[METRICS]
    before = metrics.response_bytes._value.get()
    async with session.request(method, relay.url + path, json=body,
                               headers={"X-Request-ID": request_id}) as response:
        received = len(await response.read())
    assert received > 0
    assert await wait_until(lambda: _logged_bytes(caplog, request_id) is not None)
    assert _logged_bytes(caplog, request_id) == received
    assert metrics.response_bytes._value.get() - before == received


async def test_access_log_counts_a_resumed_stream(
    relay: RunningServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    simulator: SimulatorServer,
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with session.post(relay.url + "/v1/streams", json=STORY) as response:
        created = await response.json()
    async with session.get(relay.url + created["events_url"],
                           headers={"X-Request-ID": "bytes-events"}) as response:
        received = len(await response.read())
    assert await wait_until(lambda: _logged_bytes(caplog, "bytes-events") is not None)
    assert _logged_bytes(caplog, "bytes-events") == received > 10_000
