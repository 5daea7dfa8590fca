"""Server-Sent Events: an incremental decoder and the encoders, with no I/O.

Both sides follow the WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in LF, CR or CR+LF and nothing else; one leading BOM is dropped;
``data`` lines are joined with LF; the last event id persists across events;
an event left incomplete at the end of the stream is discarded, not dispatched.

The I/O layers feed raw body bytes to :class:`SSEDecoder` (from aiohttp's
``iter_any()``, never its line iterator) and write what the ``encode_*``
functions return.

Where this departs from what a browser shows: :attr:`ServerSentEvent.id` is
``None`` until the stream first sends an ``id`` field (a browser shows ``""``
for both), and :attr:`ServerSentEvent.retry` carries the ``retry`` value of
the event's own block, which a browser keeps to itself.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = [
    "SSEDecoder",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "retry_field",
]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event.

    Args:
        event: the event type; ``"message"`` when the block set none.
        data: the ``data`` lines of the block joined with LF.
        id: the last event id in force at dispatch (it persists across
            events); ``None`` while the stream has never sent one.
        retry: the ``retry`` value seen in this event's block, else ``None``.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Turns a byte stream into :class:`ServerSentEvent` objects, chunk by chunk.

    Chunks may be cut anywhere: inside a UTF-8 sequence, between CR and LF,
    mid-field. Each chunk is scanned once; a long line arriving in many
    chunks is joined once, when its end arrives.

    Example::

        >>> decoder = SSEDecoder()
        >>> decoder.feed(b"event: delta\\ndata: he")
        []
        >>> decoder.feed(b"llo\\n\\n")
        [ServerSentEvent(event='delta', data='hello', id=None, retry=None)]
        >>> decoder.pending
        False
    """

    __slots__ = (
        "_at_start",
        "_cr_pending",
        "_data",
        "_decoder",
        "_event_type",
        "_id_buffer",
        "_last_event_id",
        "_partial",
        "_resting",
        "_retry",
        "_retry_buffer",
    )

    def __init__(self) -> None:
        # errors="replace": the spec decodes with UTF-8 decode, which turns
        # invalid bytes into U+FFFD rather than failing the stream.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self._cr_pending = False
        self._partial: list[str] = []
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer: str | None = None
        self._last_event_id: str | None = None
        self._retry_buffer: int | None = None
        self._retry: int | None = None
        self._resting = True

    @property
    def pending(self) -> bool:
        """Whether a partial line or an undispatched ``data`` buffer is held.

        True at the end of a stream means the body was cut short: per the
        spec the incomplete event is discarded, so the caller decides.
        """
        return bool(self._partial or self._data or self._decoder.getstate()[0])

    @property
    def last_event_id(self) -> str | None:
        """The id to resume from (``Last-Event-ID``): set at each blank line,
        dispatched or not; ``None`` while the stream has never sent an id."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The stream's reconnection time in ms, from the last valid ``retry``
        field (also from blocks that dispatch nothing); ``None`` if none came."""
        return self._retry

    def feed_data(self, chunk: bytes) -> list[bytes] | None:
        """The ``data`` bytes of each event, when ``chunk`` is whole one-line ``data:`` events.

        The shape nearly every upstream read has (``data: {...}\\n\\n``, one
        or more, LF only): its events are cut from the bytes as they came, with
        no text decoding and no :class:`ServerSentEvent`, and the decoder's state
        stays what it was (nothing is pending, no id or retry changes). Returns
        None, having consumed nothing, for anything else (a partial event,
        another field, a comment, a CR, held state): :meth:`feed` it then.
        The data is not checked as UTF-8: a caller that decodes it must treat
        invalid bytes as :meth:`feed` does (U+FFFD).
        """
        if (not self._resting or not chunk.startswith(b"data: ")
                or not chunk.endswith(b"\n\n") or b"\r" in chunk):
            return None
        self._at_start = False  # no BOM: the stream goes on with "data: "
        if chunk.find(b"\n") == len(chunk) - 2:  # one event, the common read
            # At each blank line the last event id is set from the id buffer: unchanged.
            self._last_event_id = self._id_buffer
            return [chunk[6:-2]]
        parts = chunk[:-2].split(b"\n\n")
        for part in parts:
            # One data line per event: a second line (of any field) is feed()'s to read.
            if not part.startswith(b"data: ") or b"\n" in part:
                return None
        self._last_event_id = self._id_buffer
        return [part[6:] for part in parts]

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode ``chunk`` and return the events it completes, in order.

        Args:
            chunk: the next bytes of the stream, cut at any byte.

        Returns:
            The events dispatched by the blank lines in this chunk; often empty.
        """
        events = self._feed(chunk)
        # Whether nothing is held between events: feed_data's condition, kept
        # here so that the per-read fast path checks one flag.
        self._resting = not (self._partial or self._data or self._cr_pending
                             or self._event_type or self._retry_buffer is not None
                             or self._decoder.getstate()[0])
        return events

    def _feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            # "One leading U+FEFF BYTE ORDER MARK character must be ignored if
            # any are present": one only, so a second BOM stays in the line.
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._cr_pending:
            self._cr_pending = False
            # The previous chunk ended in CR, which already ended a line; an
            # LF here completes that CR+LF pair and is not a line of its own.
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            self._cr_pending = text[-1] == "\r"
            # CR+LF, then a lone CR, become LF; the only line ends are these
            # three (str.splitlines() would also split on U+2028, U+0085, ...).
            text = text.replace("\r\n", "\n").replace("\r", "\n")

        lines = text.split("\n")
        tail = lines.pop()
        if not lines:
            # No line end in this chunk: keep the piece, join it once the line ends.
            self._partial.append(tail)
            return []
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = "".join(self._partial)
            self._partial = []
        if tail:
            self._partial.append(tail)
        return self._process(lines)

    def _process(self, lines: list[str]) -> list[ServerSentEvent]:
        # State in locals on the hot path; written back once at the end.
        events: list[ServerSentEvent] = []
        data = self._data
        event_type = self._event_type
        id_buffer = self._id_buffer
        retry_buffer = self._retry_buffer
        for line in lines:
            if not line:
                # Blank line: dispatch. The last event id is set first, even
                # when the block has no data, and the id buffer is not reset.
                self._last_event_id = id_buffer
                if data:
                    # Joining with LF is "append value + LF" per data line
                    # followed by removing the one trailing LF.
                    events.append(
                        ServerSentEvent(
                            event_type or "message", "\n".join(data), id_buffer, retry_buffer
                        )
                    )
                    data = []
                # Data-less block: nothing is dispatched; both cases reset
                # the data and event type buffers.
                event_type = ""
                retry_buffer = None
                continue
            if line[0] == ":":
                continue  # comment
            # No colon: the whole line is the field name and the value is "".
            name, _, value = line.partition(":")
            if value and value[0] == " ":
                value = value[1:]  # exactly one leading space is removed
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\0" not in value:  # an id containing NUL is ignored
                    id_buffer = value
            elif name == "retry" and value.isascii() and value.isdigit():
                # ASCII digits only: str.isdigit() alone accepts "²" and "٣".
                retry_buffer = self._retry = int(value)
            # Any other field name is ignored.
        self._data = data
        self._event_type = event_type
        self._id_buffer = id_buffer
        self._retry_buffer = retry_buffer
        return events


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event as UTF-8 bytes, ending with its blank line.

    Each line of ``data`` (split on CR+LF, CR, LF) becomes a ``data: `` line,
    so line breaks survive, as LF, and leading spaces survive because the one
    space after the colon is always written.

    Args:
        data: the event's data; may span lines.
        event: the event type; omitted when ``None``.
        id: the event id; ``""`` resets the client's last event id.
        retry: the client's reconnection time in ms.

    Returns:
        ``id``, ``event`` and ``retry`` lines when given, then the data lines.

    Raises:
        ValueError: ``id`` contains NUL, CR or LF; ``event`` contains CR or
            LF; ``retry`` is negative; or (as ``UnicodeEncodeError``) the text
            holds a lone surrogate, which UTF-8 cannot carry.

    Example::

        >>> encode_event("a\\n b", event="delta", id="7")
        b'id: 7\\nevent: delta\\ndata: a\\ndata:  b\\n\\n'
    """
    head = ""
    if id is not None:
        if "\0" in id or "\r" in id or "\n" in id:
            raise ValueError(f"SSE id must not contain NUL, CR or LF, got {id!r}")
        head = f"id: {id}\n"
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError(f"SSE event type must not contain CR or LF, got {event!r}")
        head += f"event: {event}\n"
    if retry is not None:
        if retry < 0:
            raise ValueError(f"SSE retry must be a non-negative number of ms, got {retry}")
        head += f"retry: {retry}\n"
    if "\r" in data or "\n" in data:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        body = "".join([f"data: {line}\n" for line in lines])
    else:
        body = f"data: {data}\n"
    return f"{head}{body}\n".encode()


