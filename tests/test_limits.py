"""Limits: concurrent streams per key and per instance, requests per minute per key.

Over a limit: ``429 rate_limited`` with ``Retry-After``; a stream's slot is
given back when it ends, is stopped, or its client leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from streamsvc.config import LimitsConfig
from streamsvc.errors import LimitError
from streamsvc.server.limits import MemoryLimiter
from streamsvc.server.state import AUTH, JOURNAL, LIMITER
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.helpers import bearer, secured

KEY_A = "sk-limits-a-0f9e8d7c"
KEY_B = "sk-limits-b-1a2b3c4d"
FAST = {"model": "echo", "messages": [{"role": "user", "content": "quick"}]}
SLOW = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
        "simulate": {"rate": 20, "tokens": 400}}


async def limited(start_server: StartServer, simulator: SimulatorServer,
                  monkeypatch: pytest.MonkeyPatch, **limits: Any) -> RunningServer:
    return await secured(start_server, simulator, monkeypatch, f"{KEY_A},{KEY_B}",
                         limits=limits)


def open_streams(relay: RunningServer, key: str | None = None) -> int:
    key_id = relay.app[AUTH].key_id(key) if key else None
    return relay.app[LIMITER].open_streams(key_id)


async def assert_limited(response: aiohttp.ClientResponse, names: str) -> None:
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    error = (await response.json())["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert names in error["message"]


async def test_streams_per_key_are_limited_and_given_back(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = await limited(start_server, simulator, monkeypatch, max_streams_per_key=2)
    ids = []
    for _ in range(2):
        async with session.post(relay.url + "/v1/streams", json=SLOW, headers=bearer(KEY_A)
                                ) as response:
            assert response.status == 201
            ids.append((await response.json())["id"])
    assert open_streams(relay, KEY_A) == 2
    for method, path in (("POST", "/v1/streams"), ("POST", "/v1/chat/stream"),
                         ("POST", "/v1/chat/completions")):
        async with session.request(method, relay.url + path, json=SLOW, headers=bearer(KEY_A)
                                   ) as response:
            await assert_limited(response, "limits.max_streams_per_key (2)")
    async with session.post(relay.url + "/v1/chat/completions", json=FAST, headers=bearer(KEY_B)
                            ) as response:
        assert response.status == 200  # another key is not affected
    # DELETE ends a stream: its slot comes back.
    async with session.delete(relay.url + f"/v1/streams/{ids[0]}", headers=bearer(KEY_A)
                              ) as response:
        assert response.status == 200
    assert await wait_until(lambda: open_streams(relay, KEY_A) == 1)
    async with session.post(relay.url + "/v1/chat/stream", json=FAST, headers=bearer(KEY_A)
                            ) as response:
        assert response.status == 200 and "event: done" in await response.text()
    async with session.delete(relay.url + f"/v1/streams/{ids[1]}", headers=bearer(KEY_A)):
        pass
    assert await wait_until(lambda: open_streams(relay) == 0)


@pytest.mark.parametrize("path", ["/v1/chat/stream", "/v1/chat/completions"])
async def test_a_client_that_leaves_gives_its_slot_back(
    start_server: StartServer, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    relay = await limited(start_server, simulator, monkeypatch, max_streams_per_key=1)
    for _ in range(3):  # no leak: the single slot is free again each time
        async with aiohttp.ClientSession() as client:
            response = await client.post(relay.url + path, json={**SLOW, "stream": True},
                                         headers=bearer(KEY_A))
            assert response.status == 200
            await response.content.readany()
            assert open_streams(relay, KEY_A) == 1
            response.close()  # the client leaves mid-stream
        assert await wait_until(lambda: open_streams(relay) == 0)


async def test_streams_that_end_give_their_slots_back(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = await limited(start_server, simulator, monkeypatch, max_streams_per_key=1)
    for _ in range(3):
        async with session.post(relay.url + "/v1/streams", json=FAST, headers=bearer(KEY_A)
                                ) as response:
            created = await response.json()
        async with session.get(relay.url + created["events_url"]) as response:
            assert "event: done" in await response.text()
        assert await wait_until(lambda: open_streams(relay) == 0)
        async with session.post(relay.url + "/v1/chat/completions", json=FAST,
                                headers=bearer(KEY_A)) as response:
            assert response.status == 200
        async with session.post(relay.url + "/v1/chat/completions", json={"model": "nope"},
                                headers=bearer(KEY_A)) as response:
            assert response.status == 400  # a refused request gives its slot back too
        assert open_streams(relay) == 0


async def test_streams_per_instance_are_limited_with_auth_off(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STREAMSVC_API_KEYS", raising=False)
    relay = await start_server(overrides=relay_overrides(simulator.url,
                                                         limits={"max_streams": 1}))
    async with session.post(relay.url + "/v1/streams", json=SLOW) as response:
        stream_id = (await response.json())["id"]
    async with session.post(relay.url + "/v1/chat/completions", json=FAST) as response:
        await assert_limited(response, "limits.max_streams (1)")
    async with session.get(relay.url + "/v1/models") as response:
        assert response.status == 200  # not a stream
    async with session.delete(relay.url + f"/v1/streams/{stream_id}"):
        pass
    assert await wait_until(lambda: open_streams(relay) == 0)
    async with session.post(relay.url + "/v1/chat/completions", json=FAST) as response:
        assert response.status == 200


async def test_requests_per_minute_per_key(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = await limited(start_server, simulator, monkeypatch, requests_per_minute_per_key=3)
    for _ in range(3):
        async with session.get(relay.url + "/v1/models", headers=bearer(KEY_A)) as response:
            assert response.status == 200
    async with session.get(relay.url + "/v1/models", headers=bearer(KEY_A)) as response:
        await assert_limited(response, "limits.requests_per_minute_per_key (3)")
        assert 1 <= int(response.headers["Retry-After"]) <= 20
    async with session.get(relay.url + "/v1/models", headers=bearer(KEY_B)) as response:
        assert response.status == 200
    async with session.get(relay.url + "/healthz") as response:
        assert response.status == 200  # open endpoints are not counted


async def test_memory_limiter_refills_and_zero_turns_limits_off() -> None:
    now = [0.0]
    limiter = MemoryLimiter(LimitsConfig(requests_per_minute_per_key=60), clock=lambda: now[0])
    for _ in range(60):
        await limiter.check_rate("k")
    with pytest.raises(LimitError) as caught:
        await limiter.check_rate("k")
    assert caught.value.retry_after == pytest.approx(1.0)
    now[0] = 1.0
    await limiter.check_rate("k")  # one token back after a second

    off = MemoryLimiter(LimitsConfig(max_streams=0, max_streams_per_key=0,
                                     requests_per_minute_per_key=0))
    slots = [await off.acquire_stream("k") for _ in range(50)]
    for _ in range(1000):
        await off.check_rate("k")
    assert off.open_streams("k") == 50
    for slot in slots:
        slot.release()
        slot.release()  # idempotent
    assert off.open_streams() == 0 and off.open_streams("k") == 0


async def test_a_refused_resumable_stream_leaves_nothing_in_the_journal(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the journal entry was made before the limits were checked (never ended)."""
    monkeypatch.delenv("STREAMSVC_API_KEYS", raising=False)
    relay = await start_server(overrides=relay_overrides(simulator.url,
                                                         limits={"max_streams": 1}))
    async with session.post(relay.url + "/v1/streams", json=SLOW) as response:
        assert response.status == 201
    journal = relay.app[JOURNAL]
    assert len(journal) == 1  # type: ignore[arg-type]
    for path in ("/v1/streams", "/v1/chat/stream?model=echo&q=hi"):
        method = session.post if path == "/v1/streams" else session.get
        async with method(relay.url + path, json=FAST if path == "/v1/streams" else None
                          ) as response:
            await assert_limited(response, "limits.max_streams (1)")
    assert len(journal) == 1  # type: ignore[arg-type]


