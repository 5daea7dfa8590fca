"""The push-driven upstream (``upstream/http_stream.py``, ``upstream/pool.py``) over real sockets.

Each upstream here is a plain asyncio server that records its connections, so a
test sees from the upstream's side whether a connection was reused, closed or
held back.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from streamsvc.config import UpstreamConfig
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.reactive.backpressure import Valve
from streamsvc.upstream.client import UpstreamClient
from streamsvc.upstream.pool import ConnectionPool
from tests.conftest import wait_until

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


ANSWER = _sse(b'{"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
              b'{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}',
              b"[DONE]")


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def _head(extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n" + extra + b"\r\n")


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A raw HTTP server: ``answer`` writes each response; connections are counted."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections: list[asyncio.StreamWriter] = []
        self.requests = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                await self.answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if ssl_context else 'http'}://localhost:{port}/v1"

    async def close(self) -> None:
        assert self._server is not None
        for writer in self.connections:
            writer.transport.abort()
        self._server.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(answer: Answer, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        upstream = Upstream(answer)
        await upstream.start(ssl_context)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.close()


async def _text(client: UpstreamClient, **kwargs: Any) -> str:
    return "".join([chunk.content async for chunk in client.stream(BODY, **kwargs)])


async def _whole(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_head() + _chunked(ANSWER))
    await writer.drain()


async def test_a_connection_is_reused_after_done_when_its_body_is_complete(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await upstreams(_whole)
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        assert await _text(client) == "Hello"
        assert await wait_until(lambda: pool.idle(client._origin) == 1)
        assert await _text(client) == "Hello"
    assert upstream.requests == 2
    assert len(upstream.connections) == 1


async def test_a_pooled_connection_sends_the_request_within_subscribe(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    """With a kept-alive connection the request goes out before subscribe returns (no task
    step first: a loop turn less before the first token); a new connection takes a task."""
    from reactivex import Observer

    upstream = await upstreams(_whole)
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        assert await _text(client) == "Hello"
        assert await wait_until(lambda: pool.idle(client._origin) == 1)
        (connection, _), = pool._idle[client._origin]
        sent = connection.requests
        texts: list[str] = []
        done = asyncio.get_running_loop().create_future()
        observer: Observer[Any] = Observer(lambda chunk: texts.append(chunk.content),
                                           done.set_exception, lambda: done.set_result(None))
        subscription = client.chunks(BODY).subscribe(observer)
        assert connection.requests == sent + 1 and pool.idle(client._origin) == 0
        await asyncio.wait_for(done, 5)
        assert "".join(texts) == "Hello"
        subscription.dispose()
    assert upstream.requests == 2 and len(upstream.connections) == 1


async def test_a_stream_keeps_nothing_of_its_connect_once_connected(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    """A new connection is opened by a task; once it is open, the stream lets the task go
    (with its coroutine and context): at 1,000 open streams each of them held about four
    objects more for the garbage collector to walk, as long as the stream ran."""
    import gc
    import types

    from reactivex import Observer

    async def first_then_wait(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}'
        writer.write(_head() + _chunked(_sse(text)))
        await writer.drain()
        await asyncio.sleep(30)  # the stream stays open: cut when the test ends

    upstream = await upstreams(first_then_wait)
    client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None)
    got = asyncio.get_running_loop().create_future()
    observer: Observer[Any] = Observer(lambda chunk: got.done() or got.set_result(chunk.content))
    subscription = client.chunks(BODY).subscribe(observer)
    try:
        assert await asyncio.wait_for(got, 5) == "Hi"
        connecting = [o for o in gc.get_objects() if isinstance(o, types.CoroutineType)
                      and o.cr_code.co_qualname == "_Exchange._connect"]
        assert connecting == []
    finally:
        subscription.dispose()


@pytest.mark.parametrize("end", ["left-open", "cut"])
async def test_a_body_left_open_or_cut_is_closed_never_reused(
    upstreams: Callable[..., Awaitable[Upstream]], end: str,
) -> None:
    async def unfinished(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if end == "left-open":
            writer.write(_head() + b"%x\r\n%s\r\n" % (len(ANSWER), ANSWER))  # no last chunk
            await writer.drain()
            await asyncio.wait_for(reader.read(), 30)  # until the client closes it
            raise ConnectionError("closed by the client")
        else:
            half = ANSWER[:60]
            writer.write(_head() + b"%x\r\n%s\r\n" % (len(half), half))
            await writer.drain()
            writer.transport.abort()

    upstream = await upstreams(unfinished)
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        for _ in range(2):
            if end == "left-open":
                assert await _text(client) == "Hello"
            else:
                with pytest.raises(UpstreamError, match="stopped mid-stream") as raised:
                    await _text(client)
                assert raised.value.code is ErrorCode.UPSTREAM_ERROR
        assert pool.idle(client._origin) == 0
    assert len(upstream.connections) == 2
    # The relay closed them: the upstream's side sees its reader end.
    assert await wait_until(lambda: all(w.transport.is_closing() or w.is_closing()
                                        for w in upstream.connections), timeout=5)


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    """A kept-alive connection that fails before any response byte: once more, anew."""

    async def second_request_hangs_up(_: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        if upstream.requests == 2:  # what a server that had just timed it out does
            writer.transport.abort()
            return
        writer.write(_head() + _chunked(ANSWER))
        await writer.drain()

    upstream = await upstreams(second_request_hangs_up)
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        assert await _text(client) == "Hello"
        assert await wait_until(lambda: pool.idle(client._origin) == 1)
        assert await _text(client) == "Hello"
    assert upstream.requests == 3
    assert len(upstream.connections) == 2


async def test_the_transport_is_paused_while_the_valve_is_closed(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    """The upstream's writes back up while the valve is closed, and go on once it opens."""
    event = _sse(b'{"choices":[{"index":0,"delta":{"content":"' + b"x" * 1000 + b'"}}]}')
    written = 0
    drained = asyncio.Event()

    async def flood(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.transport.set_write_buffer_limits(high=0)
        writer.write(_head())
        for _ in range(20_000):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            written += 1
            await writer.drain()
        drained.set()

    upstream = await upstreams(flood)
    valve = Valve()
    got: list[int] = []
    client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None)
    source = client.chunks(BODY, valve=valve)
    subscription = source.subscribe(lambda chunk: (got.append(1), valve.close()))
    assert await wait_until(lambda: len(got) > 0)
    await asyncio.sleep(0.5)
    stalled = written
    await asyncio.sleep(0.5)
    assert written == stalled < 20_000, "the upstream kept writing while the valve was closed"
    before = len(got)
    valve.open()
    assert await wait_until(lambda: len(got) > before)
    subscription.dispose()
    assert not drained.is_set()


