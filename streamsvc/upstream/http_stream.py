"""An HTTP/1.1 client connection that pushes each response's parts to a handler as they arrive.

The bytes the event loop reads go straight into ``httptools`` in
``data_received``; the parser's callbacks hand the status and headers, each
piece of body (decompressed when the upstream compressed it anyway) and the
end of the message to the :class:`ResponseHandler` of the request in flight.
Nothing is awaited per read: the upstream's tokens reach their Observable from
the event loop's own read callback (``streamsvc.upstream.client``).

A connection carries one request at a time; after a response that ended
complete with keep-alive allowed, ``streamsvc.upstream.pool`` keeps it for the
next request to the same origin.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from typing import NamedTuple, Protocol, cast

import httptools

__all__ = ["Connection", "Origin", "ResponseHandler", "open_connection"]


class Origin(NamedTuple):
    """Where a connection goes: connections are reused only for the same origin."""

    scheme: str
    host: str
    port: int


class ResponseHandler(Protocol):
    """What a request in flight is told about its response, in this order.

    ``head`` once, then ``body`` zero or more times, then either ``complete``
    (the message ended as its framing says) or ``lost`` (the connection ended,
    or could not be parsed, before that). None of them may raise.
    """

    def head(self, status: int, headers: dict[str, str]) -> None: ...

    def body(self, data: bytes) -> None: ...

    def complete(self) -> None: ...

    def lost(self, exc: BaseException | None) -> None: ...


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream origin, parsed with ``httptools``.

    ``received`` says whether any byte of the current response came (a reused
    connection that fails before one is worth one more try on a fresh one);
    ``reusable`` whether the last response ended complete with keep-alive.
    """

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0
        self.received = False
        self.reusable = False
        self._handler: ResponseHandler | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: dict[str, str] = {}
        self._status = 0
        self._framed = False
        self._inflate: zlib._Decompress | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self._handler is None or parser is None:
            self.close()  # idle: a server has nothing to say between responses
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lose(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost tells the handler

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser = None  # it refers back to us: no cycle left for the garbage collector
        handler, self._handler = self._handler, None
        if handler is None:
            return
        if self._status >= 200 and not self._framed:
            # Neither Content-Length nor chunked: the body runs until the server closes.
            self._flush(handler)
            handler.complete()
        else:
            handler.lost(exc)

    # httptools callbacks (they must not raise: httptools would wrap the error)

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        known = self._headers.get(key)
        self._headers[key] = text if known is None else f"{known}, {text}"

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:  # closed from inside this read
            return
        status = parser.get_status_code()
        headers, self._headers = self._headers, {}
        if status < 200:
            return  # an informational answer (100 Continue, 103): the real one follows
        self._status = status
        self._framed = ("content-length" in headers
                        or "chunked" in headers.get("transfer-encoding", "").lower())
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            # "deflate" is zlib-wrapped per the RFC; 32 + MAX_WBITS also takes gzip.
            self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)
        if self._handler is not None:
            self._handler.head(status, headers)

    def on_body(self, body: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        inflate = self._inflate
        if inflate is not None:
            try:
                body = inflate.decompress(body)
            except zlib.error as exc:
                self._lose(exc)
                return
            if not body:
                return
        handler.body(body)

    def on_message_complete(self) -> None:
        handler = self._handler
        if self._status < 200 or handler is None:
            return
        parser = self._parser
        if parser is None:
            return
        self.reusable = parser.should_keep_alive()
        self._flush(handler)
        if self._handler is not None:
            handler.complete()

    # used by the request in flight

    def send(self, request: bytes, handler: ResponseHandler) -> None:
        """Write one request; its response goes to ``handler``."""
        assert self._handler is None and self.transport is not None
        self._handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._headers = {}
        self._status = 0
        self._inflate = None
        self.received = self.reusable = False
        self.requests += 1
        self.transport.write(request)

    def detach(self) -> None:
        """The request in flight is done with this connection: later events go nowhere."""
        self._handler = None

    def pause(self) -> None:
        """Stop reading (backpressure): the socket's buffer fills and TCP slows the server."""
        if not self.closed and self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close at once (what is unread is dropped); the handler is told nothing more."""
        self._handler = None
        self.closed = True
        self._parser = None
        if self.transport is not None:
            self.transport.abort()

    def _lose(self, exc: BaseException) -> None:
        handler = self._handler
        self.close()
        if handler is not None:
            handler.lost(exc)

    def _flush(self, handler: ResponseHandler) -> None:
        inflate, self._inflate = self._inflate, None
        if inflate is not None:
            rest = inflate.flush()
            if rest:
                handler.body(rest)


async def open_connection(origin: Origin, ssl_context: ssl.SSLContext | None) -> Connection:
    """A new connection to ``origin`` (TLS with ``ssl_context`` for ``https``).

    Raises ``OSError`` (``ssl.SSLError`` included) when it cannot connect.
    """
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: Connection(origin), origin.host, origin.port,
        ssl=ssl_context, server_hostname=origin.host if ssl_context is not None else None,
    )
    return connection
