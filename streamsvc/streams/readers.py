"""Readers: what a stream made, written to one client's connection at the client's pace.

A reader never decides that a client is too slow: the connection does
(:class:`Connection.send` gives up only on a client that takes nothing for
the write timeout). A direct stream's reader drains its backlog, whose bound
holds the upstream back; a journaled stream's reader reads the journal from
its position on, however far behind it is, and the journal's own bounds
decide when the stream itself must end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from streamsvc.journal.base import FINAL_KINDS, Event, Journal
from streamsvc.streams.sinks import WRITE_SLICE, Backlog

__all__ = ["Connection", "read_backlog", "read_journal"]


class Connection(Protocol):
    """A client's event stream (``streamsvc.server.sse_response.SSEResponse``)."""

    def write_now(self, data: bytes) -> bool:
        """Write at once if nothing waits before it; False when it must wait."""

    async def send(self, data: bytes) -> None:
        """Write once what was written before has gone; raises when the client is gone."""


async def read_backlog(connection: Connection, backlog: Backlog) -> None:
    """Write a direct stream's frames until its last one."""
    backlog.direct = connection.write_now
    try:
        while True:
            data, last = await backlog.take()
            if data:
                await connection.send(data)
            if last:
                return
    finally:
        backlog.direct = None


async def read_journal(
    connection: Connection, journal: Journal, stream_id: str, after: int,
    wrote: list[int] | None = None, *, first: bytes = b"",
) -> int:
    """Write a journaled stream's events after ``after`` until its final one.

    Replays what is there in writes of at most :data:`WRITE_SLICE` bytes, then,
    once caught up with a stream this process writes, takes the live tail
    from the journal's own append call while the connection has room.
    ``first`` goes in front of the first event, in its block (the ``retry``
    field). Returns the seq written through (``wrote[0]`` follows it as it
    goes, for the caller's log when the client leaves).
    """
    position = wrote if wrote is not None else [after]
    position[0] = after
    tail: _Tail | None = None
    try:
        while True:
            if tail is None or tail.stopped:
                if tail is not None:
                    tail.close()
                # Listening before reading: what is appended while the read and its write
                # are in flight is kept, so one read catches the reader up. Read first,
                # and a write slower than the tokens would be chased by a read per batch.
                tail = _Tail(connection, position)
                tail.stop = journal.listen(stream_id, tail.take)  # None: not ours, or not live
            events = await journal.read(stream_id, position[0], WRITE_SLICE)
            if not events:
                return position[0]
            await connection.send(b"".join([first, *[event.frame for event in events]]))
            first = b""  # the first write always comes from here: read() waits for an event
            position[0] = events[-1].seq
            if events[-1].final:
                return position[0]
            if tail.stop is None:
                tail = None  # listen again next time: the journal may serve a tail by then
                continue
            if await tail.follow():
                return position[0]
    finally:
        if tail is not None:
            tail.close()


class _Tail:
    """A reader's listener on a stream this process writes (``Journal.listen``).

    While the reader reads and writes, it keeps what the appends bring (at most
    :data:`WRITE_SLICE` bytes: past that it stops, and the reader reads it).
    Once the reader has written up to what it kept, :meth:`follow` writes that
    and then each new batch from the append call itself, while the connection
    has room: a reader that has caught up would otherwise wake up once per
    token to ``read`` and write.
    """

    __slots__ = ("connection", "kept", "kept_bytes", "position", "stop", "stopped", "woken")

    def __init__(self, connection: Connection, position: list[int]) -> None:
        self.connection = connection
        self.position = position
        self.kept: list[Event] = []
        self.kept_bytes = 0
        self.stopped = False  # the journal no longer calls take: a new listener is needed
        self.stop: Callable[[], None] | None = None
        self.woken: asyncio.Future[bool] | None = None
        """Made when the tail goes live: set to whether the final event was written."""

    def take(self, events: list[Event]) -> bool:
        """The listener: keeps what the appends bring until the tail is live, then writes
        each batch after the position (a read may have brought some of it) at once.
        Returns whether to go on listening."""
        if self.woken is None:  # not live yet: keep
            if events:
                self.kept += events
                self.kept_bytes += sum(len(event.frame) for event in events)
                if self.kept_bytes <= WRITE_SLICE:
                    return True
            self.stopped = True  # too much to keep, or the tail is over ([]): the reader reads it
            self.kept = []
            return False
        position = self.position
        if events and events[-1].seq <= position[0]:
            return True  # written already: read from the journal before this batch was told
        if events and events[0].seq <= position[0] + 1:
            if events[0].seq <= position[0]:
                events = [event for event in events if event.seq > position[0]]
            last = events[-1]  # nearly always the one event a token made: its frame as it is
            data = last.frame if len(events) == 1 else b"".join([event.frame for event in events])
            if self.connection.write_now(data):
                position[0] = last.seq
                if last.kind not in FINAL_KINDS:  # Event.final, without its call per token
                    return True
                self._wake(True)
                self.stopped = True
                return False
        self._wake(False)
        self.stopped = True
        return False

    async def follow(self) -> bool:
        """Write what was kept after the reader's position, then the live tail; returns
        whether the final event was written. False: the reader reads on (the tail
        stopped, no room, or what was kept does not follow the position yet)."""
        if self.stopped:
            return False
        kept = self.kept
        if kept and kept[0].seq > self.position[0] + 1:
            return False  # the read stopped short of what was kept: read on, still keeping
        self.kept, self.kept_bytes = [], 0
        self.woken = asyncio.get_running_loop().create_future()
        if kept:
            self.take(kept)  # live now: one that stops wakes and marks the tail stopped itself
        return await self.woken

    def _wake(self, final: bool) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(final)

    def close(self) -> None:
        """Stop listening (once)."""
        stop, self.stop = self.stop, None
        if stop is not None:
            stop()
