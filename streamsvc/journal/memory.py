"""In-process journal: each stream's events in a list, readers woken by futures."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Mapping
from typing import NoReturn

from streamsvc.errors import ClientError, ErrorCode
from streamsvc.journal.base import FINAL_KINDS, Event, Framer, Listener, check_bounds, is_final
from streamsvc.journal.followers import Followers

__all__ = ["MemoryJournal"]


def _end(event: Event) -> int:
    return event.end


class _Log(Followers):
    __slots__ = ("ended", "events", "expiry", "framer", "meta", "size")

    def __init__(self, stream_id: str, meta: dict[str, str]) -> None:
        super().__init__()
        self.framer = Framer(stream_id)
        self.meta = meta
        self.events: list[Event] = []
        self.size = 0
        self.ended = False
        self.expiry: asyncio.TimerHandle | None = None


class MemoryJournal:
    """The default journal backend, for one process.

    Args:
        retention_s: how long an ended stream stays readable (then: unknown id).
        max_events: message events one stream may hold.
        max_bytes: bytes of frames one stream may hold.
    """

    def __init__(
        self, *, retention_s: float = 300.0, max_events: int = 100_000,
        max_bytes: int = 33_554_432,
    ) -> None:
        self._retention_s = retention_s
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._logs: dict[str, _Log] = {}

    def __len__(self) -> int:
        return len(self._logs)

    @property
    def healthy(self) -> bool:
        return True

    async def create(self, stream_id: str, meta: Mapping[str, str] | None = None) -> None:
        if stream_id in self._logs:
            raise ValueError(f"stream {stream_id!r} already exists")
        self._logs[stream_id] = _Log(stream_id, dict(meta or {}))

    async def meta(self, stream_id: str) -> dict[str, str] | None:
        log = self._logs.get(stream_id)
        return None if log is None else dict(log.meta)

    def _log(self, stream_id: str) -> _Log:
        log = self._logs.get(stream_id)
        if log is None:
            raise ClientError(
                f"no stream {stream_id!r} (unknown, or expired after its retention time)",
                code=ErrorCode.NOT_FOUND,
            )
        return log

    async def append(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        return self.append_nowait(stream_id, events)

    def append_nowait(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        if len(events) == 1:
            kind, data = events[0]
            return self.append_one_nowait(stream_id, kind, data)
        log = self._logs.get(stream_id)
        if log is None or log.ended:
            self._refuse(stream_id)
        items = log.events
        first = len(items)
        try:
            for kind, data in events:
                final = is_final(kind)
                seq = len(items) + 1
                frame = log.framer.frame(seq, kind, data)
                if not final:
                    check_bounds(stream_id, len(items), log.size + len(frame),
                                 self._max_events, self._max_bytes)
                log.size += len(frame)
                items.append(Event(seq, kind, frame, log.size))
                if final:
                    self._ended(stream_id, log)
                    break
        finally:
            if len(items) > first:  # also when a bound stopped the batch: what got in is read
                log.notify(items[first:])
                log.wake()
        return len(items)

    def append_one_nowait(self, stream_id: str, kind: str, data: bytes) -> int:
        """One event, nearly every call (a token): no loop, no slice, and the bounds compared
        here (``check_bounds`` only words the refusal)."""
        log = self._logs.get(stream_id)
        if log is None or log.ended:
            self._refuse(stream_id)
        items = log.events
        seq = len(items) + 1
        frame = log.framer.frame(seq, kind, data)
        size = log.size + len(frame)
        final = kind in FINAL_KINDS
        if not final and (seq > self._max_events or size > self._max_bytes):
            check_bounds(stream_id, seq - 1, size, self._max_events, self._max_bytes)
        log.size = size
        event = Event(seq, kind, frame, size)
        items.append(event)
        if final:
            self._ended(stream_id, log)
        if log.listeners:
            log.notify([event])
        if log.waiters:
            log.wake()
        return seq

    def _refuse(self, stream_id: str) -> NoReturn:
        """Raise why events cannot go to ``stream_id``: unknown, expired, or ended."""
        self._log(stream_id)
        raise ValueError(f"stream {stream_id!r} has already ended")

    def _ended(self, stream_id: str, log: _Log) -> None:
        log.ended = True
        log.expiry = asyncio.get_running_loop().call_later(
            self._retention_s, self._expire, stream_id
        )

    def listen(self, stream_id: str, listener: Listener) -> Callable[[], None] | None:
        log = self._logs.get(stream_id)
        if log is None or log.ended:
            return None
        return log.listen(listener)

    def _expire(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None:
            log.let_go()

    async def read(self, stream_id: str, after: int, max_bytes: int | None = None) -> list[Event]:
        log = self._log(stream_id)
        while True:
            events = log.events
            if len(events) > after:
                if max_bytes is None or events[-1].end - events[after].start <= max_bytes:
                    return events[after:]
                limit = events[after].start + max_bytes
                stop = bisect.bisect_right(events, limit, lo=after + 1, key=_end)
                return events[after:stop]
            if log.ended:
                return []
            await log.wait()
            if self._logs.get(stream_id) is not log:
                return []  # expired while waiting

    async def last_seq(self, stream_id: str) -> tuple[int, bool] | None:
        log = self._logs.get(stream_id)
        return None if log is None else (len(log.events), log.ended)

    def size(self, stream_id: str) -> int | None:
        log = self._logs.get(stream_id)
        return None if log is None else log.size

    async def close(self) -> None:
        for log in self._logs.values():
            if log.expiry is not None:
                log.expiry.cancel()
            log.ended = True
            log.let_go()
        self._logs.clear()
