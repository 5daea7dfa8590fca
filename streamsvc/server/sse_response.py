"""The SSE sink every stream endpoint writes to: one connection's event stream.

streamsvc owns this piece instead of patching aiohttp-sse's internals: it
needs writes that can be made from an Observable's ``on_next`` (no task per
token), a write timeout that tells a slow reader from a gone one, and a byte
count the access log can trust. Every byte goes through aiohttp's payload
writer (the response's own counted path); headers go out at once
(``text/event-stream``, ``Cache-Control: no-cache``, ``X-Accel-Buffering:
no``), heartbeat comments start with them.

The rule for a slow client: only a connection that makes no progress at all
(not one byte taken by the kernel) for ``write_timeout_s`` is gone. One that
reads slowly is waited for, however long the answer takes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

from streamsvc.config import ServerConfig
from streamsvc.reactive.write_batch import WriteBatch, loop_batch

__all__ = ["HEARTBEAT", "KEEP_BYTES", "ClientGone", "SSEResponse", "response_bytes"]

HEARTBEAT = b": ping\n\n"
KEEP_BYTES = 65536
"""Frames kept for the turn's batch past this size are written at once: a reader that
catches up in one turn then meets the connection's backpressure, not a growing list."""


class ClientGone(Exception):
    """The client hung up, or made no progress reading for the write timeout."""


def response_bytes(response: web.StreamResponse) -> int:
    """The body bytes a response handed to its connection, for the access log and metrics."""
    if isinstance(response, SSEResponse):
        return response.sent
    if isinstance(response, web.Response) and isinstance(response.body, bytes | bytearray):
        return len(response.body)
    return response.body_length


def _retrieve(done: asyncio.Future[None]) -> None:
    """A drain that failed after its writer gave up: the connection is gone, nothing to tell."""
    if not done.cancelled():
        done.exception()


