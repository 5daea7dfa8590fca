"""The streamsvc event format: deltas, then one ``done`` or ``error``.

The format (docs/api.md): a delta is a default event whose data is
``{"content": ...}`` (plus ``index`` for choices other than 0, and ``role``,
``reasoning``, ``tool_calls``, ``refusal`` when present); the end is
``event: done`` with the finish reason and usage, or ``event: error`` with a
code from the closed set. Every event has the id ``<stream_id>:<seq>``.

:class:`EventBuilder` makes the events' data (the journal numbers and frames
them for resumable streams); :class:`EventsEncoder` numbers and frames them
itself, for a stream read by its one client with no journal.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streamsvc.chunks import Chunk, Seam
from streamsvc.errors import StreamsvcError
from streamsvc.journal.base import Framer
from streamsvc.sse import retry_field
from streamsvc.wire import Ending, Entries

__all__ = [
    "DELTA", "DONE", "ERROR", "FAILOVER", "EventBuilder", "EventEntries", "EventsEncoder",
    "error_data",
]

DELTA = "message"
DONE = "done"
ERROR = "error"
FAILOVER = "failover"
"""Between the text of an upstream that failed and its continuation (``chunks.Seam``)."""

_encode = msgspec.json.encode
_CONTENT = b'{"content":'


class EventBuilder:
    """Turns the chunks of one stream into event data, and remembers finish and usage."""

    __slots__ = ("finish_reasons", "usage")

    def __init__(self) -> None:
        self.finish_reasons: dict[int, str] = {}
        self.usage: dict[str, Any] | None = None

    def deltas(self, chunk: Chunk) -> list[bytes]:
        """The JSON data of the delta events one chunk makes (often one, sometimes none)."""
        text = chunk.text
        if text is not None:  # nearly every chunk: one text piece of choice 0
            return [_CONTENT + _encode(text) + b"}"] if text else []
        usage = chunk.usage
        if usage is not None:
            self.usage = usage
        out: list[bytes] = []
        for choice in chunk.choices:
            index = choice.get("index", 0)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finish_reasons[index] = str(reason)
            delta = choice.get("delta")
            if not isinstance(delta, dict) or not delta:
                continue
            event: dict[str, Any] = {}
            if index:
                event["index"] = index
            role = delta.get("role")
            if role:
                event["role"] = role
            content = delta.get("content")
            if content:
                event["content"] = content
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                event["reasoning"] = reasoning
            for field in ("tool_calls", "function_call", "refusal"):
                value = delta.get(field)
                if value:
                    event[field] = value
            if len(event) > (1 if index else 0):
                out.append(_encode(event))
        return out

    def done(self, ending: Ending) -> bytes:
        """The JSON data of the ``done`` event; ``ending.finish_reason`` overrides the upstream's."""
        reason = ending.finish_reason or self.finish_reasons.get(0)
        if reason is None and self.finish_reasons:
            reason = next(iter(self.finish_reasons.values()))
        data: dict[str, Any] = {"finish_reason": reason, "usage": self.usage}
        if len(self.finish_reasons) > 1:
            data["finish_reasons"] = {str(k): v for k, v in sorted(self.finish_reasons.items())}
        data["upstream"] = ending.upstream
        data["attempts"] = ending.attempts
        return _encode(data)


def error_data(error: StreamsvcError) -> bytes:
    """The JSON data of the ``error`` event for ``error``."""
    return _encode(error.to_event())


class EventsEncoder:
    """The streamsvc event format for one stream, numbered from 1 (a :class:`WireEncoder`).

    Args:
        stream_id: the stream's id, the first half of every event id.
        retry_ms: the ``retry:`` the first event's block carries (EventSource's
            reconnect delay); never a block of its own.
    """

    __slots__ = ("_builder", "_framer", "_retry_ms", "_seq")

    def __init__(self, stream_id: str, retry_ms: int) -> None:
        self._framer = Framer(stream_id)
        self._retry_ms = retry_ms
        self._seq = 0
        self._builder = EventBuilder()

    def preamble(self) -> bytes:
        return b""  # the retry field goes out with the first event (see _frame)

    def chunk(self, chunk: Chunk) -> bytes:
        if isinstance(chunk, Seam):
            return self._frame(FAILOVER, _encode(chunk.info))
        datas = self._builder.deltas(chunk)
        if not datas:
            return b""
        if len(datas) == 1:
            return self._frame(DELTA, datas[0])
        return b"".join([self._frame(DELTA, data) for data in datas])

    def done(self, ending: Ending) -> bytes:
        return self._frame(DONE, self._builder.done(ending))

    def error(self, error: StreamsvcError) -> bytes:
        return self._frame(ERROR, error_data(error))

    def _frame(self, kind: str, data: bytes) -> bytes:
        self._seq += 1
        frame = self._framer.frame(self._seq, kind, data)
        return retry_field(self._retry_ms) + frame if self._seq == 1 else frame


class EventEntries:
    """The streamsvc event format as journal entries (an :class:`~streamsvc.wire.EntryEncoder`)."""

    __slots__ = ("_builder",)

    def __init__(self) -> None:
        self._builder = EventBuilder()

    def start(self) -> Entries:
        return []

    def chunk(self, chunk: Chunk) -> Entries:
        text = chunk.text
        if text:  # nearly every chunk: EventBuilder.deltas' first case, without its call
            return [(DELTA, _CONTENT + _encode(text) + b"}")]
        if isinstance(chunk, Seam):
            return [(FAILOVER, _encode(chunk.info))]
        datas = self._builder.deltas(chunk)
        if len(datas) == 1:  # nearly every chunk: no comprehension for one entry
            return [(DELTA, datas[0])]
        return [(DELTA, data) for data in datas]

    def done(self, ending: Ending) -> Entries:
        return [(DONE, self._builder.done(ending))]

    def error(self, error: StreamsvcError) -> Entries:
        return [(ERROR, error_data(error))]
