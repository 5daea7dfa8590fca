"""The journal contract: numbered events per stream, replay from any seq, live tail."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from streamsvc.errors import ErrorCode, StreamError

__all__ = [
    "FINAL_KINDS", "Event", "Framer", "Journal", "Listener", "check_bounds", "encode_frame",
    "is_final",
]

FINAL_KINDS = frozenset({
    "done", "error",  # the streamsvc event format
    "response.completed", "response.failed", "response.incomplete",  # the Responses API
})
"""The kinds of event that end a stream; every other kind continues it."""

RESPONSES_PREFIX = "response."
"""Kinds of the Responses API's events (``response.output_text.delta``, ...)."""


def is_final(kind: str) -> bool:
    """Whether an event of this kind is a stream's last."""
    return kind in FINAL_KINDS


def check_bounds(stream_id: str, events: int, size: int, max_events: int, max_bytes: int) -> None:
    """Raise ``journal_full`` when a message event would pass one stream's bounds.

    ``events`` message events are journaled already; the next one would
    bring the stream's frames to ``size`` bytes. A final event is never
    checked: the end of a stream always gets in.
    """
    if events >= max_events:
        raise StreamError(f"stream {stream_id!r} passed journal.max_events ({max_events})",
                          code=ErrorCode.JOURNAL_FULL)
    if size > max_bytes:
        raise StreamError(f"stream {stream_id!r} passed journal.max_bytes ({max_bytes})",
                          code=ErrorCode.JOURNAL_FULL)


def encode_frame(stream_id: str, seq: int, kind: str, data: bytes) -> bytes:
    """The SSE frame of one event, ready to write.

    ``data`` is compact JSON, which never holds a raw CR or LF, so one
    ``data:`` line carries it whole. A Responses API event is framed as
    OpenAI frames it: ``event: <type>`` and its data, which carries its own
    ``sequence_number`` (resumed by ``starting_after``, not ``Last-Event-ID``).
    A journal frames a stream's events with the stream's :class:`Framer`,
    which this calls for one frame.
    """
    return Framer(stream_id).frame(seq, kind, data)


# The ``event:`` line of each kind, encoded once, and whether it is a Responses API
# event (framed without an id): kinds are a small set (the formats' event types),
# but a journal takes any, so the cache is capped.
_KIND_HEADS: dict[str, tuple[bytes, bool]] = {}
_DATA_LINE = b"\ndata: "  # after a frame's id or event line, which hold no LF
_KIND_HEADS_MAX = 256


def _kind_head(kind: str) -> tuple[bytes, bool]:
    head = b"event: %b\n" % kind.encode(), kind.startswith(RESPONSES_PREFIX)
    if len(_KIND_HEADS) < _KIND_HEADS_MAX:
        _KIND_HEADS[kind] = head
    return head


class Framer:
    """The frames of one stream's events, as :func:`encode_frame` describes them.

    A journal frames each event as it is appended: the ``id: <stream_id>:``
    prefix is encoded once per stream, and a frame is one bytes formatting
    (a third of the cost of building and encoding a ``str`` per event).
    """

    __slots__ = ("_id",)

    def __init__(self, stream_id: str) -> None:
        self._id = b"id: %b:" % stream_id.encode()

    def frame(self, seq: int, kind: str, data: bytes) -> bytes:
        """The SSE frame of event ``seq``, ready to write."""
        if kind == "message":  # nearly every event: a delta, the default event type
            return b"%b%d\ndata: %b\n\n" % (self._id, seq, data)
        head, responses = _KIND_HEADS.get(kind) or _kind_head(kind)
        if responses:
            return b"%bdata: %b\n\n" % (head, data)
        return b"%b%d\n%bdata: %b\n\n" % (self._id, seq, head, data)


class Event(msgspec.Struct, frozen=True, gc=False):
    """One journaled event: ``seq`` counts from 1 within its stream.

    ``frame`` is the event's SSE frame, ready to write; its ``data`` is read
    back out of it. A journal keeps every event of every stream for its
    retention time, and the frame alone is most of what a token costs to keep:
    keeping the data beside it too was up to four tenths more (docs/performance.md).
    ``end`` is the byte count of the stream's frames up to and including this
    one, so a reader knows how far behind the journal it is.

    Untracked by the garbage collector (``gc=False``: it holds only numbers, a
    string and bytes, so it can be in no cycle): each full collection walked them all.
    """

    seq: int
    kind: str
    frame: bytes
    end: int

    @property
    def data(self) -> bytes:
        """The event's JSON data: the frame's one ``data:`` line (see :func:`encode_frame`)."""
        frame = self.frame
        return frame[frame.index(_DATA_LINE) + len(_DATA_LINE):-2]

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS

    @property
    def start(self) -> int:
        """The byte offset of this event's frame within its stream."""
        return self.end - len(self.frame)


Listener = Callable[[list["Event"]], bool]
"""Takes new events as they are appended; returns False to stop listening."""


class Journal(Protocol):
    """Where a stream's events live while it runs and for ``retention_s`` after."""

    async def create(self, stream_id: str, meta: Mapping[str, str] | None = None) -> None:
        """Start an empty log for a new stream, written by this process.

        ``meta`` (for example ``{"owner": key_id}``) is kept with the stream
        and expires with it. Raises ValueError when the id exists.
        """

    async def meta(self, stream_id: str) -> dict[str, str] | None:
        """The ``meta`` a known stream was created with, None for an unknown one.

        Backends shared by several processes add ``"instance"``: the id of
        the process that writes the stream.
        """

    async def append(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        """Append (kind, data) events in order; returns the last seq.

        Raises ``StreamError(journal_full)`` when message events pass the
        bound; a final event (``done``/``error``) is always accepted.
        """

    def append_nowait(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        """``append`` without waiting, for a generation's ``on_next``: returns the last seq.

        The events are readable in order right away (memory) or after the
        backend has written them, still in order (remote backends queue them).
        Raises like ``append``.
        """

    def append_one_nowait(self, stream_id: str, kind: str, data: bytes) -> int:
        """``append_nowait`` of one event (what a token makes): returns its seq.

        The same contract, for the call a stream makes per token: no list around
        the event, and a backend may take a shorter path for it.
        """

    async def read(self, stream_id: str, after: int, max_bytes: int | None = None) -> list[Event]:
        """Events with seq > ``after``, waiting until there is one or the stream has ended.

        With ``max_bytes``, the events stop before their frames pass that many
        bytes (the first one always comes). Returns [] only when the stream has
        ended and nothing follows ``after``. Raises ``ClientError(not_found)``
        for an unknown (or expired) stream.
        """

    async def last_seq(self, stream_id: str) -> tuple[int, bool] | None:
        """(last seq, ended) for a known stream, None for an unknown one."""

    def listen(self, stream_id: str, listener: Listener) -> Callable[[], None] | None:
        """Call ``listener`` with each batch of new events as it is appended.

        For a reader that has caught up: it writes the live tail from the
        appender's own call instead of waking up for each ``read``. The
        listener returns False to stop listening; it gets ``[]`` once when the
        stream expires or the journal closes. Returns the function that stops
        it, or None when the stream is unknown or ended, or when the backend
        cannot call back (a reader then goes on with ``read``).
        """

    def size(self, stream_id: str) -> int | None:
        """Bytes of all the frames so far of a stream this process writes (or, in
        memory, knows); None otherwise."""

    @property
    def healthy(self) -> bool:
        """False while the backend cannot be reached (``/readyz`` then fails)."""

    async def close(self) -> None:
        """Release what the journal holds (wakes every waiting reader)."""