class SSEResponse(web.StreamResponse):
    """A ``text/event-stream`` response for any method, written in prepared frames.

    Args:
        server: ``[server]``: heartbeat interval, write timeout, socket send buffer.
        headers: extra response headers (request and stream ids).
    """

    def __init__(self, server: ServerConfig, *, headers: Mapping[str, str]) -> None:
        super().__init__(status=200, headers=headers)
        self.content_type = "text/event-stream"
        self.headers["Cache-Control"] = "no-cache"
        self.headers["Connection"] = "keep-alive"
        self.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        self._heartbeat_s = server.heartbeat_s
        self._write_timeout_s = server.write_timeout_s
        self._send_buffer = server.send_buffer_bytes
        self._writer: StreamWriter | None = None
        self._transport: asyncio.Transport | None = None
        self._limits: tuple[int, int] | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._waiting = False
        self._kept: list[bytes] = []  # given this turn, written by the loop's batch
        self._kept_size = 0
        self._batch: WriteBatch | None = None
        self.sent = 0
        """Body bytes handed to the connection (what the access log reports)."""

    async def start(self, request: web.Request) -> None:
        """Send the headers now, before the first token; the heartbeat starts with them."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("the connection closed before the headers")
        if self._send_buffer:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # A small kernel buffer keeps a slow client's backlog in the relay, where
                # it is bounded and merged, instead of in the kernel.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)
        # Explicitly chunked: the length of an event stream is not known beforehand.
        self.enable_chunked_encoding()
        try:
            writer: AbstractStreamWriter | None = await self.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from exc
        if not isinstance(writer, StreamWriter) or not writer.chunked:
            raise RuntimeError("SSEResponse needs aiohttp's StreamWriter, chunked")
        self._writer = writer
        self._transport = transport
        self._batch = loop_batch()
        # The transport buffers nothing past what the kernel would not take at once:
        # a client's backlog waits in the stream's own bounded backlog, and a write
        # waits (``send``) until the previous one has wholly reached the kernel.
        self._limits = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        self._ping = asyncio.get_running_loop().call_later(self._heartbeat_s, self._heartbeat)

    def write_now(self, data: bytes) -> bool:
        """Take prepared frames from any callback; False when they must wait.

        They go out with the rest of this turn's frames for the connection, in
        one write at the end of the turn (``streamsvc.reactive.write_batch``).
        """
        transport = self._transport
        if (self._waiting or transport is None or transport.is_closing()
                or transport.get_write_buffer_size()):
            return False  # something waits before it (or the client is gone)
        if not data:
            return True
        kept = self._kept
        if not kept:
            assert self._batch is not None
            self._batch.add(self)
        kept.append(data)
        self._kept_size += len(data)
        if self._kept_size > KEEP_BYTES:
            self.flush_batch()
        return True

    def flush_batch(self) -> None:
        """Write what this turn kept, as one chunk of the chunked body (a client that left
        loses it, as any write to a closed connection)."""
        kept = self._kept
        if not kept:
            return
        self._kept = []
        self._kept_size = 0
        writer, transport = self._writer, self._transport
        if writer is None or transport is None or transport.is_closing():
            return
        # Framed here and written in one call: aiohttp's ``StreamWriter.write`` costs a
        # coroutine and three buffers per token. Its counts are kept, since the access
        # log reports ``output_size``. (No frame kept is empty: an empty chunk would end
        # the body.)
        data = b"".join(kept)  # one frame: join hands that same object back
        size = len(data)
        writer.buffer_size += size
        writer.output_size += size
        transport.write(b"%x\r\n%b\r\n" % (size, data))
        self.sent += size

    async def send(self, data: bytes) -> None:
        """Write prepared frames once the connection has taken what was written before.

        Raises :class:`ClientGone` when the client hung up, or took nothing for
        ``write_timeout_s`` (a reader that is slow but reading is waited for).
        """
        self.flush_batch()  # what was kept this turn goes first
        await self._until_drained()
        if data:
            self._kept.append(data)
            self.flush_batch()

    async def write_eof(self, data: bytes = b"") -> None:
        """End the body after what this turn kept, whoever ends it (aiohttp does after
        a handler that returned without :meth:`close`)."""
        self.flush_batch()
        await super().write_eof(data)

    async def close(self) -> None:
        """Stop the heartbeat and end the body once the client has the rest.

        A client that takes nothing more for ``write_timeout_s`` is cut
        (its connection aborted) instead of holding the handler forever.
        """
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        if self._writer is None or self._transport is None:
            return
        self.flush_batch()
        try:
            await self._until_drained()
            async with asyncio.timeout(self._write_timeout_s):
                await self.write_eof()
        except (ClientGone, TimeoutError, ConnectionError, RuntimeError):
            self._abort()
            return
        if self._limits is not None and not self._transport.is_closing():
            low, high = self._limits  # the connection may serve another request
            self._transport.set_write_buffer_limits(high=high, low=low)

    async def _until_drained(self) -> None:
        """Wait until the transport buffer is empty; gone when it shrinks not at all in time."""
        transport, writer = self._transport, self._writer
        if transport is None or writer is None:
            raise ClientGone("the response was not started")
        while True:
            if transport.is_closing():
                raise ClientGone("the connection closed")
            size = transport.get_write_buffer_size()
            if size == 0:
                return
            # One drain future per connection, never cancelled: aiohttp's protocol
            # shares one waiter between all drains, and a cancelled one would break it.
            if self._drain is None or self._drain.done():
                self._drain = asyncio.ensure_future(writer.drain())
                self._drain.add_done_callback(_retrieve)
            self._waiting = True
            try:
                await asyncio.wait((self._drain,), timeout=self._write_timeout_s)
            finally:
                self._waiting = False
            if self._drain.done():
                error = self._drain.exception()
                if error is not None:
                    raise ClientGone(str(error)) from error
            elif transport.get_write_buffer_size() >= size:
                self._abort()
                raise ClientGone(f"the client took nothing for {self._write_timeout_s:g} s")

    def _heartbeat(self) -> None:
        # A comment, so EventSource and the OpenAI SDKs ignore it; skipped while
        # frames are waiting anyway (they show the connection is alive).
        self.write_now(HEARTBEAT)
        if self._transport is not None and not self._transport.is_closing():
            self._ping = asyncio.get_running_loop().call_later(self._heartbeat_s, self._heartbeat)

    def _abort(self) -> None:
        """Drop the connection at once: the client is not reading (a half-open one, say)."""
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        self._kept = []
        self._kept_size = 0
        transport = self._transport
        if transport is not None:
            # What the transport still held never reached the client.
            self.sent = max(0, self.sent - transport.get_write_buffer_size())
            transport.abort()
