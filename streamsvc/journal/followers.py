"""The readers of one stream in this process, as both journals wake them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from streamsvc.journal.base import Event, Listener

__all__ = ["Followers"]


class Followers:
    """Readers waiting in ``read`` for more, and caught-up readers ``listen``-ing to the tail."""

    __slots__ = ("listeners", "waiters")

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []
        self.listeners: list[Listener] = []

    async def wait(self) -> None:
        """Until :meth:`wake`; a cancelled wait leaves nothing behind."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
                if waiter in self.waiters:
                    self.waiters.remove(waiter)

    def wake(self) -> None:
        waiters = self.waiters
        if not waiters:  # the usual case while a reader is listening instead: no new list
            return
        self.waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Add ``listener``; returns the function that removes it."""
        self.listeners.append(listener)

        def unlisten() -> None:
            self._drop(listener)

        return unlisten

    def notify(self, events: list[Event]) -> None:
        """Hand new events to the listeners; one that returns False is dropped."""
        listeners = self.listeners
        if not listeners:
            return
        if len(listeners) == 1:  # one caught-up reader, the usual case: no copy of the list
            listener = listeners[0]
            if not listener(events):
                self._drop(listener)
            return
        for listener in list(listeners):  # a copy: a listener may stop listening meanwhile
            if not listener(events):
                self._drop(listener)

    def _drop(self, listener: Listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def drop_listeners(self) -> None:
        """Tell every listener the tail is over (``[]``) and forget them."""
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener([])

    def let_go(self) -> None:
        """Send every reader back: listeners get ``[]``, waiters wake (the stream is over
        here, or the journal cannot serve it; ``read`` then says which)."""
        self.drop_listeners()
        self.wake()
