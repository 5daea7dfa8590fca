"""Backpressure at the SSE sink, with real slow socket clients.

A client here is a raw socket with a small receive buffer that reads a
little at a time (or nothing at all), in front of a simulator streaming as
fast as it can. What must hold: the stream's memory stays bounded, the
upstream is cancelled with ``slow_consumer`` where the stream cannot wait
(non-resumable), a resumable stream goes on into the journal while only the
slow connection is closed, and nothing the client got is lost or reordered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamsvc.server.state import JOURNAL, METRICS
from streamsvc.simulator import SimulatorServer, generated_tokens
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import RunningServer, StartServer, relay_overrides, spawn_serve, wait_until

PROMPT = "tell me a story"
LIMIT = 16_384  # server.max_pending_bytes in these tests


def _story(tokens: int, **more: Any) -> dict[str, Any]:
    return {"model": "sim-small", "messages": [{"role": "user", "content": PROMPT}],
            "simulate": {"tokens": tokens, "rate": 0}, **more}


def _expected(tokens: int) -> str:
    return "".join(generated_tokens("sim-small", PROMPT, tokens))


class SlowClient:
    """An HTTP/1.1 client on a raw socket whose reading speed the test sets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, url: str, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> SlowClient:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        # A small window: the server's writes back up soon instead of filling
        # megabytes of kernel buffers first.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
                f"Content-Length: {len(body)}", "Content-Type: application/json",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await loop.sock_sendall(sock, ("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return cls(sock)

    async def read(self, size: int) -> None:
        piece = await asyncio.get_running_loop().sock_recv(self.sock, size)
        if not piece:
            self.eof = True
        self.raw += piece

    async def trickle(self, size: int, interval: float, until: Any) -> None:
        """Read ``size`` bytes every ``interval`` seconds until ``until()`` holds."""
        while not until() and not self.eof:
            await asyncio.sleep(interval)
            await self.read(size)

    async def drain(self, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self.read(65536)

    def close(self) -> None:
        self.sock.close()

    @property
    def head(self) -> str:
        return bytes(self.raw).partition(b"\r\n\r\n")[0].decode()

    def events(self) -> list[ServerSentEvent]:
        """The SSE events of the chunked body read so far (complete ones only)."""
        body = bytes(self.raw).partition(b"\r\n\r\n")[2]
        decoded = bytearray()
        while body:
            size_line, sep, rest = body.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0 or len(rest) < size + 2:
                decoded += rest[:size]
                break
            decoded += rest[:size]
            body = rest[size + 2:]
        return SSEDecoder().feed(bytes(decoded))


def _text(events: list[ServerSentEvent]) -> str:
    out = []
    for event in events:
        if event.event == "message" and event.data != "[DONE]":
            data = json.loads(event.data)
            if "choices" in data:  # OpenAI format
                out += [(c.get("delta") or {}).get("content") or "" for c in data["choices"]]
            else:
                out.append(data.get("content", ""))
    return "".join(out)


@pytest.fixture
async def tight_relay(start_server: StartServer, simulator: SimulatorServer) -> RunningServer:
    return await start_server(overrides=relay_overrides(
        simulator.url,
        server={"max_pending_bytes": LIMIT, "write_timeout_s": 3, "send_buffer_bytes": LIMIT},
        journal={"max_events": 1_000_000},
    ))


@pytest.fixture
async def clients() -> AsyncIterator[list[SlowClient]]:
    opened: list[SlowClient] = []
    yield opened
    for client in opened:
        client.close()


def _journal_final(relay: RunningServer) -> tuple[str, dict[str, Any], int] | None:
    journal = relay.app[JOURNAL]
    for stream_id in list(journal._logs):
        log = journal._logs[stream_id]
        if log.ended:
            event = journal._logs[stream_id].events[-1]
            return event.kind, json.loads(event.data), journal.size(stream_id) or 0
    return None


async def test_slow_reader_of_a_direct_stream_gets_slow_consumer_and_the_upstream_stops(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient],
) -> None:
    tokens = 200_000
    client = await SlowClient.open(tight_relay.url, "POST", "/v1/chat/stream",
                                   json.dumps(_story(tokens)).encode())
    clients.append(client)
    # ~50 KB/s, far slower than the simulator.
    await client.trickle(512, 0.01, until=lambda: simulator.stats.disconnected >= 1)
    assert simulator.stats.disconnected == 1, "the upstream was not cancelled"
    final = _journal_final(tight_relay)
    assert final is not None
    kind, data, size = final
    assert kind == "error" and data["code"] == "slow_consumer"
    # The journal stopped growing about LIMIT past what the client was given: a
    # few hundred kilobytes at most, not the whole answer (megabytes).
    assert size < 2_000_000, size
    await client.drain()
    events = client.events()
    assert events[-1].event == "error" and json.loads(events[-1].data)["code"] == "slow_consumer"
    # Lossless up to the error: everything the client got is the answer's start, in order.
    text = _text(events)
    assert text and _expected(tokens).startswith(text)
    seqs = [int(str(e.id).rpartition(":")[2]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert tight_relay.app[METRICS].slow_consumers._value.get() == 1


async def test_stalled_reader_of_a_direct_stream_is_cut_and_memory_stays_bounded(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient],
) -> None:
    client = await SlowClient.open(tight_relay.url, "POST", "/v1/chat/stream",
                                   json.dumps(_story(200_000)).encode())
    clients.append(client)
    # Reads one byte a second: the upstream must be stopped long before it ends.
    reading = asyncio.ensure_future(client.trickle(1, 1.0, until=lambda: False))
    try:
        assert await wait_until(lambda: simulator.stats.disconnected >= 1, timeout=10)
        final = _journal_final(tight_relay)
        assert final is not None and final[1]["code"] == "slow_consumer"
        assert final[2] < 2_000_000, final[2]
        # The handler blocked on the stalled socket gives up after write_timeout_s.
        hangups = tight_relay.app[METRICS].client_hangups
        assert await wait_until(lambda: hangups._value.get() == 1, timeout=10)
    finally:
        reading.cancel()


async def test_slow_reader_on_the_openai_endpoint_gets_slow_consumer(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient],
) -> None:
    body = {**_story(200_000), "stream": True}
    client = await SlowClient.open(tight_relay.url, "POST", "/v1/chat/completions",
                                   json.dumps(body).encode())
    clients.append(client)
    await client.trickle(512, 0.01, until=lambda: simulator.stats.disconnected >= 1)
    assert simulator.stats.disconnected == 1, "the upstream was not cancelled"
    await client.drain()
    events = client.events()
    error = json.loads(events[-1].data)["error"]
    assert error["code"] == "slow_consumer"
    assert all(e.data != "[DONE]" for e in events)
    assert _expected(200_000).startswith(_text(events[:-1]))


async def test_slow_reader_of_a_resumable_stream_is_closed_and_resumes_losslessly(
    start_server: StartServer, simulator: SimulatorServer, clients: list[SlowClient],
    session: aiohttp.ClientSession,
) -> None:
    # A write may wait seconds for this reader to drain the buffers: a write
    # timeout well above that, so the lag check is what closes it.
    tight_relay = await start_server(overrides=relay_overrides(
        simulator.url,
        server={"max_pending_bytes": LIMIT, "write_timeout_s": 20, "send_buffer_bytes": LIMIT},
    ))
    tokens = 4_000
    story = _story(tokens)
    story["simulate"]["rate"] = 2000  # ~2 s at ~50 KB/s, twice this reader's speed
    async with session.post(tight_relay.url + "/v1/streams", json=story) as r:
        created = await r.json()
    client = await SlowClient.open(tight_relay.url, "GET", created["events_url"])
    clients.append(client)
    await client.trickle(256, 0.01, until=lambda: False)  # until the relay closes it
    assert client.eof
    got = client.events()
    assert got and all(e.event == "message" for e in got), "closed without an error event"
    # The generation went on into the journal: it ends normally, upstream not cancelled.
    journal = tight_relay.app[JOURNAL]
    assert await wait_until(lambda: journal._logs[created["id"]].ended, 20)
    assert simulator.stats.disconnected == 0
    # EventSource would now come back with Last-Event-ID and get the rest.
    async with session.get(tight_relay.url + created["events_url"],
                           headers={"Last-Event-ID": str(got[-1].id)}) as r:
        rest = SSEDecoder().feed(await r.read())
    assert rest[-1].event == "done"
    assert _text(got) + _text(rest) == _expected(tokens)
    assert tight_relay.app[METRICS].slow_consumers._value.get() == 1


# -- memory of a whole relay process ------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/stream"])
async def test_a_client_reading_one_byte_a_second_cannot_grow_the_relay(path: str) -> None:
    """`streamsvc serve` with its built-in simulator; the answer would be ~300k chunks.

    Unbounded (max_pending_bytes set to 1 TB), the relay grew by 316 MiB
    (completions) and 98 MiB (chat/stream) in these 4 s; bounded, by 9 and
    19 MiB (measured 2026-11-26): the parsed chunks or journal events of
    about ``max_pending_bytes`` plus what the kernel took, and allocator slack.
    """
    # Coalescing off: every token its own chunk and journal event, the worst case.
    # A 64 KiB kernel send buffer: what the kernel took is journaled (for replay) too.
    process, url = await spawn_serve({
        "STREAMSVC__SERVER__MAX_PENDING_BYTES": "65536",
        "STREAMSVC__SERVER__SEND_BUFFER_BYTES": "65536",
        "STREAMSVC__JOURNAL__MAX_EVENTS": "10000000", "STREAMSVC__PIPELINE__COALESCE": "false",
    })
    client: SlowClient | None = None
    try:
        # Warm up (imports, first stream) before the baseline.
        async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/chat/stream", json=_story(100)
        ) as r:
            await r.read()
        baseline = _rss_kib(process.pid)
        body = {**_story(300_000), "stream": True}
        client = await SlowClient.open(url, "POST", path, json.dumps(body).encode())
        peak = baseline
        for _ in range(40):  # 4 s of one byte a second
            await asyncio.sleep(0.1)
            peak = max(peak, _rss_kib(process.pid))
            if _ % 10 == 0:
                await client.read(1)
        growth_mib = (peak - baseline) / 1024
        assert growth_mib < 40, f"relay grew {growth_mib:.1f} MiB for one stalled client"
    finally:
        if client is not None:
            client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
