"""What instances on one Redis tell each other about streams: readers elsewhere, and DELETE.

A stream's generation runs where it was created; its readers may be on any
instance. Two things cross instances:

* **Presence.** A reader on another instance is a member of the sorted set
  ``{prefix}r:{stream id}``, scored with an expiry that its instance keeps
  pushing out (one pipeline per third of a lease for all its readers). The
  writer, when its resume grace period runs out with no local reader, counts
  the members still alive before it stops the stream. A crashed reader
  instance's members expire by themselves.
* **Cancel.** ``DELETE /v1/streams/{id}`` on any instance publishes
  ``cancel {id}`` on the writer's channel ``{prefix}c:{instance}``; the
  writer stops the generation as if the DELETE had come to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamsvc.journal.redis import RedisJournal
from streamsvc.tasks import stop_tasks

__all__ = ["Presence", "RedisPeers"]

log = logging.getLogger("streamsvc.journal")


class Presence:
    """One reader here of a stream written elsewhere; :meth:`RedisPeers.leave` ends it."""

    __slots__ = ("key", "member")

    def __init__(self, key: str, member: str) -> None:
        self.key = key
        self.member = member


class RedisPeers:
    """This instance's side of presence and cancel (see the module docstring).

    Args:
        redis: the process's client.
        journal: the Redis journal (its instance id and stream meta).
        prefix: ``journal.redis_prefix``.
        lease_s: ``journal.writer_lease_s``: presence is refreshed every third of it.
        on_cancel: called with a stream id another instance asked to stop.
    """

    def __init__(self, redis: Redis, journal: RedisJournal, *, prefix: str, lease_s: float,
                 on_cancel: Callable[[str], object]) -> None:
        self._redis = redis
        self._journal = journal
        self._prefix = prefix
        self._lease_s = lease_s
        self._on_cancel = on_cancel
        self._present: set[Presence] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._loops: list[asyncio.Task[None]] = []

    def _channel(self, instance: str) -> str:
        return f"{self._prefix}c:{instance}"

    async def start(self) -> None:
        self._loops = [asyncio.ensure_future(self._listen()),
                       asyncio.ensure_future(self._refresh())]

    async def close(self) -> None:
        await stop_tasks(self._loops)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loops = []
        if self._present:
            with contextlib.suppress(RedisError, OSError):
                pipe = self._redis.pipeline(transaction=False)
                for presence in self._present:
                    pipe.zrem(presence.key, presence.member)
                await pipe.execute()
            self._present.clear()

    # -- presence -----------------------------------------------------------------------------

    async def enter(self, stream_id: str) -> Presence:
        """Count a reader here of a stream another instance writes."""
        presence = Presence(f"{self._prefix}r:{stream_id}", secrets.token_hex(8))
        self._present.add(presence)
        with contextlib.suppress(RedisError, OSError):  # the refresher adds it when Redis is back
            await self._redis.zadd(presence.key, {presence.member: self._expiry()})
        return presence

    def leave(self, presence: Presence) -> None:
        """The reader left: its member goes at once (in the background)."""
        self._present.discard(presence)
        self._background(self._redis.zrem(presence.key, presence.member))

    async def readers(self, stream_id: str) -> int:
        """Live readers of ``stream_id`` on other instances (0 when Redis cannot say)."""
        try:
            return int(await self._redis.zcount(f"{self._prefix}r:{stream_id}",
                                                time.time(), "+inf"))
        except (RedisError, OSError):
            return 0

    def _expiry(self) -> float:
        return time.time() + 3 * self._lease_s

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            if not self._present:
                continue
            pipe = self._redis.pipeline(transaction=False)
            expiry = self._expiry()
            for presence in self._present:
                pipe.zadd(presence.key, {presence.member: expiry})
                pipe.zremrangebyscore(presence.key, "-inf", time.time())
                pipe.expire(presence.key, int(6 * self._lease_s) + 1)
            with contextlib.suppress(RedisError, OSError):
                await pipe.execute()

    # -- cancel -------------------------------------------------------------------------------

    async def cancel(self, stream_id: str) -> bool:
        """Ask the instance writing ``stream_id`` to stop it; False when it has ended or
        nobody got the message."""
        state = await self._journal.last_seq(stream_id)
        if state is None or state[1]:
            return False  # unknown, or it has ended: nothing to stop
        meta = await self._journal.meta(stream_id)
        instance = (meta or {}).get("instance")
        if not instance or instance == self._journal.instance:
            return False
        try:
            received = await self._redis.publish(self._channel(instance),
                                                 f"cancel {stream_id}")
        except (RedisError, OSError):
            return False
        return int(received) > 0

    async def _listen(self) -> None:
        """Take cancel requests for this instance's streams; resubscribe after a Redis outage."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel(self._journal.instance))
                async for message in pubsub.listen():
                    op, _, stream_id = bytes(message["data"]).decode().partition(" ")
                    if op == "cancel" and stream_id:
                        self._on_cancel(stream_id)
            except (RedisError, OSError) as exc:
                log.debug("peers: control channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    # Untyped before redis 8.2, typed from it: the ignore fits both.
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    def _background(self, coro: object) -> None:
        async def run() -> object:
            with contextlib.suppress(RedisError, OSError):
                return await coro  # type: ignore[misc]
            return None

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