def encode_comment(text: str = "ping") -> bytes:
    """Encode a comment line, which clients ignore; used as a keep-alive.

    Raises:
        ValueError: ``text`` contains CR or LF.

    Example::

        >>> encode_comment()
        b': ping\\n\\n'
    """
    if "\r" in text or "\n" in text:
        raise ValueError(f"SSE comment must not contain CR or LF, got {text!r}")
    return f": {text}\n\n".encode()


def encode_retry(ms: int) -> bytes:
    """Encode a block that only sets the client's reconnection time.

    Raises:
        ValueError: ``ms`` is negative.

    Example::

        >>> encode_retry(1000)
        b'retry: 1000\\n\\n'
    """
    if ms < 0:
        raise ValueError(f"SSE retry must be a non-negative number of ms, got {ms}")
    return f"retry: {ms}\n\n".encode()


def retry_field(ms: int) -> bytes:
    """The ``retry`` field line alone, to start the block of an event that has data.

    A block of its own (:func:`encode_retry`) dispatches nothing in a
    browser, but clients that dispatch at every blank line (fetch-event-source)
    hand it on as an empty message; sent in front of an event's ``id`` and
    ``data`` lines it is one block with them.

    Example::

        >>> retry_field(1000) + b"data: a\\n\\n"
        b'retry: 1000\\ndata: a\\n\\n'
    """
    if ms < 0:
        raise ValueError(f"SSE retry must be a non-negative number of ms, got {ms}")
    return f"retry: {ms}\n".encode()
