"""Backpressure at the SSE sink, with real slow socket clients.

A client here is a raw socket with a small receive buffer that reads a
little at a time (or nothing at all), in front of a simulator streaming as
fast as it can. What must hold: a reader that is slow but reading gets the
whole answer (a direct stream holds its upstream back; a resumable one is
read from the journal at the reader's pace); only a reader that takes
nothing for ``write_timeout_s`` is gone, and its upstream is cancelled; the
stream's memory stays bounded; nothing the client got is lost or reordered.
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

from streamsvc.server.state import JOURNAL, METRICS, REGISTRY
from streamsvc.simulator import SimulatorServer
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import RunningServer, StartServer, relay_overrides, spawn_serve, wait_until
from tests.helpers import expected, story, text_of

LIMIT = 16_384  # server.max_pending_bytes in these tests


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


@pytest.fixture
async def tight_relay(start_server: StartServer, simulator: SimulatorServer) -> RunningServer:
    # A reader slower than max_pending_bytes / write_timeout_s (16 KB/s here) was
    # cut silently before the one stream lifecycle: a whole write had to go in time.
    return await start_server(overrides=relay_overrides(
        simulator.url,
        server={"max_pending_bytes": LIMIT, "write_timeout_s": 1, "send_buffer_bytes": 4096},
        journal={"max_events": 1_000_000},
    ))


@pytest.fixture
async def clients() -> AsyncIterator[list[SlowClient]]:
    opened: list[SlowClient] = []
    yield opened
    for client in opened:
        client.close()


DIRECT = ["/v1/chat/completions", "/v1/chat/stream"]


def _final(events: list[ServerSentEvent]) -> str:
    """How a body ended: "done", "[DONE]", or an error code."""
    last = events[-1]
    if last.data == "[DONE]":
        return "[DONE]"
    if last.event in ("done", "error"):
        data = json.loads(last.data)
        return "done" if last.event == "done" else str(data["code"])
    error = json.loads(last.data).get("error")
    return str(error["code"]) if error else "cut"


@pytest.mark.parametrize("path", DIRECT)
async def test_slow_reader_that_keeps_reading_gets_the_whole_answer(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient], path: str,
) -> None:
    """Regression: a slow reader that never stops reading was cut with a bare reset."""
    tokens = 8_000  # about 40 KB of text, far more than LIMIT
    body = {**story(tokens), "stream": True}
    client = await SlowClient.open(tight_relay.url, "POST", path, json.dumps(body).encode())
    clients.append(client)
    # ~10 KB/s: slower than LIMIT / write_timeout_s, and than the simulator by far.
    reading = asyncio.ensure_future(client.trickle(512, 0.05, until=lambda: False))
    try:
        assert await wait_until(lambda: client.eof, timeout=30)
    finally:
        reading.cancel()
    events = client.events()
    assert _final(events) in ("done", "[DONE]")
    assert text_of(events) == expected(tokens)
    assert simulator.stats.disconnected == 0
    assert tight_relay.app[METRICS].slow_consumers._value.get() == 0


@pytest.mark.parametrize("path", DIRECT)
async def test_stalled_reader_is_cut_after_write_timeout_and_its_upstream_cancelled(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient], path: str,
) -> None:
    body = {**story(200_000), "stream": True}
    client = await SlowClient.open(tight_relay.url, "POST", path, json.dumps(body).encode())
    clients.append(client)
    # Reads nothing: no progress for write_timeout_s (1 s) means gone.
    assert await wait_until(lambda: simulator.stats.disconnected >= 1, timeout=15)
    hangups = tight_relay.app[METRICS].client_hangups
    assert await wait_until(lambda: hangups._value.get() == 1, timeout=10)
    # The upstream was paused: of a 200,000-token answer the simulator got to write
    # only what its socket, the relay's bounded backlog and the kernel buffers took.
    assert simulator.stats.completed == 0 and simulator.stats.disconnected == 1
    assert await wait_until(lambda: len(tight_relay.app[REGISTRY]) == 0)


async def test_slow_reader_of_a_resumable_stream_reads_at_its_own_pace_from_the_journal(
    tight_relay: RunningServer, simulator: SimulatorServer, clients: list[SlowClient],
    session: aiohttp.ClientSession,
) -> None:
    tokens = 2_000  # ~170 KB of events, ten times LIMIT
    async with session.post(tight_relay.url + "/v1/streams", json=story(tokens)) as r:
        created = await r.json()
    client = await SlowClient.open(tight_relay.url, "GET", created["events_url"])
    clients.append(client)
    journal = tight_relay.app[JOURNAL]
    reading = asyncio.ensure_future(client.trickle(2048, 0.05, until=lambda: False))
    try:
        # The generation runs ahead into the journal; the reader is never cut for it.
        assert await wait_until(lambda: journal._logs[created["id"]].ended, 20)
        assert not client.eof
        assert await wait_until(lambda: client.eof, timeout=30)
    finally:
        reading.cancel()
    events = client.events()
    assert events[-1].event == "done"
    assert text_of(events) == expected(tokens)
    seqs = [int(str(e.id).rpartition(":")[2]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert simulator.stats.disconnected == 0
    assert tight_relay.app[METRICS].slow_consumers._value.get() == 0


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
            url + "/v1/chat/stream", json=story(100)
        ) as r:
            await r.read()
        baseline = _rss_kib(process.pid)
        body = {**story(300_000), "stream": True}
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
