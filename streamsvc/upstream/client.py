"""OpenAI-compatible upstream client: one request, its chunks, its errors classified.

Runs on one shared ``aiohttp.ClientSession`` (the app's, or an embedded
caller's), else on a session of its own per request. The response body is
read in pieces of at most ``READ_BYTES`` into streamsvc's own SSE decoder (aiohttp's line
reader splits on LF only and fails on long lines). Faults that look like
success are raised as faults: an ``error`` object inside a 200 stream, an
``event: error`` SSE event, a body that ends (with or without ``[DONE]``)
before every choice it started has a finish reason, and a body left open after
``[DONE]`` (the stream ends at ``[DONE]`` and the connection is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec

from streamsvc.chunks import Chunk, SurrogateJoiner
from streamsvc.config import UpstreamConfig
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.reactive.backpressure import Valve
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.upstream.responses_api import ResponsesStream, responses_body

__all__ = ["UpstreamClient", "classify_status", "parse_retry_after"]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_MAX_ERROR_BODY = 16_384
# The largest upstream event accepted (a big tool-call chunk is well below it).
MAX_EVENT_BYTES = 8 * 1024 * 1024
# The most bytes taken from the upstream's buffered body at once: whatever has
# arrived, up to this (like iter_any), so that a stream whose client is slow
# never decodes hundreds of kilobytes in one step (the memory peak of a read).
READ_BYTES = 16_384


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
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


def _error_message(body: bytes) -> str:
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)  # {"error": {"message"}}, or the error object itself
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return body[:200].decode("utf-8", "replace")


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


def _well_formed(choices: Any) -> bool:
    """The shape every later step relies on: a list of choice objects."""
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(index, int) or (delta is not None and not isinstance(delta, dict)):
            return False
    return True


def classify_status(
    status: int, body: bytes, retry_after: float | None, upstream: str
) -> UpstreamError:
    """Map an upstream's non-200 answer to a typed error.

    408, 409, 429 and 5xx are retryable; other 4xx are not (the same request
    would fail again). 4xx that blame the request keep the upstream's message.
    """
    message = f"upstream {upstream!r} answered {status}: {_error_message(body)}"
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


class UpstreamClient:
    """Talks to one named OpenAI-compatible upstream.

    Args:
        name: the upstream's name in config (shown in errors and headers, never its key).
        config: its ``[upstreams.NAME]`` section.
        session: the shared ``ClientSession``, owned by the caller; None opens
            (and closes) a session per request, for embedded use.
        base_url: overrides ``config.base_url`` (used for the built-in simulator).
        api_key: overrides the key read from ``config.api_key_env``.
    """

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        session: aiohttp.ClientSession | None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._session = session
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

    def __repr__(self) -> str:
        return f"UpstreamClient({self.name!r}, {self._url!r})"

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

    async def _post(
        self, body: dict[str, Any], session: aiohttp.ClientSession, *, streaming: bool = False
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(self.config.read_timeout_s if streaming else None):
                response = await session.post(
                    self._url,
                    data=msgspec.json.encode(body),
                    headers=self._headers,
                    params=self.config.query or None,
                    timeout=self._stream_timeout if streaming else self._timeout,
                )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to upstream {self.name!r}: {exc.os_error}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError(
                f"upstream {self.name!r} did not answer in time",
                code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"request to upstream {self.name!r} failed: {_in_words(exc)}",
                code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
            ) from exc
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

    async def stream(
        self,
        body: dict[str, Any],
        *,
        on_open: Callable[[], None] | None = None,
        valve: Valve | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream a chat completion; yields chunks until ``[DONE]``.

        Always asks for ``stream_options.include_usage`` so the relay has usage;
        whether a client sees the usage chunk is decided by the caller.
        ``on_open`` runs once the upstream answered 200, before any chunk.
        While ``valve`` is closed nothing more is read from the upstream's
        socket (backpressure: its TCP window closes and the upstream waits).
        Closing the generator (or cancelling its task) closes the connection.
        """
        if self._responses:
            async with self._session_for_request() as session:
                async for chunk in self._stream_responses(
                    responses_body(body), session, on_open, valve
                ):
                    yield chunk
            return
        options = body.get("stream_options")
        body = {
            **body,
            "stream": True,
            "stream_options": {**(options if isinstance(options, dict) else {}),
                               "include_usage": True},
        }
        async with self._session_for_request() as session:
            async for chunk in self._stream(body, session, on_open, valve):
                yield chunk

    async def _events(
        self,
        response: aiohttp.ClientResponse,
        on_open: Callable[[], None] | None,
        valve: Valve | None,
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """The SSE events of a streamed body, for either API.

        Reads at most ``READ_BYTES`` at a time into the decoder, bounds an event
        at ``MAX_EVENT_BYTES``, waits while ``valve`` is closed (backpressure),
        maps the connection's failures and silence to typed errors, and closes
        the response when done (not ``release()``: a body left open or cut short
        must not go back to the pool). Ends normally at the end of the body.
        """
        decoder = SSEDecoder()
        undelivered = 0  # bytes read since the last whole event: bounds the decoder's buffer
        silence = _SilenceWatch(self.config.read_timeout_s, response.close, valve)
        try:
            if on_open is not None:
                on_open()
            async for data in response.content.iter_chunked(READ_BYTES):
                silence.last = time.monotonic()
                events = decoder.feed(data)
                undelivered = 0 if events else undelivered + len(data)
                if undelivered > MAX_EVENT_BYTES:
                    raise UpstreamError(
                        f"upstream {self.name!r} sent more than {MAX_EVENT_BYTES} bytes"
                        " without ending an event",
                        code=ErrorCode.UPSTREAM_ERROR,
                    )
                for event in events:
                    yield event
                if valve is not None and not valve.is_open:
                    await valve.wait_open()
                    silence.last = time.monotonic()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if silence.fired or isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
                raise self._silent() from exc
            raise UpstreamError(
                f"upstream {self.name!r} stopped mid-stream: {_in_words(exc)}",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            ) from exc
        finally:
            silence.cancel()
            response.close()
        if silence.fired:
            raise self._silent()

    async def _stream_responses(
        self,
        body: dict[str, Any],
        session: aiohttp.ClientSession,
        on_open: Callable[[], None] | None,
        valve: Valve | None,
    ) -> AsyncIterator[Chunk]:
        """A Responses API upstream's events, as chunks (``upstream/responses_api.py``)."""
        response = await self._post(body, session, streaming=True)
        translated = ResponsesStream(self.name)
        async with contextlib.aclosing(self._events(response, on_open, valve)) as events:
            async for event in events:
                try:
                    payload = msgspec.json.decode(event.data)
                except msgspec.DecodeError as exc:
                    raise UpstreamError(
                        f"upstream {self.name!r} sent a malformed event: {event.data[:80]!r}",
                        code=ErrorCode.UPSTREAM_ERROR, retryable=True,
                    ) from exc
                kind = payload.get("type") if isinstance(payload, dict) else None
                if not isinstance(kind, str):
                    continue
                for chunk in translated.event(kind, payload):
                    yield chunk
                if translated.ended:
                    return
        raise UpstreamError(
            f"upstream {self.name!r} ended the stream without a final event (truncated)",
            code=ErrorCode.UPSTREAM_ERROR, retryable=True,
        )

    async def _stream(
        self,
        body: dict[str, Any],
        session: aiohttp.ClientSession,
        on_open: Callable[[], None] | None,
        valve: Valve | None,
    ) -> AsyncIterator[Chunk]:
        response = await self._post(body, session, streaming=True)
        halves = SurrogateJoiner()  # an emoji split into "\ud83d" and "\ude42" chunks
        started: set[int] = set()  # the choices seen, and those of them that finished
        finished: set[int] = set()
        async with contextlib.aclosing(self._events(response, on_open, valve)) as events:
            async for event in events:
                if event.event == "error":  # what some servers send for a failure mid-stream
                    raise UpstreamError(
                        f"upstream {self.name!r} sent an error event mid-stream: "
                        f"{_error_message(event.data.encode())}",
                        code=ErrorCode.UPSTREAM_ERROR, retryable=True,
                    )
                if event.event not in ("message", ""):
                    continue  # not a chunk: OpenAI sends only default events
                text = event.data
                if text == "[DONE]":
                    # The end, whether or not the body closes; but not a normal one
                    # unless every choice finished.
                    self._check_finished(started, finished, "[DONE]")
                    return
                try:
                    chunk = halves.join(Chunk.from_json(text.encode()))
                except msgspec.DecodeError as exc:
                    raise UpstreamError(
                        f"upstream {self.name!r} sent a malformed chunk: {text[:80]!r}",
                        code=ErrorCode.UPSTREAM_ERROR, retryable=True,
                    ) from exc
                error = chunk.data.get("error")
                if error is not None:
                    raise UpstreamError(
                        f"upstream {self.name!r} reported an error mid-stream: "
                        f"{_error_message(msgspec.json.encode({'error': error}))}",
                        code=ErrorCode.UPSTREAM_ERROR, retryable=True,
                    )
                choices = chunk.data.get("choices", [])
                if not _well_formed(choices):
                    raise UpstreamError(
                        f"upstream {self.name!r} sent a chunk whose choices are not"
                        f" objects with an integer index and an object delta: {text[:80]!r}",
                        code=ErrorCode.UPSTREAM_ERROR, retryable=True,
                    )
                for choice in choices:
                    index = choice.get("index", 0)
                    started.add(index)
                    if choice.get("finish_reason") is not None:
                        finished.add(index)
                yield chunk
        self._check_finished(started, finished, "the end of its body")

    def _check_finished(self, started: set[int], finished: set[int], end: str) -> None:
        """A stream that ends with no finish reason (for every choice it began) was cut short."""
        if finished and started <= finished:
            return
        unfinished = sorted(started - finished)
        which = f" (choice {', '.join(map(str, unfinished))})" if finished else ""
        raise UpstreamError(
            f"upstream {self.name!r} came to {end} without a finish reason{which}: truncated",
            code=ErrorCode.UPSTREAM_ERROR, retryable=True,
        )

    def _silent(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name!r} sent nothing for {self.config.read_timeout_s:g} s",
            code=ErrorCode.IDLE_TIMEOUT, retryable=True,
        )


def _in_words(exc: BaseException) -> str:
    """What a foreign exception means, for a message a person reads (no class names)."""
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
    return "the connection failed"
