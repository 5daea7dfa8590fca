"""Demand from a sink back to the upstream reader: Reactive Streams backpressure, asyncio style.

A Reactor ``Flux`` asks its source for ``n`` more items; an asyncio socket
reader has a simpler lever: read, or do not. A :class:`Valve` is that lever.
The sink closes it when its backlog reaches its bound and opens it once the
backlog has drained. The upstream's protocol pauses its transport while the
valve is closed and resumes it from :meth:`Valve.when_open`'s callback (a
task-based reader awaits :meth:`Valve.wait_open` instead), so the upstream's
socket fills and TCP slows the upstream down, instead of the backlog growing
or the client being cut.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Valve"]


class Valve:
    """Open (read on) or closed (wait); one reader waits on it, one sink turns it.

    ``is_open`` is read per token: a plain attribute, which only :meth:`close`
    and :meth:`open` change.
    """

    __slots__ = ("_on_open", "_waiter", "is_open")

    def __init__(self) -> None:
        self.is_open = True
        self._waiter: asyncio.Future[None] | None = None
        self._on_open: Callable[[], object] | None = None

    def close(self) -> None:
        """The sink is full: the reader stops at its next :meth:`wait_open`."""
        self.is_open = False

    def is_closed(self) -> bool:
        """Whether the sink is full (what the attempts operator's ``held`` asks)."""
        return not self.is_open

    def open(self) -> None:
        """The sink drained: a waiting reader goes on."""
        self.is_open = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callback, self._on_open = self._on_open, None
        if callback is not None:
            callback()

    def when_open(self, callback: Callable[[], object] | None) -> None:
        """Call ``callback`` once, at the next :meth:`open` (None: forget the one set).

        One reader, one callback: setting another replaces it.
        """
        self._on_open = callback

    async def wait_open(self) -> None:
        """Return at once while open; else wait until :meth:`open` (cancellable)."""
        while not self.is_open:
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
