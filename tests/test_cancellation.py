"""A client hang-up on a non-resumable stream cancels the upstream request within 1 s.

Measured on real sockets: the client closes its connection, and the
standalone simulator's ``disconnected`` counter must move within a second,
both mid-stream and while the first token is still awaited.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from streamsvc.simulator import SimulatorServer
from streamsvc.sse import SSEDecoder
from tests.conftest import RunningServer

HANGUP_LIMIT_S = 1.0
PATHS = ["/v1/chat/completions", "/v1/chat/stream"]


def _body(**simulate: Any) -> dict[str, Any]:
    return {
        "model": "sim-small",
        "messages": [{"role": "user", "content": "go on"}],
        "stream": True,
        "simulate": simulate,
    }


async def _hangup_delay(simulator: SimulatorServer, before: int, timeout: float = 5.0) -> float:
    """Seconds from now until the simulator counts one more hang-up (inf if never)."""
    start = time.monotonic()
    while simulator.stats.disconnected <= before:
        if time.monotonic() - start > timeout:
            return float("inf")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def _check_healthy(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{relay.url}/healthz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    body = {"model": "echo", "messages": [{"role": "user", "content": " still here"}],
            "stream": True}
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e.data) for e in SSEDecoder().feed(raw) if e.data != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == " still here"


@pytest.mark.parametrize("path", PATHS)
async def test_hangup_mid_stream_cancels_upstream(
    relay: RunningServer, simulator: SimulatorServer, path: str
) -> None:
    async with aiohttp.ClientSession() as client:
        response = await client.post(f"{relay.url}{path}", json=_body(rate=20, tokens=200))
        assert response.status == 200
        decoder = SSEDecoder()
        events = 0
        async for data in response.content.iter_any():
            events += len(decoder.feed(data))
            if events >= 3:
                break
        assert events >= 3
        assert simulator.stats.active == 1
        before = simulator.stats.disconnected
        response.close()
        delay = await _hangup_delay(simulator, before)
    assert delay <= HANGUP_LIMIT_S, f"upstream still open {delay:.3f} s after the hang-up"
    assert simulator.stats.active == 0
    assert simulator.stats.completed == 0
    async with aiohttp.ClientSession() as session:
        await _check_healthy(relay, session)


@pytest.mark.parametrize("path", PATHS)
async def test_hangup_before_first_token_cancels_upstream(
    relay: RunningServer, simulator: SimulatorServer, path: str
) -> None:
    async with aiohttp.ClientSession() as client:
        # The first token is 30 s away. The streamsvc format sends its headers at
        # once; the OpenAI endpoint holds them for the first content (up to
        # heartbeat_s), so there the client leaves before it has any.
        request = asyncio.ensure_future(
            client.post(f"{relay.url}{path}", json=_body(first_token_delay=30, tokens=5)))
        assert await _wait_until_active(simulator, 1)
        await asyncio.sleep(0.05)  # the relay is now waiting on the upstream
        if path != "/v1/chat/completions":
            response = await asyncio.wait_for(request, timeout=10)
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
        else:
            assert not request.done()
        before = simulator.stats.disconnected
        if request.done():
            request.result().close()
        else:
            request.cancel()
        delay = await _hangup_delay(simulator, before)
    assert delay <= HANGUP_LIMIT_S, f"upstream still open {delay:.3f} s after the hang-up"
    assert simulator.stats.active == 0
    async with aiohttp.ClientSession() as session:
        await _check_healthy(relay, session)


async def test_hangup_on_one_stream_leaves_others_running(
    relay: RunningServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    body = _body(rate=50, tokens=40)
    async with aiohttp.ClientSession() as client:
        doomed = await client.post(f"{relay.url}/v1/chat/completions", json=_body(rate=20,
                                                                                   tokens=200))
        assert doomed.status == 200
        async with session.post(f"{relay.url}/v1/chat/stream", json=body) as survivor:
            assert survivor.status == 200
            assert await _wait_until_active(simulator, 2)
            doomed.close()
            assert await _hangup_delay(simulator, 0) <= HANGUP_LIMIT_S
            decoder = SSEDecoder()
            events = []
            async for data in survivor.content.iter_any():
                events.extend(decoder.feed(data))
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    assert simulator.stats.disconnected == 1
    assert simulator.stats.completed == 1


async def test_non_stream_hangup_cancels_upstream(
    relay: RunningServer, simulator: SimulatorServer
) -> None:
    body = _body(first_token_delay=30, tokens=5)
    body["stream"] = False
    async with aiohttp.ClientSession() as client:
        task = asyncio.ensure_future(client.post(f"{relay.url}/v1/chat/completions", json=body))
        assert await _wait_until_active(simulator, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    delay = await _hangup_delay(simulator, 0)
    assert delay <= HANGUP_LIMIT_S, f"upstream still open {delay:.3f} s after the hang-up"
    async with aiohttp.ClientSession() as session:
        await _check_healthy(relay, session)


async def _wait_until_active(simulator: SimulatorServer, count: int) -> bool:
    deadline = time.monotonic() + 5
    while simulator.stats.active < count:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True
