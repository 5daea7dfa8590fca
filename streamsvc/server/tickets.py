"""Where used tickets are remembered: nonce -> the stream it is bound to.

A ticket is bound on its first use (see ``streamsvc.server.auth``): a
``stream`` ticket to its stream, a ``chat`` ticket first to :data:`IN_USE`
(its stream is being started; nobody else may start one with it) and then
to the stream it started. :class:`MemoryTicketStore` keeps the bindings in
this process; :class:`RedisTicketStore` keeps them in Redis, so that an
EventSource reconnect with the same ticket URL works on any instance and a
chat ticket starts at most one stream across all of them (the claim is one
atomic step).

A binding lives ``ttl_s`` (``journal.retention_s + auth.ticket_ttl_s``)
from its last use, in both stores: every :meth:`~TicketStore.get` and
:meth:`~TicketStore.bind` pushes its expiry out.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamsvc.journal.redis_client import journal_unavailable

__all__ = ["IN_USE", "MemoryTicketStore", "RedisTicketStore", "TicketStore", "shared_secret"]

IN_USE = ""
"""The binding of a chat ticket whose stream is being started (a stream id is never empty)."""


class TicketStore(Protocol):
    """Ticket bindings; memory for one instance, Redis for several."""

    async def get(self, nonce: str) -> str | None:
        """The stream ``nonce`` is bound to (or :data:`IN_USE`), None when it is not bound.

        A binding found is kept for another ``ttl_s``.
        """

    async def claim(self, nonce: str) -> str | None:
        """Bind ``nonce`` to :data:`IN_USE` if it is not bound; atomic.

        Returns None when this call claimed it, else what it was already bound to.
        """

    async def bind(self, nonce: str, stream_id: str) -> None:
        """Bind ``nonce`` to ``stream_id`` for ``ttl_s`` (replacing a claim)."""

    async def release(self, nonce: str) -> None:
        """Forget a claim whose stream did not start; a binding to a stream stays."""

    async def close(self) -> None:
        """Release what the store holds (not the shared Redis client)."""


class MemoryTicketStore:
    """The bindings of one process: a dict, with expired entries swept as it is written.

    Args:
        ttl_s: how long a binding lives after its last use.
        clock: monotonic seconds (tests).
    """

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._bound: dict[str, tuple[str, float]] = {}  # nonce -> (stream id | IN_USE, deadline)
        self._next_sweep = clock() + ttl_s

    def _live(self, nonce: str) -> str | None:
        entry = self._bound.get(nonce)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._bound[nonce]
            return None
        return entry[0]

    def _set(self, nonce: str, value: str) -> None:
        now = self._clock()
        if now >= self._next_sweep:  # at most one full pass per ttl_s: memory stays bounded
            self._sweep(now)
        self._bound[nonce] = (value, now + self._ttl_s)

    def _sweep(self, now: float) -> None:
        self._bound = {n: entry for n, entry in self._bound.items() if entry[1] > now}
        self._next_sweep = now + self._ttl_s

    async def get(self, nonce: str) -> str | None:
        value = self._live(nonce)
        if value is not None:
            self._set(nonce, value)
        return value

    async def claim(self, nonce: str) -> str | None:
        value = self._live(nonce)
        if value is None:
            self._set(nonce, IN_USE)
        return value

    async def bind(self, nonce: str, stream_id: str) -> None:
        self._set(nonce, stream_id)

    async def release(self, nonce: str) -> None:
        if self._live(nonce) == IN_USE:
            del self._bound[nonce]

    async def close(self) -> None:
        self._bound.clear()

    def tracked(self) -> int:
        """Live bindings (tests: nothing leaks)."""
        self._sweep(self._clock())
        return len(self._bound)


# Claim: SET NX, but answering what was there when it was not free (SET NX GET
# needs Redis 7; this works from 6.2, as GETEX does).
_CLAIM = """
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# Release: delete the claim only while it is still a claim (compare and delete).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTicketStore:
    """The bindings of every instance: one Redis string per used ticket.

    Key ``{prefix}{nonce}`` (``prefix`` is ``journal.redis_prefix + "t:"``),
    value the stream id or ``""`` (:data:`IN_USE`), expiring ``ttl_s`` after
    the last use. A Redis error is the typed ``journal_unavailable`` (503):
    without the bindings a ticket cannot be checked, and the journal, on the
    same Redis, could not serve the stream anyway.

    Args:
        redis: the process's client (shared; the app closes it).
        prefix: prepended to the nonce.
        ttl_s: how long a binding lives after its last use.
        url: ``journal.redis_url``, for error messages (the password is hidden).
    """

    def __init__(self, redis: Redis, *, prefix: str, ttl_s: float,
                 url: str = "redis://") -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._url = url
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    def _key(self, nonce: str) -> str:
        return self._prefix + nonce

    async def get(self, nonce: str) -> str | None:
        try:
            found = await self._redis.getex(self._key(nonce), px=self._ttl_ms)
        except RedisError as exc:
            raise journal_unavailable(self._url, exc) from exc
        return _text(found)

    async def claim(self, nonce: str) -> str | None:
        try:
            found = await self._claim(keys=[self._key(nonce)], args=[IN_USE, self._ttl_ms])
        except RedisError as exc:
            raise journal_unavailable(self._url, exc) from exc
        return _text(found)

    async def bind(self, nonce: str, stream_id: str) -> None:
        try:
            await self._redis.set(self._key(nonce), stream_id, px=self._ttl_ms)
        except RedisError as exc:
            raise journal_unavailable(self._url, exc) from exc

    async def release(self, nonce: str) -> None:
        try:
            await self._release(keys=[self._key(nonce)], args=[IN_USE])
        except RedisError as exc:
            raise journal_unavailable(self._url, exc) from exc

    async def close(self) -> None:
        return None  # nothing of its own: the client belongs to the app


async def shared_secret(redis: Redis, *, key: str, url: str = "redis://") -> str:
    """The ticket secret every instance on this Redis uses: the first to ask makes it.

    ``SET NX`` keeps the first instance's random secret (no expiry); every
    instance then reads that one, so tickets and key ids agree across them.
    """
    try:
        await redis.set(key, secrets.token_urlsafe(32), nx=True)
        found = _text(await redis.get(key))
    except RedisError as exc:
        raise journal_unavailable(url, exc) from exc
    if not found:
        raise journal_unavailable(url, RedisError(f"{key} is empty"))
    return found


def _text(value: object) -> str | None:
    """A reply of the (bytes-answering) client as text; None stays None."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
