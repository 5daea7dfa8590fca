"""The generations this process runs, and the reader counts that keep them alive.

A generation is owned by the registry, not by an HTTP handler, so a reader
can leave and come back (``Last-Event-ID``) while the upstream goes on.
Readers are counted: when the last one leaves, a non-resumable stream is
stopped at once (the upstream request is cancelled) and a resumable one
after ``resume_grace_s``. Shutdown drains them all, whatever their endpoint.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any, Protocol

from streamsvc.errors import ErrorCode, StreamError, StreamsvcError
from streamsvc.streams.generation import Generation, GenerationState
from streamsvc.tasks import stop_tasks

__all__ = ["Peers", "StreamRegistry", "shutting_down"]


def shutting_down() -> StreamError:
    """The error a stream cut by a shutdown ends with (retryable: ask again elsewhere)."""
    return StreamError("the server is shutting down; the answer was cut here",
                       code=ErrorCode.SHUTTING_DOWN, retryable=True)


class Peers(Protocol):
    """Readers and DELETEs on other instances (``streamsvc.journal.peers.RedisPeers``)."""

    async def enter(self, stream_id: str) -> Any:
        """Count a reader here of a stream another instance writes; returns its presence."""

    def leave(self, presence: Any) -> None:
        """That reader left."""

    async def readers(self, stream_id: str) -> int:
        """Live readers of ``stream_id`` on other instances."""

    async def cancel(self, stream_id: str) -> bool:
        """Ask the instance writing ``stream_id`` to stop it; False when none got it."""


class StreamRegistry:
    """The generations this process runs, and the reader counts that keep them alive.

    It also remembers, for ``retention_s`` (and at most :attr:`MAX_ENDED` of
    them), the direct streams that ended here and their key ids: they are in
    no journal, yet a POST that reconnects to one must learn that it ended.

    Args:
        resume_grace_s: how long a resumable stream with no reader keeps generating.
        retention_s: how long an ended direct stream is remembered.
    """

    MAX_ENDED = 100_000

    def __init__(self, *, resume_grace_s: float, retention_s: float = 300.0) -> None:
        self._grace_s = resume_grace_s
        self._retention_s = retention_s
        self._ended: dict[str, tuple[float, str | None]] = {}  # in the order they ended
        self._running: dict[str, Generation] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self.peers: Peers | None = None
        """Other instances on the same journal (Redis); None for one process."""

    def __len__(self) -> int:
        return len(self._running)

    def get(self, stream_id: str) -> Generation | None:
        return self._running.get(stream_id)

    def direct(self, stream_id: str) -> tuple[bool, str | None] | None:
        """A direct (non-resumable) stream of this process: (still running, its key id).

        None for any other id, and for a direct stream that ended more than
        ``retention_s`` ago.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            return None if generation.resumable else (True, generation.context.key_id)
        ended = self._ended.get(stream_id)
        if ended is None or ended[0] < time.monotonic():
            return None
        return False, ended[1]

    def _forget(self, generation: Generation) -> None:
        self._running.pop(generation.id, None)
        if generation.resumable:
            return  # the journal keeps it
        ended = self._ended
        now = time.monotonic()
        ended[generation.id] = (now + self._retention_s, generation.context.key_id)
        while ended:  # the oldest first: drop the expired, and past the bound
            oldest = next(iter(ended))
            if ended[oldest][0] >= now and len(ended) <= self.MAX_ENDED:
                break
            del ended[oldest]

    def start(self, generation: Generation, *, readers: int = 0) -> None:
        """Run ``generation`` (its upstream starts now) until it ends.

        ``readers``: readers already there (the one client of a direct stream).
        A resumable stream nobody reads yet is stopped after the grace period.
        """
        self._running[generation.id] = generation
        generation.readers = readers
        generation.when_ended(partial(self._forget, generation))
        generation.start()
        if generation.resumable and readers == 0 and generation.state is GenerationState.RUNNING:
            self._arm_grace(generation)

    async def attach(self, stream_id: str) -> Any:
        """A reader arrived: a pending grace period is called off.

        Returns what :meth:`detach` needs: for a stream another instance
        writes, the reader's presence there.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.readers += 1
            generation.cancel_grace()
            return None
        if self.peers is not None:
            return await self.peers.enter(stream_id)
        return None

    def detach(self, stream_id: str, presence: Any = None) -> None:
        """A reader left: with none left, stop now or after the grace period."""
        if presence is not None and self.peers is not None:
            self.peers.leave(presence)
        generation = self._running.get(stream_id)
        if generation is None:
            return
        generation.readers -= 1
        if generation.readers > 0:
            return
        if generation.resumable:
            self._arm_grace(generation)
        else:
            generation.stop("cancelled")

    def _arm_grace(self, generation: Generation) -> None:
        if generation.background:
            return  # it runs to its end, read or not
        if self.peers is None:
            generation.arm_grace(self._grace_s)
        else:
            generation.arm_grace(self._grace_s, lambda: self._check_readers(generation))

    def _check_readers(self, generation: Generation) -> None:
        """The grace period ran out with no reader here: stop unless one reads elsewhere."""
        peers = self.peers
        assert peers is not None

        async def check() -> None:
            if await peers.readers(generation.id) > 0:
                if generation.readers == 0 and generation.state is GenerationState.RUNNING:
                    self._arm_grace(generation)
            elif generation.readers == 0:
                generation.stop("cancelled")

        task = asyncio.ensure_future(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def cancel(self, stream_id: str, error: StreamsvcError | None = None) -> bool:
        """Stop a stream's generation (DELETE), here or on the instance that runs it.

        With ``error`` the stream ends with that error event instead of
        ``done``. Returns False when no instance runs it.
        """
        generation = self._running.get(stream_id)
        if generation is None:
            return self.peers is not None and await self.peers.cancel(stream_id)
        generation.stop("cancelled", error=error)
        return True

    def cancel_here(self, stream_id: str) -> None:
        """Stop a generation of this process at another's word: a DELETE it took, or
        a reader there that ended the stream when our writer lease had lapsed."""
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.stop("cancelled")

    def fail_all(self, error: StreamsvcError) -> None:
        """End every running generation with ``error`` (the journal became unreachable)."""
        for generation in list(self._running.values()):
            generation.stop("cancelled", error=error)

    async def drain(self, timeout_s: float) -> int:
        """Let the running generations finish, for at most ``timeout_s``; then stop the
        ones still running.

        A generation stopped here ends with the ``shutting_down`` error event
        (retryable), so a client knows its answer was cut by a restart.

        Those that start meanwhile (admitted just before the drain) are waited
        for too, within the same ``timeout_s``.

        Returns:
            How many generations had to be stopped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._running and (left := deadline - loop.time()) > 0:
            await asyncio.wait([g.ended for g in self._running.values()], timeout=left)
        return await self._stop_all()

    async def close(self) -> None:
        """Stop every generation and wait for each to write its final event."""
        await self._stop_all()
        await stop_tasks(list(self._checks))

    async def _stop_all(self) -> int:
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("cancelled", error=shutting_down())
        await asyncio.gather(*(g.ended for g in generations), return_exceptions=True)
        return len(generations)
