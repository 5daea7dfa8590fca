"""Graceful shutdown on SIGTERM (one instance, memory journal): answers in flight finish.

``streamsvc serve`` runs as a real process with its built-in simulator; the
client keeps reading its stream while the process is told to stop.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from typing import Any

import aiohttp

from streamsvc.server.connections import Connections
from streamsvc.server.state import CONNECTIONS, DRAINING, REGISTRY
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import RunningServer
from tests.helpers import expected, story, text_of


async def _read_after_sigterm(
    url: str, process: subprocess.Popen[bytes], body: dict[str, Any]
) -> list[ServerSentEvent]:
    """Read a POST /v1/chat/stream; SIGTERM the server once the first delta is in."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    async with aiohttp.ClientSession() as session, session.post(
        url + "/v1/chat/stream", json=body
    ) as response:
        assert response.status == 200
        async for data in response.content.iter_any():
            fresh = decoder.feed(data)
            if not events and any(e.event == "message" for e in fresh):
                process.send_signal(signal.SIGTERM)
            events.extend(fresh)
    return events


async def _exit_code(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, "the server did not exit"
        await asyncio.sleep(0.05)
    return process.returncode


async def test_sigterm_lets_a_running_answer_finish_then_exits_0(serve: Any) -> None:
    process, url = await serve()
    events = await _read_after_sigterm(url, process, story(30, rate=20))  # about 1.5 s
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    assert text_of(events) == expected(30)
    assert await _exit_code(process) == 0


async def test_an_answer_longer_than_drain_timeout_ends_with_shutting_down(serve: Any) -> None:
    process, url = await serve(STREAMSVC__SERVER__DRAIN_TIMEOUT_S="0.5")
    started = time.monotonic()
    events = await _read_after_sigterm(url, process, story(400, rate=20))  # about 20 s
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)
    assert error["code"] == "shutting_down" and error["retryable"] is True
    text = text_of(events)
    assert text and expected(400).startswith(text)
    assert await _exit_code(process) == 0
    assert time.monotonic() - started < 15, "drain_timeout_s was not applied"


async def test_while_draining_new_streams_get_503_shutting_down(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    relay.app[DRAINING].set()
    body = {**story(3, rate=0), "stream": True}
    for path in ("/v1/chat/completions", "/v1/chat/stream", "/v1/streams"):
        async with session.post(relay.url + path, json=body) as r:
            assert r.status == 503, path
            error = (await r.json())["error"]
        assert error["code"] == "shutting_down"
    async with session.get(relay.url + "/v1/chat/stream", params={"q": "hi", "model": "echo"}) as r:
        assert r.status == 503
    async with session.get(relay.url + "/readyz") as r:
        assert r.status == 503


async def test_a_drain_closes_idle_keep_alive_connections_and_answers_with_connection_close(
    relay: RunningServer,
) -> None:
    connections = relay.app[CONNECTIONS]
    async with aiohttp.ClientSession() as client:
        for _ in range(3):  # one kept-alive connection, reused
            async with client.get(relay.url + "/healthz") as r:
                assert r.status == 200 and r.headers.get("Connection") != "close"
        assert connections.close_idle() == 1
        assert connections.close_idle() == 0  # closed ones are forgotten
        relay.app[DRAINING].set()
        async with client.get(relay.url + "/healthz") as r:  # a fresh connection
            assert r.status == 200 and r.headers["Connection"] == "close"


async def test_the_connection_table_forgets_closed_connections(relay: RunningServer) -> None:
    connections = relay.app[CONNECTIONS]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for _ in range(600):  # each on its own connection, closed after it
            async with client.get(relay.url + "/healthz") as r:
                await r.read()
    assert len(connections._busy) <= Connections._PRUNE_EVERY + 1


async def test_a_chat_completion_longer_than_drain_timeout_ends_with_a_shutting_down_error(
    serve: Any,
) -> None:
    process, url = await serve(STREAMSVC__SERVER__DRAIN_TIMEOUT_S="0.5")
    frames: list[bytes] = []
    async with aiohttp.ClientSession() as session, session.post(
        url + "/v1/chat/completions", json={**story(400, rate=20), "stream": True}
    ) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                frames.append(line[6:].strip())
                if len(frames) == 1:
                    process.send_signal(signal.SIGTERM)
    assert frames[-1] != b"[DONE]"
    error = json.loads(frames[-1])["error"]
    assert error["code"] == "shutting_down"
    text = "".join(json.loads(f)["choices"][0]["delta"].get("content") or ""
                   for f in frames[:-1] if json.loads(f).get("choices"))
    assert text and expected(400).startswith(text)
    assert await _exit_code(process) == 0


async def test_a_non_streamed_completion_cut_by_the_drain_gets_503_shutting_down(
    serve: Any,
) -> None:
    process, url = await serve(STREAMSVC__SERVER__DRAIN_TIMEOUT_S="0.5")
    async with aiohttp.ClientSession() as session:
        answer = asyncio.ensure_future(session.post(
            url + "/v1/chat/completions", json={**story(400, rate=20), "stream": False}))
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        async with await answer as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "shutting_down"
    assert await _exit_code(process) == 0


async def test_a_drain_waits_for_a_stream_admitted_while_it_runs(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    async def create(tokens: int) -> str:
        async with session.post(relay.url + "/v1/streams", json=story(tokens, rate=20)) as r:
            assert r.status == 201
            return str((await r.json())["events_url"])

    first = await create(10)  # 0.5 s
    drain = asyncio.ensure_future(relay.app[REGISTRY].drain(10))
    late = await create(30)  # 1.5 s, admitted after the drain looked
    assert await drain == 0  # nothing had to be stopped: it waited for both
    for url in (first, late):
        async with session.get(relay.url + url) as r:
            events = SSEDecoder().feed(await r.read())
        assert events[-1].event == "done", url
        assert json.loads(events[-1].data)["finish_reason"] == "stop"
