"""Writes made while one upstream read is handled go out once per client connection, at its end.

One read from an upstream often brings several events (two tokens, a token
and the finish, the usage chunk and ``[DONE]``). Each becomes a frame for the
client from inside that read's callback; written one by one, they cost one
``send`` system call each, where a byte relay makes one. Inside a block a
connection keeps what it is given and writes it all in one call when the
block ends: the same bytes, in the same order, before
the callback returns, so nothing waits for a later turn of the loop.

The upstream's read callback opens the block (``with current_batch():``); a
:class:`Batched` target (``SSEResponse``) keeps its writes while
``current_batch().open``. Each thread has its own.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Batched", "WriteBatch", "current_batch"]


class Batched(Protocol):
    def flush_batch(self) -> None:
        """Write what was kept during the block (it must not raise)."""


class WriteBatch:
    """This thread's block: ``with current_batch():`` around a read callback.

    ``open`` while inside one (nested blocks flush at the outermost's end);
    a target that keeps its first write of the block calls :meth:`add`.
    """

    __slots__ = ("_depth", "_targets", "open")

    def __init__(self) -> None:
        self._depth = 0
        self._targets: list[Batched] = []
        self.open = False

    def add(self, target: Batched) -> None:
        self._targets.append(target)

    def __enter__(self) -> None:
        self._depth += 1
        self.open = True

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        self.open = False
        targets, self._targets = self._targets, []
        for target in targets:  # the block is closed: a flush writes at once, adds nothing
            target.flush_batch()


class _Local(threading.local):
    def __init__(self) -> None:
        self.batch = WriteBatch()


_local = _Local()


def current_batch() -> WriteBatch:
    """This thread's batch (an event loop runs its callbacks on one thread)."""
    return _local.batch
