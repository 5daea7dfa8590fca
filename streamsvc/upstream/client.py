"""OpenAI-compatible upstream client: one request, its chunks, its errors classified.

A streamed answer is a cold ``Observable[Chunk]`` (:meth:`UpstreamClient.chunks`):
each subscription sends one request on a connection of streamsvc's own
(``upstream/http_stream.py``, reused through ``upstream/pool.py``), and the
bytes the event loop reads go through ``httptools`` and the SSE decoder
(``upstream/decoding.py``) to ``observer.on_next`` from the connection's
``data_received``: one task per stream connects and sends, nothing is awaited
per token. Disposing the subscription closes the connection. While the
stream's valve is closed (its sink's backlog is full) the transport is paused.

Faults that look like success are raised as faults (``upstream/decoding.py``),
and a body left open after ``[DONE]`` ends the stream at ``[DONE]``; its
connection is then closed, never reused. An embedder's own ``ClientSession``
(``session`` with no ``pool``) carries its streams instead, read by a task
(its proxies and trace configs apply); ``models()`` always goes through aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import ssl
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Any

import aiohttp
import httptools
import msgspec
from reactivex import Observable, abc

from streamsvc.chunks import Chunk
from streamsvc.config import UpstreamConfig
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.reactive.backpressure import Valve
from streamsvc.reactive.bridge import ObservableIterator, from_async_iterable
from streamsvc.reactive.direct import DirectObservable
from streamsvc.upstream.decoding import MAX_EVENT_BYTES, ChunkDecoder, error_message
from streamsvc.upstream.http_stream import Connection, Origin, open_connection
from streamsvc.upstream.pool import ConnectionPool
from streamsvc.upstream.responses_api import responses_body

__all__ = ["MAX_EVENT_BYTES", "UpstreamClient", "classify_status", "parse_retry_after"]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_MAX_ERROR_BODY = 16_384
# The most bytes decoded at once (what one read brings may be more), so that a
# stream whose client is slow stops within this much once its valve closes.
READ_BYTES = 16_384
# How long a connection may take, after [DONE], to end its body: complete, it is
# kept for reuse; still open then, it is closed (a body left open after [DONE]).
DONE_GRACE_S = 1.0


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    ``headers``: a case-insensitive mapping, or a dict with lower-case keys.
    """
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _SilenceWatch:
    """Calls ``on_silence`` once nothing was read for ``seconds``.

    The reader notes the time of each read in ``last``; the one timer, when
    it fires early, is re-armed for the time that is left. So a stream costs
    one timer per ``seconds``, not one per read. While ``valve`` is closed
    the silence is the relay's own doing (its client is slow), not the
    upstream's, and does not count.
    """

    __slots__ = ("_handle", "_on_silence", "_seconds", "_valve", "fired", "last")

    def __init__(
        self, seconds: float, on_silence: Callable[[], object], valve: Valve | None = None
    ) -> None:
        self._seconds = seconds
        self._on_silence = on_silence
        self._valve = valve
        self.last = time.monotonic()
        self.fired = False
        self._handle = asyncio.get_running_loop().call_later(seconds, self._check)

    def _check(self) -> None:
        if self._valve is not None and not self._valve.is_open:
            self.last = time.monotonic()
        waited = time.monotonic() - self.last
        if waited < self._seconds:
            self._handle = asyncio.get_running_loop().call_later(
                self._seconds - waited, self._check
            )
            return
        self.fired = True
        self._on_silence()

    def cancel(self) -> None:
        self._handle.cancel()


def classify_status(
    status: int, body: bytes, retry_after: float | None, upstream: str
) -> UpstreamError:
    """Map an upstream's non-200 answer to a typed error.

    408, 409, 429 and 5xx are retryable; other 4xx are not (the same request
    would fail again). 4xx that blame the request keep the upstream's message.
    """
    message = f"upstream {upstream!r} answered {status}: {error_message(body)}"
    if status == 429:
        return UpstreamError(
            message, code=ErrorCode.RATE_LIMITED, retryable=True,
            retry_after=retry_after, upstream_status=status,
        )
    if status in _RETRYABLE_STATUS or status >= 500:
        return UpstreamError(
            message, code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            retry_after=retry_after, upstream_status=status,
        )
    if status in (400, 404, 413, 422):
        error = UpstreamError(message, code=ErrorCode.BAD_REQUEST, upstream_status=status)
        error.status = 400 if status != 413 else 413
        return error
    return UpstreamError(message, code=ErrorCode.UPSTREAM_ERROR, upstream_status=status)