async def test_dispose_closes_the_connection(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    async def slow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head())
        for _ in range(1000):
            event = _sse(b'{"choices":[{"index":0,"delta":{"content":"a"}}]}')
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.02)

    upstream = await upstreams(slow)
    got: list[object] = []
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        subscription = client.chunks(BODY).subscribe(got.append)
        assert await wait_until(lambda: len(got) >= 3)
        subscription.dispose()
        assert await wait_until(lambda: upstream.connections[0].is_closing(), timeout=1)
        assert pool.idle(client._origin) == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_decoded(
    upstreams: Callable[..., Awaitable[Upstream]], encoding: str,
) -> None:
    import zlib

    packed = gzip.compress(ANSWER) if encoding == "gzip" else zlib.compress(ANSWER)

    async def compressed(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(b"Content-Encoding: %s\r\n" % encoding.encode()) + _chunked(packed))
        await writer.drain()

    upstream = await upstreams(compressed)
    client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None)
    assert await _text(client) == "Hello"


async def test_non_200_is_classified_with_retry_after(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    async def limited(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b'{"error": {"message": "slow down"}}'
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 1500\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    upstream = await upstreams(limited)
    client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None)
    with pytest.raises(UpstreamError) as raised:
        await _text(client)
    assert raised.value.code is ErrorCode.RATE_LIMITED
    assert raised.value.retry_after == 1.5
    assert "slow down" in raised.value.message


async def test_no_status_line_in_time_is_upstream_timeout(
    upstreams: Callable[..., Awaitable[Upstream]],
) -> None:
    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    upstream = await upstreams(mute)
    client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url, read_timeout_s=0.3),
                            None)
    with pytest.raises(UpstreamError) as raised:
        await _text(client)
    assert raised.value.code is ErrorCode.UPSTREAM_TIMEOUT


