"""A streamed answer's body bytes -> checked chunks, with no I/O.

Both upstream transports (the push-driven connection, and a caller's
``aiohttp`` session) feed the bytes they read to one :class:`ChunkDecoder`,
which decodes the SSE events, turns them into chunks and raises a typed
``UpstreamError`` for every fault that looks like success: an ``error`` object
inside a 200 stream, an ``event: error``, a malformed chunk, choices not well
formed, an event longer than ``MAX_EVENT_BYTES``, and a stream that ends (at
``[DONE]`` or at the end of its body) before every choice it started has a
finish reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from streamsvc.chunks import Chunk, SurrogateJoiner
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.upstream.responses_api import ResponsesStream

__all__ = ["MAX_EVENT_BYTES", "ChunkDecoder", "error_message"]

_decode_json = msgspec.json.decode

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""The largest upstream event accepted (a big tool-call chunk is well below it)."""


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: dict[str, Any] | None = None
    finish_reason: Any = None


class _Shape(msgspec.Struct, gc=False):
    """What the checks need of a chunk: choice objects with an integer index and an object
    delta (or none), whether it reports an error, and its usage. msgspec checks that in C
    while it reads, which the checks in Python cost twice over (a chunk it refuses is read
    the slow way, which words the fault)."""

    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: Any = None
    error: Any = None


_decode_shape = msgspec.json.Decoder(_Shape).decode
_decode_text = msgspec.json.Decoder(str).decode
_encode_json = msgspec.json.encode

_PROBE = b'"streamsvc:probe"'
"""A string put where a learned template's text goes, to prove that it goes there."""
_LEARN_TRIES = 3
"""Text chunks a stream may try to learn its template from (an upstream that adds a field
that changes in every chunk never matches one, and then stops paying for the tries)."""


def _text_alone(choices: int, index: int, finish: object, delta: object,
                usage: object) -> str | None:
    """The text of a chunk that is nothing else (``Chunk.text``), from its one choice's
    ``index``, ``finish_reason`` and ``delta`` and its ``usage``; else None. The one rule
    both ways of reading a chunk apply."""
    if choices != 1 or index or finish is not None or usage is not None:
        return None
    if type(delta) is not dict or len(delta) != 1:
        return None
    content = delta.get("content")
    return content if type(content) is str else None


def error_message(body: bytes) -> str:
    """The message of an upstream's error body (its ``error.message``, else its text)."""
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


