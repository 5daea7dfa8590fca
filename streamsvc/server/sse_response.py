"""The SSE response every stream endpoint writes to (aiohttp-sse underneath).

aiohttp-sse gives the headers (``text/event-stream``, ``Cache-Control:
no-cache``, ``X-Accel-Buffering: no``) and the heartbeat comment task. Frames
are written here as prepared bytes, several events per write, under a write
timeout: a write that fails or does not complete in time means the client is
gone (half-open connections are found this way).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from streamsvc.config import ServerConfig

__all__ = ["ClientGone", "SSEResponse"]


class ClientGone(Exception):
    """The client hung up, or stopped reading past the write timeout."""


class SSEResponse(EventSourceResponse):
    """An ``EventSourceResponse`` for any method, with a timed ``send_bytes``.

    Args:
        server: ``[server]``: heartbeat interval, write timeout, socket send buffer.
        headers: extra response headers (request and stream ids).
    """

    def __init__(self, server: ServerConfig, *, headers: Mapping[str, str]) -> None:
        super().__init__(
            headers=headers,
            sep="\n",
            allow_all_methods=True,
            send_timeout=server.write_timeout_s,
            ping_interval=server.heartbeat_s,
        )
        self._write_timeout_s = server.write_timeout_s
        self._send_buffer = server.send_buffer_bytes
        self._transport: asyncio.Transport | None = None  # set once the headers are out

    async def start(self, request: web.Request) -> None:
        """Send the headers now, before the first token."""
        if self._send_buffer and request.transport is not None:
            sock = request.transport.get_extra_info("socket")
            if sock is not None:
                # A small kernel buffer makes a slow client's backlog visible to
                # the relay (and its bound) instead of piling up in the kernel.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)
        try:
            await self.prepare(request)
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from exc
        self._transport = request.transport

    def write_now(self, data: bytes) -> bool:
        """Write prepared frames at once, without awaiting; False when that cannot be done.

        aiohttp's ``write`` is a coroutine, so a producer that is not a
        coroutine (an Observable's ``on_next``) would need a task of its own to
        call it: one more task switch per token. When the socket takes the data
        without waiting (its buffer is under the high-water mark), the chunk
        goes straight to the transport, framed as aiohttp frames a chunk.
        Otherwise the caller queues it for ``send_bytes``, which waits (with
        the write timeout), so order and backpressure stay as they were.
        """
        transport = self._transport
        if (
            transport is None
            or transport.is_closing()
            or not self.prepared
            or self.compression
            or transport.get_write_buffer_size() + len(data) > transport.get_write_buffer_limits()[1]
        ):
            return False
        if self.chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)
        return True

    async def send_bytes(self, data: bytes) -> None:
        """Write prepared frames; raises :class:`ClientGone` when the client is not there."""
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self.write(data)
        except TimeoutError as exc:
            self._abort()
            raise ClientGone("write timed out") from exc
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone(str(exc)) from exc

    async def close(self) -> None:
        """Stop the heartbeat task and end the body, within the write timeout.

        Ending the body waits for the socket to drain; a client that stopped
        reading would hold the handler forever, so past the timeout the
        connection is aborted instead.
        """
        if self._ping_task is not None:
            self.stop_streaming()
            await self.wait()
        if self.prepared:
            try:
                async with asyncio.timeout(self._write_timeout_s):
                    await self.write_eof()
            except (TimeoutError, ConnectionError, RuntimeError):
                self._abort()

    def _abort(self) -> None:
        """Drop the connection at once: the client is not reading (a half-open one, say)."""
        transport = self._req.transport if self._req is not None else None
        if transport is not None:
            transport.abort()
