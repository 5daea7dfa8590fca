"""One blocking ``XREAD`` for every stream this process's readers tail.

A reader of a stream written by another instance has to wait for Redis to
hold more. One ``XREAD BLOCK`` per reader would hold one Redis connection
per waiting client (a thousand readers, a thousand connections) and drop it
whenever its client leaves mid-call. Here one task, on one connection of the
shared pool, blocks on all the tailed streams at once.

The call brings the new entries themselves, and the tailer keeps the last
:data:`KEPT` of each stream: a reader waiting where they start is handed them,
and one that comes back from writing its client takes what came meanwhile
without waiting. A reader that keeps up costs no Redis command of its own;
one further back than what is kept reads the journal (``XRANGE``). Before,
each woken reader read its stream again (an ``XRANGE`` and an ``XREVRANGE``
per batch, on a pooled connection each): at 200 remote readers, about 20
times the commands of the shared call.

A stream stays tailed for :data:`LINGER_S` after its reader last came,
so a reader coming back for the next event finds it covered. One that
starts waiting on a stream the blocked call does not cover interrupts it
with ``CLIENT UNBLOCK`` (from another pooled connection), so the call is
re-issued with that stream added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamsvc.tasks import stop_tasks

__all__ = ["KEPT", "LINGER_S", "Entries", "Tailer"]

log = logging.getLogger("streamsvc.journal")

LINGER_S = 1.0
"""How long a stream stays tailed after its reader last came (its entries kept)."""

KEPT = 16
"""Entries kept per tailed stream (about 8 KiB: 500 bytes an entry as redis-py returns it).
A reader gets back from its client's write one or two entries behind; one further
back reads the journal."""

Entries = list[Any]
"""Redis stream entries as redis-py returns them: ``(b"<seq>-0", {field: value})``."""


class _Tail:
    __slots__ = ("ended", "kept", "kept_from", "seen", "touched", "waiters")

    def __init__(self, seen: int, now: float) -> None:
        self.seen = seen  # highest seq known to be in the stream
        self.ended = False  # the entry at seen ends the stream
        self.kept: Entries = []  # the last entries the calls brought, up to seen
        self.kept_from = seen + 1  # the seq of kept[0]
        self.touched = now  # when a reader last came
        self.waiters: list[tuple[int, asyncio.Future[Entries | bool]]] = []

    def after(self, after: int) -> Entries:
        """The kept entries after seq ``after`` ([] when none, or not kept)."""
        at = after + 1 - self.kept_from
        return self.kept[at:] if 0 <= at < len(self.kept) else []

    def restart(self, seen: int) -> None:
        """A reader read up to ``seen``, past what the calls brought: tail from there."""
        self.seen, self.ended, self.kept, self.kept_from = seen, False, [], seen + 1

    def keep(self, first: int, entries: Entries, count: int) -> None:
        if self.kept and self.kept_from + len(self.kept) == first:
            self.kept += entries
        else:
            self.kept, self.kept_from = entries, first
        if len(self.kept) > count:
            self.kept_from += len(self.kept) - count
            self.kept = self.kept[-count:]


class Tailer:
    """The process's shared blocking reader (see the module docstring).

    Args:
        redis: the process's client; the tailer takes one connection of its pool.
        block_s: how long one call blocks at most (the waits have their own timeouts).
        count: entries kept per stream (and brought by one call at most).
        final: whether an entry's fields end its stream.
    """

    def __init__(self, redis: Redis, *, block_s: float, count: int = KEPT,
                 final: Callable[[dict[bytes, bytes]], bool] = lambda fields: False) -> None:
        self._redis = redis
        self._count = count
        self._final = final
        self._client = Redis(connection_pool=redis.connection_pool,
                             single_connection_client=True)
        self._block_ms = max(1, int(block_s * 1000))
        self._tails: dict[str, _Tail] = {}
        self._covered: dict[str, int] = {}  # what the call in flight waits on (key -> after)
        self._in_call = False
        self._client_id: int | None = None
        self._wanted = asyncio.Event()
        self._kicker: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        self._closed = True  # a read still in flight does not start it again
        await stop_tasks(t for t in (self._task, self._kicker) if t is not None)
        self._task = self._kicker = None
        for tail in self._tails.values():
            _wake(tail, False)
        self._tails.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    def follows(self, key: str, after: int) -> bool:
        """Whether a reader at seq ``after`` can :meth:`wait` without reading first:
        the tailer keeps what follows it, or has seen nothing past it (nor the end)."""
        tail = self._tails.get(key)
        if tail is None or after > tail.seen or after < tail.kept_from - 1:
            return False
        return after < tail.seen or not tail.ended

    def saw(self, key: str, seq: int) -> None:
        """A reader read ``key`` up to ``seq`` (not its end): tail it from there.

        A reader that never waits (each read finds more, when its writes are
        slower than the tokens) would otherwise read once per batch for good.
        """
        self.start()
        tail = self._touch(key, seq)
        if seq > tail.seen:
            tail.restart(seq)
        self._wanted.set()

    async def wait(self, key: str, after: int, timeout: float) -> Entries | bool:
        """The entries of ``key`` from seq ``after + 1`` on, once a call brings them.

        Returns at once with what is kept after ``after``. True means "read
        again" (the stream moved past what is kept, or a Redis error, which
        the read then reports); a spurious wake costs one read. False after
        ``timeout``.
        """
        if self._closed:
            return True  # the read finds its journal closed
        self.start()
        loop = asyncio.get_running_loop()
        tail = self._touch(key, after)
        kept = tail.after(after)
        if kept:
            return kept
        if tail.seen > after:
            return True  # it moved past what is kept: read it
        if tail.seen < after:  # the reader read further than the calls brought
            tail.restart(after)
        waiter: asyncio.Future[Entries | bool] = loop.create_future()
        waiting = (after, waiter)
        tail.waiters.append(waiting)
        self._wanted.set()
        if self._in_call and key not in self._covered and self._kicker is None:
            self._kicker = asyncio.ensure_future(self._kick())
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            tail.touched = loop.time()
            if waiting in tail.waiters:
                tail.waiters.remove(waiting)

    def _touch(self, key: str, seq: int) -> _Tail:
        """The tail of ``key`` (a new one at ``seq``), marked as come to now."""
        now = asyncio.get_running_loop().time()
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = _Tail(seq, now)
        tail.touched = now
        return tail

    async def _kick(self) -> None:
        """Interrupt the call in flight until it covers every stream waited on."""
        try:
            while self._in_call and any(
                tail.waiters and key not in self._covered for key, tail in self._tails.items()
            ):
                if self._client_id is not None:
                    with contextlib.suppress(RedisError, OSError):
                        if await self._redis.client_unblock(self._client_id):
                            return
                await asyncio.sleep(0.001)  # the call is on its way to Redis: try again
        finally:
            self._kicker = None

    def _cover(self) -> dict[str, int]:
        """Forget the tails nobody came to for :data:`LINGER_S`; the rest, from their seen."""
        stale = asyncio.get_running_loop().time() - LINGER_S
        for key, tail in list(self._tails.items()):
            if not tail.waiters and tail.touched < stale:
                del self._tails[key]
        return {key: tail.seen for key, tail in self._tails.items() if not tail.ended}

    async def _run(self) -> None:
        while True:
            covered = self._cover()
            if not covered:
                self._wanted.clear()
                if self._tails:  # only ended ones, kept for their readers: forget them in time
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wanted.wait(), LINGER_S)
                else:
                    await self._wanted.wait()
                continue
            self._covered = covered
            self._in_call = True
            try:
                if self._client_id is None:
                    self._client_id = int(await self._client.client_id())
                got: Any = await self._client.xread(
                    {key: f"{seen}-1" for key, seen in covered.items()},
                    count=self._count, block=self._block_ms,
                )
            except (RedisError, OSError) as exc:
                log.debug("journal: shared tail call failed (%s)", exc)
                self._client_id = None
                for tail in self._tails.values():
                    _wake(tail, True)  # their reads report the outage
                self._tails.clear()
                await asyncio.sleep(0.2)
                continue
            finally:
                self._in_call = False
                self._covered = {}
            for raw_key, entries in got or []:
                moved = self._tails.get(raw_key.decode())
                if moved is not None and entries:
                    self._moved(moved, entries)

    def _moved(self, tail: _Tail, entries: Entries) -> None:
        """Keep what a call brought and hand each waiter what follows its seq."""
        first = int(entries[0][0].split(b"-", 1)[0])
        last = first + len(entries) - 1  # a writer's seqs have no gaps
        if last <= tail.seen:
            return  # a reader read it meanwhile
        tail.keep(first, entries, self._count)
        tail.seen, tail.ended = last, self._final(entries[-1][1])
        waiters, tail.waiters = tail.waiters, []
        for after, waiter in waiters:
            if not waiter.done():
                waiter.set_result(tail.after(after) or True)


def _wake(tail: _Tail, result: bool) -> None:
    waiters, tail.waiters = tail.waiters, []
    for _, waiter in waiters:
        if not waiter.done():
            waiter.set_result(result)
