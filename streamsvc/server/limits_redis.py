"""The limits in Redis, so that they hold across instances (``journal.backend = "redis"``).

Keys (``prefix`` is ``journal.redis_prefix``; key ids, not keys, name them):

* ``{prefix}l:rate:{key id}``: the requests-per-minute token bucket of a key, a
  hash ``{tokens, ts}`` updated by one Lua script (read, refill, take, write
  in one atomic step, on Redis's clock so the instances' clocks do not
  matter). It expires once it would be full again (a minute unused).
* ``{prefix}l:streams:{key id}``: the open streams of a key, a sorted set: member a
  slot id (``{instance}:{n}``), score the time (ms, Redis's clock) it
  expires. Each process refreshes all its slots in one pipeline every
  ``writer_lease_s / 3`` to ``writer_lease_s * 3`` ahead, and removes a slot
  when its stream ends; the slots of a process that died expire by
  themselves, and counting drops expired members first.

The per-instance ``max_streams`` stays in memory: it protects this process.

Where this departs from the norm: a limit check that cannot reach Redis lets
the request through (fail open), with one warning per outage. A limit is
there to share capacity fairly, not to guard data; and while Redis is down
the journal refuses new streams with ``journal_unavailable`` anyway, so
failing closed here would only turn cheap requests (``/v1/models``) into 429s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import defaultdict

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamsvc.config import LimitsConfig
from streamsvc.server.limits import (
    MemoryLimiter,
    StreamSlot,
    rate_exceeded,
    streams_per_key_exceeded,
)
from streamsvc.tasks import stop_tasks

__all__ = ["RedisLimiter"]

log = logging.getLogger("streamsvc")

# KEYS[1] the bucket; ARGV[1] capacity (requests per minute).
# Returns 0 when a token was taken, else the milliseconds until one is there.
_TAKE_TOKEN = """
local capacity = tonumber(ARGV[1])
local rate = capacity / 60000.0
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local since = now - (tonumber(state[2]) or now)
if since > 0 then tokens = math.min(capacity, tokens + since * rate) end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) / rate)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate) + 1)
return wait
"""

# KEYS[1] the key's slots; ARGV[1] the limit, ARGV[2] the new slot, ARGV[3] its TTL (ms).
# Returns 1 when the slot was added, 0 when the key already has `limit` live slots.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS[1] the key's slots; ARGV[1] the TTL (ms), ARGV[2..] this process's slots of that key.
# A slot that expired meanwhile (a long outage) is added back: its stream still runs.
_REFRESH = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
"""


class RedisLimiter:
    """The :class:`~streamsvc.server.limits.Limiter` shared by every instance on one Redis.

    :meth:`start` it before use (the slot refresher) and :meth:`close` it at
    shutdown; the Redis client belongs to the app.

    Args:
        redis: the process's client.
        config: the ``[limits]`` section.
        prefix: ``journal.redis_prefix``.
        lease_s: ``journal.writer_lease_s``: slots are refreshed every third of
            it and expire three leases after the last refresh.
    """

    def __init__(self, redis: Redis, config: LimitsConfig, *, prefix: str = "streamsvc:",
                 lease_s: float = 5.0) -> None:
        self._redis = redis
        self._config = config
        self._prefix = prefix
        self._refresh_s = lease_s / 3
        self._slot_ttl_ms = max(1, int(lease_s * 3 * 1000))
        self._take_token = redis.register_script(_TAKE_TOKEN)
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)
        self._instance = secrets.token_hex(6)
        self._numbers = itertools.count(1)
        # This instance's own counts (and its max_streams); the per-key limit is Redis's.
        self._local = MemoryLimiter(msgspec.structs.replace(
            config, max_streams_per_key=0, requests_per_minute_per_key=0))
        self._slots: dict[str, set[str]] = defaultdict(set)  # key id -> slot ids held here
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        # A refresh in flight re-adds the slots it read; a removal waits for it to finish.
        self._writing = asyncio.Lock()
        self._outage = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start refreshing this process's slots."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        """Stop refreshing and remove the slots still held here (best effort)."""
        if self._refresher is not None:
            await stop_tasks([self._refresher])
            self._refresher = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        held, self._slots = self._slots, defaultdict(set)
        if any(held.values()):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key_id, slots in held.items():
                        if slots:
                            pipe.zrem(self._slots_key(key_id), *slots)
                    await pipe.execute()
            except RedisError as exc:
                self._failed("remove the slots of this instance", exc)

    # -- the Limiter protocol ------------------------------------------------------------------

    async def check_rate(self, key_id: str) -> None:
        rpm = self._config.requests_per_minute_per_key
        if rpm <= 0:
            return
        try:
            wait_ms = int(await self._take_token(keys=[f"{self._prefix}l:rate:{key_id}"], args=[rpm]))
        except RedisError as exc:
            self._failed("check requests_per_minute_per_key", exc)
            return
        self._recovered()
        if wait_ms > 0:
            raise rate_exceeded(rpm, wait_ms / 1000)

    async def acquire_stream(self, key_id: str | None) -> StreamSlot:
        local = await self._local.acquire_stream(key_id)  # max_streams, and the counts here
        per_key = self._config.max_streams_per_key
        if key_id is None or not per_key:
            return local
        slot_id = f"{self._instance}:{next(self._numbers)}"
        try:
            added = await self._acquire(keys=[self._slots_key(key_id)],
                                        args=[per_key, slot_id, self._slot_ttl_ms])
        except RedisError as exc:
            self._failed("check max_streams_per_key", exc)
            added = 1  # counted here all the same: the refresher adds it once Redis is back
        except BaseException:
            local.release()
            raise
        else:
            self._recovered()
        if not added:
            local.release()
            raise streams_per_key_exceeded(per_key, " on all instances")
        self._slots[key_id].add(slot_id)

        def release() -> None:
            local.release()
            self._remove_soon(key_id, slot_id)

        return StreamSlot(release)

    def open_streams(self, key_id: str | None = None) -> int:
        """Open streams of this instance (of ``key_id``'s, when given); Redis holds the total."""
        return self._local.open_streams(key_id)

    # -- internals -----------------------------------------------------------------------------

    def _slots_key(self, key_id: str) -> str:
        return f"{self._prefix}l:streams:{key_id}"

    def _remove_soon(self, key_id: str, slot_id: str) -> None:
        held = self._slots.get(key_id)
        if held is not None:
            held.discard(slot_id)
            if not held:
                del self._slots[key_id]
        task = asyncio.get_running_loop().create_task(self._remove(key_id, slot_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove(self, key_id: str, slot_id: str) -> None:
        try:
            async with self._writing:
                await self._redis.zrem(self._slots_key(key_id), slot_id)
        except RedisError as exc:
            self._failed("give a stream slot back (it expires by itself)", exc)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                async with self._writing:
                    held = {key_id: sorted(slots) for key_id, slots in self._slots.items()}
                    if not held:
                        continue
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key_id, slots in held.items():
                            await self._refresh(keys=[self._slots_key(key_id)],
                                                args=[self._slot_ttl_ms, *slots], client=pipe)
                        await pipe.execute()
            except RedisError as exc:
                self._failed("refresh the stream slots of this instance", exc)
            else:
                self._recovered()

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning("limits: cannot %s in Redis (%s: %s): limits are not enforced across"
                        " instances until it is back", what, type(exc).__name__, exc)

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info("limits: Redis is reachable again; limits hold across instances")
