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
from typing import Protocol

from streamsvc.journal.base import Event, Journal
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
    while True:
        events = await journal.read(stream_id, position[0], WRITE_SLICE)
        if not events:
            return position[0]
        await connection.send(b"".join([first, *[event.frame for event in events]]))
        first = b""  # the first write always comes from here: read() waits for an event
        position[0] = events[-1].seq
        if events[-1].final:
            return position[0]
        # Caught up with a running stream this process writes: take the live tail.
        # (Asked of this process's own state: no journal round trip per batch.)
        if journal.live_seq(stream_id) == position[0] and await _follow_live(
            connection, journal, stream_id, position
        ):
            return position[0]


async def _follow_live(
    connection: Connection, journal: Journal, stream_id: str, position: list[int]
) -> bool:
    """Write each new batch from the journal's append call while the connection has room.

    A reader that has caught up would otherwise wake up once per token to
    ``read`` and write. Once the connection has no room (or the stream
    expires) this returns and the reader goes on with ``read``, where writes wait.
    Returns whether the final event was written.
    """
    woken: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def take(events: list[Event]) -> bool:
        if events and events[0].seq == position[0] + 1:
            last = events[-1]  # nearly always the one event a token made: its frame as it is
            data = last.frame if len(events) == 1 else b"".join([event.frame for event in events])
            if connection.write_now(data):
                position[0] = last.seq
                if not last.final:
                    return True
                woken.set_result(True)
                return False
        if not woken.done():
            woken.set_result(False)
        return False

    stop = journal.listen(stream_id, take)
    if stop is None:
        return False
    try:
        return await woken
    finally:
        stop()