def _header_block(headers: dict[str, str]) -> bytes:
    """``Name: value`` lines; a name or value that would break the framing is refused."""
    lines = []
    for name, value in headers.items():
        if any(c in name for c in "\r\n\0:") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"upstream header {name!r}: CR, LF and NUL are not allowed")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode()


class UpstreamClient:
    """Talks to one named OpenAI-compatible upstream.

    Args:
        name: the upstream's name in config (shown in errors and headers, never its key).
        config: its ``[upstreams.NAME]`` section.
        session: a ``ClientSession`` owned by the caller, for ``models()``; with no
            ``pool`` it also carries the streams (an embedder's session). None:
            ``models()`` opens (and closes) a session per call.
        pool: the idle connections streams reuse, owned by the caller (the app's);
            None: each stream opens a connection of its own and closes it at its end.
        base_url: overrides ``config.base_url`` (used for the built-in simulator).
        api_key: overrides the key read from ``config.api_key_env``.
    """

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        session: aiohttp.ClientSession | None,
        *,
        pool: ConnectionPool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._session = session
        self._pool = pool
        self._base = (base_url or config.base_url).rstrip("/")
        self._responses = config.api == "responses"
        self._url = self._base + ("/responses" if self._responses else "/chat/completions")
        headers = {"Content-Type": "application/json", **config.headers}
        key = api_key or config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )
        # Streams watch silence with a _SilenceWatch instead: aiohttp's sock_read
        # re-arms a timer on every read, i.e. once per token.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=None
        )
        self._origin, self._request_head = self._request_line(headers)
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, {self._url!r})"

    def _request_line(self, headers: dict[str, str]) -> tuple[Origin, bytes]:
        """The origin to connect to, and the request's head up to its Content-Length."""
        url = urllib.parse.urlsplit(self._url)
        host = url.hostname or ""
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
        https = url.scheme == "https"
        origin = Origin(url.scheme, host, url.port or (443 if https else 80))
        target = urllib.parse.quote(url.path or "/", safe="/%:@!$&'()*+,;=~")
        query = "&".join(q for q in (url.query, urllib.parse.urlencode(self.config.query)) if q)
        if query:
            target += "?" + query
        authority = f"[{host}]" if ":" in host else host
        if url.port is not None:
            authority += f":{url.port}"
        fields = {"Host": authority, "User-Agent": "streamsvc", "Accept": "*/*",
                  # Decoding a compressed stream costs CPU per token: ask for none.
                  "Accept-Encoding": "identity"}
        for name, value in headers.items():  # the config's headers win, whatever their case
            for known in [k for k in fields if k.lower() == name.lower()]:
                del fields[known]
            fields[name] = value
        head = f"POST {target} HTTP/1.1\r\n".encode() + _header_block(fields)
        return origin, head

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._origin.scheme != "https":
            return None
        if self._ssl is None:
            # Made once per client: loading the CA store takes milliseconds.
            self._ssl = ssl.create_default_context()
        return self._ssl

    @contextlib.asynccontextmanager
    async def _session_for_request(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The shared session, or (embedded use) one opened and closed for this request."""
        if self._session is not None:
            yield self._session
            return
        async with aiohttp.ClientSession() as session:
            yield session

    async def models(self) -> list[str]:
        """The model ids the upstream lists at ``GET /models`` (its OpenAI list shape)."""
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        try:
            async with self._session_for_request() as session, session.get(
                self._base + "/models", headers=headers, params=self.config.query or None,
                timeout=aiohttp.ClientTimeout(total=self.config.connect_timeout_s),
            ) as response:
                if response.status != 200:
                    raise classify_status(
                        response.status, await response.content.read(_MAX_ERROR_BODY),
                        parse_retry_after(response.headers), self.name,
                    )
                listing = msgspec.json.decode(await response.read())
        except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError) as exc:
            raise UpstreamError(
                f"upstream {self.name!r} did not list its models: {_in_words(exc)}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
            ) from exc
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            return []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _payload(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request body the upstream gets: a Responses API body, or the chat body with
        ``stream`` and ``stream_options.include_usage`` forced."""
        if self._responses:
            return responses_body(body)
        options = body.get("stream_options")
        return {
            **body,
            "stream": True,
            "stream_options": {**(options if isinstance(options, dict) else {}),
                               "include_usage": True},
        }

    def chunks(
        self,
        body: dict[str, Any],
        *,
        on_start: Callable[[], None] | None = None,
        on_open: Callable[[], None] | None = None,
        valve: Valve | None = None,
    ) -> Observable[Chunk]:
        """A streamed chat completion as a cold Observable: each subscription is one request.

        Always asks for ``stream_options.include_usage`` so the relay has usage;
        whether a client sees the usage chunk is decided by the caller.
        ``on_start`` runs at each subscription; ``on_open`` once the upstream
        answered 200, before any chunk. While ``valve`` is closed nothing more is
        read from the upstream's socket (backpressure: its TCP window closes and
        the upstream waits). Disposing the subscription closes the connection.

        Example::

            client.chunks(body).subscribe(print, scheduler=AsyncIOScheduler(loop))
        """
        payload = self._payload(body)
        if self._pool is None and self._session is not None:
            session = self._session

            def through_session() -> AsyncIterator[Chunk]:
                if on_start is not None:
                    on_start()
                return self._session_chunks(payload, session, on_open, valve)

            return from_async_iterable(through_session)
        content = msgspec.json.encode(payload)
        request = self._request_head + b"Content-Length: %d\r\n\r\n" % len(content) + content

        # The exchange keeps the observer grammar itself, and is its own disposable.
        return DirectObservable(_Request(self, request, on_start, on_open, valve).subscribe)

    async def stream(
        self,
        body: dict[str, Any],
        *,
        on_open: Callable[[], None] | None = None,
        valve: Valve | None = None,
    ) -> AsyncIterator[Chunk]:
        """The chunks of :meth:`chunks`, for async code; yields until ``[DONE]``.

        Without a ``valve`` of the caller's, the upstream is held back while the
        consumer works through what came (so a slow consumer slows the upstream
        instead of piling chunks up). Closing the generator closes the connection.
        """
        gate = valve if valve is not None else Valve()
        async with ObservableIterator(self.chunks(body, on_open=on_open, valve=gate)) as batches:
            async for batch in batches:
                if valve is None:
                    gate.close()
                for chunk in batch:
                    yield chunk
                if valve is None:
                    gate.open()

    async def _post(
        self, body: dict[str, Any], session: aiohttp.ClientSession
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                response = await session.post(
                    self._url,
                    data=msgspec.json.encode(body),
                    headers=self._headers,
                    params=self.config.query or None,
                    timeout=self._stream_timeout,
                )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to upstream {self.name!r}: {exc.os_error}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._no_answer() from exc
        except aiohttp.ClientError as exc:
            raise self._request_failed(exc) from exc
        if response.status != 200:
            try:
                body_bytes = await response.content.read(_MAX_ERROR_BODY)
            except (TimeoutError, aiohttp.ClientError):
                body_bytes = b""
            finally:
                response.release()
            raise classify_status(
                response.status, body_bytes, parse_retry_after(response.headers), self.name
            )
        return response

    async def _session_chunks(
        self,
        payload: dict[str, Any],
        session: aiohttp.ClientSession,
        on_open: Callable[[], None] | None,
        valve: Valve | None,
    ) -> AsyncIterator[Chunk]:
        """The chunks of one request through a caller's session (a task reads them).

        Waits while ``valve`` is closed; closes the response when done (not
        ``release()``: a body left open or cut short must not go back to its pool).
        """
        response = await self._post(payload, session)
        pending: list[Chunk] = []
        decoder = ChunkDecoder(self.name, pending.append, responses=self._responses)
        silence = _SilenceWatch(self.config.read_timeout_s, response.close, valve)
        try:
            if on_open is not None:
                on_open()
            async for data in response.content.iter_chunked(READ_BYTES):
                silence.last = time.monotonic()
                failure: UpstreamError | None = None
                try:
                    decoder.feed(data)
                except UpstreamError as error:
                    failure = error  # after the chunks that came before it
                for chunk in pending:
                    yield chunk
                pending.clear()
                if failure is not None:
                    raise failure
                if decoder.done:
                    return
                if valve is not None and not valve.is_open:
                    await valve.wait_open()
                    silence.last = time.monotonic()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if silence.fired or isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
                raise self._silent() from exc
            raise self._cut(exc) from exc
        finally:
            silence.cancel()
            response.close()
        if silence.fired:
            raise self._silent()
        decoder.end()

    def _silent(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name!r} sent nothing for {self.config.read_timeout_s:g} s",
            code=ErrorCode.IDLE_TIMEOUT, retryable=True,
        )

    def _no_answer(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name!r} did not answer in time",
            code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True,
        )

    def _request_failed(self, exc: BaseException | None) -> UpstreamError:
        return UpstreamError(
            f"request to upstream {self.name!r} failed: {_in_words(exc)}",
            code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
        )

    def _cut(self, exc: BaseException | None) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name!r} stopped mid-stream: {_in_words(exc, mid_body=True)}",
            code=ErrorCode.UPSTREAM_ERROR, retryable=True,
        )