class ChunkDecoder:
    """Decodes one streamed answer, chunk by chunk, into ``emit``.

    Args:
        upstream: the upstream's name, for error messages.
        emit: called with each chunk, in order.
        responses: the body is a Responses API stream (``upstream/responses_api.py``),
            not chat-completion chunks.

    ``done`` turns True at the normal end (``[DONE]``, or the Responses API's
    final event): nothing after it is decoded. A caller that stops early sets it.
    """

    __slots__ = ("_decoder", "_emit", "_finished", "_halves", "_learn", "_name", "_prefix",
                 "_responses", "_started", "_suffix", "_texts", "_undelivered", "done")

    def __init__(self, upstream: str, emit: Callable[[Chunk], object], *,
                 responses: bool = False) -> None:
        self._name = upstream
        self._emit = emit
        self._decoder = SSEDecoder()
        self._undelivered = 0  # bytes fed since the last whole event: bounds the decoder's buffer
        self._responses = ResponsesStream(upstream) if responses else None
        self._halves = SurrogateJoiner()  # an emoji split into "\ud83d" and "\ude42" chunks
        self._started: set[int] = set()  # the choices seen, and those of them that finished
        self._finished: set[int] = set()
        # Whether the chunk before was text alone (or none came yet). msgspec reads such a
        # stream's chunks as a _Shape; a chunk that is not text would then be read twice, so
        # after one (a role, tool-call pieces) the next are read as dicts until text returns.
        self._texts = True
        # A text chunk's bytes around its text, the same in every such chunk of a stream
        # (the id, created, model, ...): see _learn_template.
        self._prefix = self._suffix = b""
        self._learn = _LEARN_TRIES
        self.done = False

    def feed(self, data: bytes) -> None:
        """Decode the next bytes of the body; raises ``UpstreamError`` for a fault."""
        if self._responses is None:
            payloads = self._decoder.feed_data(data)
            if payloads is not None:  # whole data-only events: their bytes, not decoded to text
                self._undelivered = 0
                for payload in payloads:
                    if self.done:
                        return
                    self._chat_data(payload, as_bytes=True)
                return
        events = self._decoder.feed(data)
        if not events:
            self._undelivered += len(data)
            if self._undelivered > MAX_EVENT_BYTES:
                raise UpstreamError(
                    f"upstream {self._name!r} sent more than {MAX_EVENT_BYTES} bytes"
                    " without ending an event",
                    code=ErrorCode.UPSTREAM_ERROR,
                )
            return
        self._undelivered = 0
        event_of = self._chat_event if self._responses is None else self._responses_event
        for event in events:
            if self.done:
                return
            event_of(event)

    def end(self) -> None:
        """The body ended; raises ``UpstreamError`` when the answer was cut short."""
        if self.done:
            return
        if self._responses is not None:
            raise UpstreamError(
                f"upstream {self._name!r} ended the stream without a final event (truncated)",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            )
        self._check_finished("the end of its body")
        self.done = True

    def _chat_event(self, event: ServerSentEvent) -> None:
        if event.event == "error":  # what some servers send for a failure mid-stream
            raise UpstreamError(
                f"upstream {self._name!r} sent an error event mid-stream: "
                f"{error_message(event.data.encode())}",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            )
        if event.event not in ("message", ""):
            return  # not a chunk: OpenAI sends only default events
        self._chat_data(event.data.encode(), as_bytes=False)

    def _chat_data(self, data: bytes, *, as_bytes: bool) -> None:
        """One default event's data: ``[DONE]``, or a chunk checked and emitted.

        ``as_bytes``: ``data`` was cut from the body undecoded, so it may hold
        invalid UTF-8, which reads as U+FFFD (what decoding the event as text
        does) rather than failing the chunk.
        """
        if data == b"[DONE]":
            # The end, whether or not the body closes; but not a normal one
            # unless every choice finished.
            self._check_finished("[DONE]")
            self.done = True
            return
        prefix = self._prefix
        if prefix and data.startswith(prefix) and data.endswith(self._suffix) \
                and not self._halves.held:
            # The template's bytes around one JSON string: a text chunk (see _learn_template),
            # which needs only its string read. What msgspec refuses as one string (a lone
            # surrogate, invalid UTF-8, more than one value, or the one or no byte left when
            # the prefix and suffix overlap) takes the usual path.
            try:
                text = _decode_text(data[len(prefix) - 1:len(data) - len(self._suffix) + 1])
            except msgspec.DecodeError:
                pass
            else:
                self._emit(Chunk.of_text(data, text))
                return
        if self._texts and not self._halves.held:
            try:
                shape = _decode_shape(data)
            except (msgspec.DecodeError, RecursionError):  # ValidationError included
                shape = None  # what the checks below word, or what only they accept
            if shape is not None and shape.error is None:
                self._chat_shape(shape, data)
                return
        try:
            parsed = _decode_json(data)
        except (msgspec.DecodeError, RecursionError):
            parsed = None
        try:
            # A whole object is what from_json gives; join has nothing to do while no
            # half is held (nearly every chunk): neither is called then.
            chunk = Chunk(parsed, data) if type(parsed) is dict else Chunk.from_json(data)
            if self._halves.held or chunk.raw is None:
                chunk = self._halves.join(chunk)
        except msgspec.DecodeError as exc:
            text = data.decode("utf-8", "replace")
            if as_bytes and text.encode() != data:
                self._chat_data(text.encode(), as_bytes=False)
                return
            raise UpstreamError(
                f"upstream {self._name!r} sent a malformed chunk: {text[:80]!r}",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            ) from exc
        error = chunk.data.get("error")
        if error is not None:
            raise UpstreamError(
                f"upstream {self._name!r} reported an error mid-stream: "
                f"{error_message(msgspec.json.encode({'error': error}))}",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            )
        choices = chunk.data.get("choices", [])
        if not isinstance(choices, list):
            raise self._malformed_choices(data)
        index, delta, finish = 0, None, None
        for choice in choices:
            # The shape every later step relies on (what _Shape checks), word by word.
            if not isinstance(choice, dict):
                raise self._malformed_choices(data)
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(index, int) or (delta is not None and not isinstance(delta, dict)):
                raise self._malformed_choices(data)
            self._started.add(index)
            finish = choice.get("finish_reason")
            if finish is not None:
                self._finished.add(index)
        alone = _text_alone(len(choices), index, finish, delta, chunk.data.get("usage"))
        if alone is not None:
            chunk.text = alone  # what _chat_shape marks, read from the dict
            self._texts = True
        self._emit(chunk)

    def _chat_shape(self, shape: _Shape, data: bytes) -> None:
        """A chunk whose shape msgspec has checked: counted, and emitted unparsed when it
        is text alone (nearly every chunk; ``Chunk.of_text``)."""
        choices = shape.choices
        index, delta, finish = 0, None, None
        for choice in choices:
            index = choice.index
            self._started.add(index)
            delta = choice.delta
            finish = choice.finish_reason
            if finish is not None:
                self._finished.add(index)
        text = _text_alone(len(choices), index, finish, delta, shape.usage)
        if text is not None:
            if self._learn:
                self._learn_template(data, text)
            self._emit(Chunk.of_text(data, text))
            return
        self._texts = False
        self._emit(Chunk(_decode_json(data), data))

    def _learn_template(self, data: bytes, text: str) -> None:
        """Keep the bytes around the text of ``data``, a text chunk, when they prove to be
        a template: the same bytes with any other JSON string there are a text chunk of that
        string. Nearly every chunk of a stream is one (only the text changes), and matching
        the bytes and reading the one string costs half of reading the chunk's shape.

        The proof: ``data`` with :data:`_PROBE` put in the place found must read as a text
        chunk of the probe's string. Swapping one JSON string for another changes no other
        part of a document, so every chunk that matches reads as a text chunk of its string
        (whatever else in it is a string equal to the text, or escaped another way).
        """
        self._learn -= 1
        literal = _encode_json(text)
        at = data.rfind(literal)  # the text comes after the id and the model
        if at < 0:
            return  # escaped otherwise than msgspec escapes it: the next text chunk may do
        prefix, suffix = data[:at + 1], data[at + len(literal) - 1:]
        try:
            probe = _decode_shape(prefix[:-1] + _PROBE + suffix[1:])
        except (msgspec.DecodeError, RecursionError):
            return
        choices = probe.choices
        if probe.error is not None or len(choices) != 1:
            return
        (choice,) = choices
        if _text_alone(1, choice.index, choice.finish_reason, choice.delta,
                       probe.usage) != _PROBE[1:-1].decode():
            return
        self._prefix, self._suffix = prefix, suffix

    def _malformed_choices(self, data: bytes) -> UpstreamError:
        return UpstreamError(
            f"upstream {self._name!r} sent a chunk whose choices are not"
            f" objects with an integer index and an object delta:"
            f" {data.decode('utf-8', 'replace')[:80]!r}",
            code=ErrorCode.UPSTREAM_ERROR, retryable=True,
        )

    def _responses_event(self, event: ServerSentEvent) -> None:
        assert self._responses is not None
        try:
            payload = msgspec.json.decode(event.data)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"upstream {self._name!r} sent a malformed event: {event.data[:80]!r}",
                code=ErrorCode.UPSTREAM_ERROR, retryable=True,
            ) from exc
        kind = payload.get("type") if isinstance(payload, dict) else None
        if not isinstance(kind, str):
            return
        for chunk in self._responses.event(kind, payload):
            self._emit(chunk)
        if self._responses.ended:
            self.done = True

    def _check_finished(self, end: str) -> None:
        """A stream that ends with no finish reason (for every choice it began) was cut short."""
        started, finished = self._started, self._finished
        if finished and started <= finished:
            return
        unfinished = sorted(started - finished)
        which = f" (choice {', '.join(map(str, unfinished))})" if finished else ""
        raise UpstreamError(
            f"upstream {self._name!r} came to {end} without a finish reason{which}: truncated",
            code=ErrorCode.UPSTREAM_ERROR, retryable=True,
        )
