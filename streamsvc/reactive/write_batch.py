"""Frames written in one turn of the event loop go out once per client connection, back to back.

One upstream read often brings several events (two tokens, a token and the
finish, the usage chunk and ``[DONE]``), and one turn of the loop handles the
reads of many upstreams. Written where they are made, each frame costs one
``send``, and each ``send`` lands between two upstream reads, when the
client's process has often gone back to sleep: the kernel wakes it inside
that ``send``, once per token. A byte relay on aiohttp pays neither: its
reads only wake tasks, which write in the next turn, one after another.

So a connection keeps the frames it is given during a turn, and the loop's
:class:`WriteBatch` writes every connection that kept some in one callback
(``call_soon``, queued by the turn's first kept frame): one write per
connection per turn, all of them back to back, before the loop polls again.
The bytes and their order are those the connection was given.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Protocol

__all__ = ["Batched", "WriteBatch", "loop_batch"]

log = logging.getLogger(__name__)


class Batched(Protocol):
    def flush_batch(self) -> None:
        """Write what was kept this turn (it must not raise)."""


class WriteBatch:
    """One event loop's batch: the targets that kept frames this turn.

    A target calls :meth:`add` when it keeps the turn's first frame; the
    first target of a turn queues the flush.
    """

    __slots__ = ("_loop", "_targets")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._targets: list[Batched] = []

    def add(self, target: Batched) -> None:
        if not self._targets:
            self._loop.call_soon(self.flush)
        self._targets.append(target)

    def flush(self) -> None:
        """Write every target's kept frames (the loop calls it once a turn)."""
        targets, self._targets = self._targets, []
        for target in targets:
            try:
                target.flush_batch()
            except Exception:  # one broken target must not keep the others' frames
                log.exception("a write batch target failed to flush")


class _Local(threading.local):
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch: WriteBatch | None = None


_local = _Local()


def loop_batch() -> WriteBatch:
    """The running loop's batch (made on first use; a thread runs one loop at a time)."""
    loop = asyncio.get_running_loop()
    local = _local
    batch = local.batch
    if batch is None or local.loop is not loop:
        batch = local.batch = WriteBatch(loop)
        local.loop = loop
    return batch