class _State(Enum):
    CONNECTING = "connecting"
    SENT = "sent"  # the request went out; no status line yet
    STREAMING = "streaming"  # 200: the body goes to the observer
    ERROR_BODY = "error body"  # another status: its body is read for the message
    DRAINING = "draining"  # the answer is whole; waiting for its body's end, to reuse it
    ENDED = "ended"


class _Request:
    """One request of :meth:`UpstreamClient.chunks`; each subscription to it is an
    :class:`_Exchange`. An object, not a closure over its five values: the Observable
    lives as long as its stream, and each cell of a closure is one more object for
    every collection of the garbage collector to walk."""

    __slots__ = ("client", "on_open", "on_start", "request", "valve")

    def __init__(
        self, client: UpstreamClient, request: bytes, on_start: Callable[[], None] | None,
        on_open: Callable[[], None] | None, valve: Valve | None,
    ) -> None:
        self.client = client
        self.request = request
        self.on_start = on_start
        self.on_open = on_open
        self.valve = valve

    def subscribe(
        self, observer: abc.ObserverBase[Chunk], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        if self.on_start is not None:
            self.on_start()
        exchange = _Exchange(self.client, self.request, observer, self.on_open, self.valve)
        exchange.start()
        return exchange


class _Exchange(abc.DisposableBase):
    """One subscription's request: the connection's ``ResponseHandler`` and its observer's source.

    The connection calls it from ``data_received``; it decodes and emits there.
    It is the subscription's disposable (``dispose`` closes the connection; once
    the exchange has ended it does nothing, so a second call is harmless).
    """

    __slots__ = ("_client", "_connection", "_decoder", "_end", "_error_body", "_grace",
                 "_held", "_loop", "_observer", "_on_open", "_paused", "_request",
                 "_retried", "_retry_after", "_silence", "_state", "_status", "_task",
                 "_valve")

    def __init__(
        self,
        client: UpstreamClient,
        request: bytes,
        observer: abc.ObserverBase[Chunk],
        on_open: Callable[[], None] | None,
        valve: Valve | None,
    ) -> None:
        self._client = client
        self._request = request
        self._observer = observer
        self._on_open = on_open
        self._valve = valve
        self._loop = asyncio.get_running_loop()
        self._state = _State.CONNECTING
        self._connection: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._silence: _SilenceWatch | None = None
        self._grace: asyncio.TimerHandle | None = None
        # After a dispose the observer ignores on_next: no check of our own per token.
        self._decoder = ChunkDecoder(client.name, observer.on_next, responses=client._responses)
        self._status = 0
        self._error_body = bytearray()
        self._retry_after: float | None = None
        self._held = b""  # body bytes not decoded yet: they came while the valve was closed
        self._end: Callable[[], None] | None = None  # the body's end, come while bytes were held
        self._paused = False
        self._retried = False

    def start(self) -> None:
        client = self._client
        pool = client._pool
        connection = pool.take(client._origin) if pool is not None else None
        if connection is None:
            self._task = self._loop.create_task(self._connect())
        else:  # a kept-alive connection: the request goes out now, with no task step
            self._send(connection)

    async def _connect(self) -> None:
        """Open a new connection, then send (a failure goes to the observer)."""
        client = self._client
        try:
            async with asyncio.timeout(client.config.connect_timeout_s):
                connection = await open_connection(client._origin, client._ssl_context())
        except TimeoutError as exc:
            self._fail(_caused(client._no_answer(), exc))
            return
        except OSError as exc:
            self._fail(_caused(UpstreamError(
                f"cannot connect to upstream {client.name!r}: {exc}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
            ), exc))
            return
        except Exception as exc:  # noqa: BLE001 - a task's failure would otherwise go unseen
            self._fail(exc)
            return
        # Done with: the task, its coroutine and context need not live as long as the stream.
        self._task = None
        if self._state is not _State.CONNECTING:  # disposed meanwhile
            connection.close()
            return
        self._send(connection)

    def _send(self, connection: Connection) -> None:
        self._connection = connection
        self._state = _State.SENT
        if self._silence is None:
            # One watch from here on: no status line in time is upstream_timeout,
            # silence in the body idle_timeout.
            self._silence = _SilenceWatch(self._client.config.read_timeout_s, self._silent,
                                          self._valve)
        else:
            self._silence.last = time.monotonic()
        connection.send(self._request, self)

    # ResponseHandler

    def head(self, status: int, headers: dict[str, str]) -> None:
        if self._state is not _State.SENT:
            return
        if status != 200:
            self._state = _State.ERROR_BODY
            self._status = status
            self._retry_after = parse_retry_after(headers)
            return
        self._state = _State.STREAMING
        if self._silence is not None:
            self._silence.last = time.monotonic()
        if self._on_open is not None:
            try:
                self._on_open()
            except Exception as exc:  # noqa: BLE001 - every failure goes to the observer
                self._fail(exc)

    def body(self, data: bytes) -> None:
        state = self._state
        if state is _State.STREAMING:
            assert self._silence is not None
            self._silence.last = time.monotonic()
            if self._held:
                self._held += data  # in order: after what already waits for the valve
            else:
                self._decode(data)
        elif state is _State.ERROR_BODY:
            self._error_body += data[:_MAX_ERROR_BODY - len(self._error_body)]
            if len(self._error_body) >= _MAX_ERROR_BODY:
                self._fail_status()

    def complete(self) -> None:
        state = self._state
        if state is _State.STREAMING:
            if self._held:
                self._end = self.complete
                return
            self._release()
            try:
                self._decoder.end()
            except UpstreamError as error:
                self._fail(error)
                return
            self._state = _State.ENDED
            self._stop()
            self._observer.on_completed()
        elif state is _State.ERROR_BODY:
            self._release()
            self._fail_status()
        elif state is _State.DRAINING:
            self._state = _State.ENDED
            self._release()
            self._stop()

    def lost(self, exc: BaseException | None) -> None:
        state = self._state
        if state is _State.STREAMING and self._held:
            self._end = functools.partial(self.lost, exc)
            return
        connection, self._connection = self._connection, None
        if state is _State.SENT:
            if (connection is not None and connection.requests > 1
                    and not connection.received and not self._retried):
                # A kept-alive connection the server had closed meanwhile: once more, anew.
                self._retried = True
                self._state = _State.CONNECTING
                self._task = self._loop.create_task(self._connect())
                return
            self._fail(_caused(self._client._request_failed(exc), exc))
        elif state is _State.ERROR_BODY:
            self._fail_status()
        elif state is _State.STREAMING:
            self._fail(_caused(self._client._cut(exc), exc))
        elif state is _State.DRAINING:
            self._state = _State.ENDED
            self._stop()

    # the rest

    def _decode(self, data: bytes) -> None:
        """Decode ``data`` into the observer; stop (and hold the rest) once the valve closes."""
        decoder = self._decoder
        valve = self._valve
        try:
            for start in range(0, len(data), READ_BYTES):
                decoder.feed(data if len(data) <= READ_BYTES else data[start:start + READ_BYTES])
                if self._state is not _State.STREAMING:
                    return
                if decoder.done:
                    self._done()
                    return
                if valve is not None and not valve.is_open:
                    self._held = data[start + READ_BYTES:]
                    self._pause()
                    return
        except Exception as exc:  # noqa: BLE001 - the observer's own failures too, as before
            self._fail(exc)

    def _pause(self) -> None:
        assert self._valve is not None and self._connection is not None
        if not self._paused:
            self._paused = True
            self._connection.pause()
        # The sink opens the valve from inside its own write: go on in a callback of our own.
        self._valve.when_open(functools.partial(self._loop.call_soon, self._resume))

    def _resume(self) -> None:
        if self._state is not _State.STREAMING:
            return
        held, self._held = self._held, b""
        if held:
            self._decode(held)
            if self._state is not _State.STREAMING or self._held:
                return
        valve = self._valve
        if valve is not None and not valve.is_open:
            self._pause()
            return
        end, self._end = self._end, None
        if end is not None:
            end()
            return
        self._paused = False
        if self._connection is not None:
            self._connection.resume()

    def _done(self) -> None:
        """``[DONE]`` (or the final event): the answer is whole, whatever the body does next."""
        self._state = _State.DRAINING
        self._unwatch()
        if self._valve is not None:
            self._valve.when_open(None)
        if self._end is not None:  # the body had ended already
            end, self._end = self._end, None
            end()
        elif self._connection is not None:
            if self._paused:
                self._paused = False
                self._connection.resume()
            self._grace = self._loop.call_later(DONE_GRACE_S, self._left_open)
        self._observer.on_completed()

    def _left_open(self) -> None:
        if self._state is _State.DRAINING:
            self._state = _State.ENDED
            self._stop()

    def _silent(self) -> None:
        state = self._state
        if state is _State.SENT:
            self._fail(self._client._no_answer())
        elif state is _State.ERROR_BODY:
            self._fail_status()
        elif state is _State.STREAMING:
            self._fail(self._client._silent())

    def _fail_status(self) -> None:
        self._fail(classify_status(
            self._status, bytes(self._error_body), self._retry_after, self._client.name))

    def _fail(self, error: Exception) -> None:
        if self._state in (_State.ENDED, _State.DRAINING):
            return
        self._state = _State.ENDED
        self._decoder.done = True
        self._stop()
        self._observer.on_error(error)

    def _release(self) -> None:
        """Give the connection back to the pool when its response allows it, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        pool = self._client._pool
        if pool is not None and connection.reusable and not connection.closed:
            if self._paused:
                self._paused = False
                connection.resume()
            pool.put(connection)
        else:
            connection.close()

    def _unwatch(self) -> None:
        # The watch calls back a method of ours: dropped, not only cancelled, so
        # that no cycle is left for the garbage collector when the stream ends.
        silence, self._silence = self._silence, None
        if silence is not None:
            silence.cancel()

    def _stop(self) -> None:
        self._unwatch()
        if self._grace is not None:
            self._grace.cancel()
        if self._paused and self._valve is not None:
            self._valve.when_open(None)
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def dispose(self) -> None:
        """The subscriber left: close the connection (unless the answer is already whole)."""
        if self._state in (_State.ENDED, _State.DRAINING):
            return
        self._state = _State.ENDED
        self._decoder.done = True
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._stop()


def _caused(error: UpstreamError, exc: BaseException | None) -> UpstreamError:
    """``error`` with ``exc`` as its cause, as ``raise error from exc`` would have it."""
    error.__cause__ = exc
    return error


def _in_words(exc: BaseException | None, *, mid_body: bool = False) -> str:
    """What a foreign exception means, for a message a person reads (no class names).

    ``mid_body``: the connection failed inside the body (None: it just closed).
    """
    if isinstance(exc, httptools.HttpParserError):
        return f"its response could not be read ({exc})"
    if isinstance(exc, zlib.error):
        return "its compressed body could not be read"
    if exc is None:
        if mid_body:
            return "the connection closed before the answer was complete"
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the answer was complete"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the upstream closed the connection"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"a network error ({exc.strerror or 'the connection failed'})"
    if isinstance(exc, aiohttp.InvalidURL):
        return "its URL is not valid"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"its response could not be read ({exc.message})"
    if isinstance(exc, TimeoutError):
        return "it did not answer in time"
    if isinstance(exc, msgspec.DecodeError):
        return "its answer is not JSON"
    if isinstance(exc, OSError):
        return f"a network error ({exc.strerror or 'the connection failed'})"
    return "the connection failed"