async def test_https_upstream_with_a_throwaway_ca(
    upstreams: Callable[..., Awaitable[Upstream]], tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # what create_default_context trusts
    upstream = await upstreams(_whole, server_context)
    async with ConnectionPool() as pool:
        client = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None, pool=pool)
        assert await _text(client) == "Hello"
        assert await _text(client) == "Hello"
    assert len(upstream.connections) == 1
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusted = UpstreamClient("u", UpstreamConfig(base_url=upstream.url), None)
    with pytest.raises(UpstreamError) as raised:
        await _text(untrusted)
    assert raised.value.code is ErrorCode.UPSTREAM_UNAVAILABLE


def test_invalid_utf8_in_a_data_only_read_reads_as_replacement_characters() -> None:
    """Whole ``data:`` events are cut from the bytes undecoded (the fast path); a chunk
    with invalid UTF-8 must still read as the text path reads it: U+FFFD, not an error."""
    from streamsvc.chunks import Chunk
    from streamsvc.upstream.decoding import ChunkDecoder

    def chunks_of(parts: list[bytes]) -> list[Chunk]:
        got: list[Chunk] = []
        decoder = ChunkDecoder("u", got.append)
        for part in parts:
            decoder.feed(part)
        return got

    bad = _sse(b'{"choices":[{"index":0,"delta":{"content":"a\xffb"}}]}')
    fast = chunks_of([bad])  # one whole event: the bytes path
    slow = chunks_of([bad[:3], bad[3:]])  # cut: the text path
    assert [c.content for c in fast] == [c.content for c in slow] == ["a\ufffdb"]
    assert fast[0].to_json() == slow[0].to_json()


async def test_the_events_of_one_upstream_read_reach_the_client_in_one_write(
    upstreams: Callable[..., Awaitable[Upstream]], start_server: Any,
) -> None:
    """Several events in one upstream read go to the client in one write (one HTTP chunk),
    as a byte relay passes a read on, not one ``send`` per event."""
    from tests.conftest import relay_overrides

    async def two_reads(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = _sse(b'{"choices":[{"index":0,"delta":{"content":"Hel"}}]}')
        writer.write(_head() + b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await asyncio.sleep(0.3)  # the client's response has started: frames go out directly
        rest = _sse(b'{"choices":[{"index":0,"delta":{"content":"lo"}}]}',
                    b'{"choices":[{"index":0,"delta":{"content":" you"},"finish_reason":"stop"}]}',
                    b"[DONE]")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        await writer.drain()

    upstream = await upstreams(two_reads)
    relay = await start_server(overrides=relay_overrides(upstream.url))
    port = int(relay.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    chunks, rest = [], raw.split(b"\r\n\r\n", 1)[1]
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        chunks.append(rest[:int(size, 16)])
        rest = rest[int(size, 16) + 2:]
    with_text = [c for c in chunks if b'"content"' in c]
    assert len(with_text) == 2, chunks  # "Hel" alone; "lo" and " you" together
    assert b'"lo"' in with_text[1] and b'" you"' in with_text[1]
