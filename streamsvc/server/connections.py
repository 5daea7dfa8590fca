"""Client connections and their requests in flight, so a drain can close the idle ones.

On SIGTERM aiohttp stops listening and asks each connection to close once
idle, but a kept-alive connection that is idle right then stays open until
the end of the shutdown without being served: a proxy that reuses it (nginx
``keepalive``) waits for the whole drain. The drain closes those at once
(the proxy then picks another instance), and every answer given while
draining says ``Connection: close``.
"""

from __future__ import annotations

from aiohttp.web_protocol import RequestHandler

__all__ = ["Connections"]


class Connections:
    """How many requests each client connection has in flight.

    ``RequestHandler`` takes no weak references, so closed connections are
    dropped every ``_PRUNE_EVERY`` requests: the table holds the open
    connections plus at most that many closed ones.
    """

    _PRUNE_EVERY = 256

    def __init__(self) -> None:
        self._busy: dict[RequestHandler, int] = {}
        self._requests = 0

    def enter(self, protocol: RequestHandler) -> None:
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        self._requests += 1
        if self._requests % self._PRUNE_EVERY == 0:
            self._prune()

    def _prune(self) -> None:
        self._busy = {p: n for p, n in self._busy.items() if p.transport is not None}

    def leave(self, protocol: RequestHandler) -> None:
        self._busy[protocol] = self._busy.get(protocol, 1) - 1

    def close_idle(self) -> int:
        """Close every open connection with no request in flight; returns how many."""
        idle = [p for p, busy in self._busy.items() if busy <= 0 and p.transport is not None]
        for protocol in idle:
            protocol.force_close()
        self._prune()
        return len(idle)