# -- issue 12, item 4: stalled uploads and trickled headers ------------------------------------

async def _stall(url: str, path: str, head: bytes = b""
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection that sends 8 bytes of a 1,000-byte body (or ``head`` alone), then waits.

    The caller keeps the writer: a collected StreamWriter closes its connection.
    """
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head or (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          "\r\nContent-Length: 1000\r\n\r\n").encode() + b'{"model"')
    await writer.drain()
    return reader, writer


async def test_stalled_uploads_take_no_stream_slot_and_get_408(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await start_server(overrides=relay_overrides(
        simulator.url, limits={"max_streams": 2}, server={"body_timeout_s": 1.0}))
    paths = ["/v1/chat/completions", "/v1/chat/stream", "/v1/streams"]
    stalled = [await _stall(relay.url, path) for path in paths * 2]  # 6 > max_streams
    await asyncio.sleep(0.2)
    # Every endpoint still starts streams while the uploads stall.
    for path in paths:
        async with session.post(relay.url + path, json=FAST) as response:
            assert response.status in (200, 201), await response.text()
            await response.read()
    assert open_streams(relay) <= 2
    for reader, writer in stalled:  # each stalled upload: 408, OpenAI-shaped, naming the body
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"Connection: close" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        error = json.loads(await reader.readexactly(length))["error"]
        writer.close()
        assert error["code"] == "request_timeout" and error["param"] == "body", error
        assert "server.body_timeout_s" in error["message"]
    assert simulator.stats.requests == len(paths)  # the stalled ones never went upstream


async def test_slowloris_connections_are_closed_after_keepalive_timeout(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await start_server(overrides=relay_overrides(
        simulator.url, server={"keepalive_timeout_s": 1.0}))
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: "
    trickling = [await _stall(relay.url, "", head) for _ in range(64)]
    started = time.monotonic()
    async with session.get(relay.url + "/v1/models") as response:  # others are served meanwhile
        assert response.status == 200
    for reader, writer in trickling:  # closed by the server, with nothing sent
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert time.monotonic() - started < 5
