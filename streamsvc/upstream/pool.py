"""Idle keep-alive connections to upstreams, kept for the next request to the same origin.

A connection comes back here only when its last response ended complete with
keep-alive allowed (``Connection.reusable``); a body cut short or left open
after ``[DONE]`` is closed instead, never reused. The pool is bounded per
origin, closes a connection that stayed idle ``idle_s``, and is an async
resource: whoever opens it closes it (the app's ``_upstreams`` cleanup context).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from streamsvc.upstream.http_stream import Connection, Origin

__all__ = ["DEFAULT_IDLE_S", "DEFAULT_MAX_IDLE", "ConnectionPool"]

DEFAULT_MAX_IDLE = 32
"""Idle connections kept per origin; one more is closed when it comes back."""
DEFAULT_IDLE_S = 15.0
"""How long an idle connection is kept: less than common servers' keep-alive timeouts."""


class ConnectionPool:
    """Idle connections per origin, newest first.

    Args:
        max_idle: idle connections kept per origin.
        idle_s: an idle connection older than this is closed.

    Example::

        async with ConnectionPool() as pool:
            client = UpstreamClient("openai", config, session, pool=pool)
    """

    def __init__(self, *, max_idle: int = DEFAULT_MAX_IDLE, idle_s: float = DEFAULT_IDLE_S
                 ) -> None:
        self._max_idle = max_idle
        self._idle_s = idle_s
        self._idle: dict[Origin, list[tuple[Connection, asyncio.TimerHandle]]] = {}
        self.closed = False

    def idle(self, origin: Origin) -> int:
        """How many idle connections to ``origin`` are kept (closed ones not counted)."""
        return sum(not connection.closed for connection, _ in self._idle.get(origin, ()))

    def take(self, origin: Origin) -> Connection | None:
        """The newest idle connection to ``origin`` still open, else None."""
        idle = self._idle.get(origin)
        while idle:
            connection, timer = idle.pop()
            timer.cancel()
            if not connection.closed:
                return connection
        return None

    def put(self, connection: Connection) -> None:
        """Keep ``connection`` for the next request, or close it (pool closed or full)."""
        connection.detach()
        idle = self._idle.setdefault(connection.origin, [])
        if self.closed or connection.closed or len(idle) >= self._max_idle:
            connection.close()
            return
        timer = asyncio.get_running_loop().call_later(self._idle_s, self._expire, connection)
        idle.append((connection, timer))

    def _expire(self, connection: Connection) -> None:
        idle = self._idle.get(connection.origin, [])
        idle[:] = [(c, t) for c, t in idle if c is not connection]
        connection.close()

    async def close(self) -> None:
        """Close every idle connection; connections given back later are closed too."""
        self.closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, timer in connections:
                timer.cancel()
                connection.close()
        await asyncio.sleep(0)  # let the transports run connection_lost

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
