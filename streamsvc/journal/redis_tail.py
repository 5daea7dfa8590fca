"""One blocking ``XREAD`` for every stream this process's readers wait on.

A reader of a stream written by another instance has to wait for Redis to
hold more. One ``XREAD BLOCK`` per reader would hold one Redis connection
per waiting client (a thousand readers, a thousand connections) and drop it
whenever its client leaves mid-call. Here one task, on one connection of the
shared pool, blocks on all the waited-on streams at once and wakes the
readers of whichever stream moved; each reader then fetches its own events.

A reader that starts waiting on a stream the blocked call does not cover
interrupts it with ``CLIENT UNBLOCK`` (from another pooled connection), so
the call is re-issued with that stream added. A stream stays covered for
one more call after it moved, so a reader coming back for the next event
finds it covered and costs no interruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamsvc.tasks import stop_tasks

__all__ = ["Tailer"]

log = logging.getLogger("streamsvc.journal")


class _Tail:
    __slots__ = ("recent", "seen", "waiters")

    def __init__(self, seen: int) -> None:
        self.seen = seen  # highest seq known to be in the stream
        self.waiters: list[asyncio.Future[bool]] = []
        self.recent = False  # moved in the last call: stays covered for one more


class Tailer:
    """The process's shared blocking reader (see the module docstring).

    Args:
        redis: the process's client; the tailer takes one connection of its pool.
        block_s: how long one call blocks at most (the waits have their own timeouts).
    """

    def __init__(self, redis: Redis, *, block_s: float) -> None:
        self._redis = redis
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

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        await stop_tasks(t for t in (self._task, self._kicker) if t is not None)
        self._task = self._kicker = None
        for tail in self._tails.values():
            _wake(tail, False)
        self._tails.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def wait(self, key: str, after: int, timeout: float) -> bool:
        """Wait until ``key`` may hold an entry past seq ``after``; False after ``timeout``.

        True means "read again" (also after a Redis error, which the read
        then reports); a spurious wake costs one read.
        """
        self.start()
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = _Tail(after)
        elif tail.seen > after:
            return True  # it moved after the reader looked
        else:
            tail.seen = after  # a call still waiting from further back wakes once, then not
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        tail.waiters.append(waiter)
        self._wanted.set()
        if self._in_call and key not in self._covered and self._kicker is None:
            self._kicker = asyncio.ensure_future(self._kick())
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            if waiter in tail.waiters:
                tail.waiters.remove(waiter)

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

    async def _run(self) -> None:
        while True:
            for key, tail in list(self._tails.items()):
                if not tail.waiters and not tail.recent:
                    del self._tails[key]
                tail.recent = False
            if not self._tails:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            self._covered = {key: tail.seen for key, tail in self._tails.items()}
            self._in_call = True
            try:
                if self._client_id is None:
                    self._client_id = int(await self._client.client_id())
                got: Any = await self._client.xread(
                    {key: f"{seen}-1" for key, seen in self._covered.items()},
                    count=1, block=self._block_ms,
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
                if moved is None or not entries:
                    continue
                moved.seen = max(moved.seen, int(entries[-1][0].split(b"-", 1)[0]))
                moved.recent = True
                _wake(moved, True)


def _wake(tail: _Tail, result: bool) -> None:
    waiters, tail.waiters = tail.waiters, []
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(result)
