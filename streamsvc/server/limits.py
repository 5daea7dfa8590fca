"""Limits on what clients may start: concurrent streams (per instance, per key), requests per minute.

The server talks to a :class:`Limiter`; :class:`MemoryLimiter` keeps the
counts in this process (one instance). With the Redis journal,
:class:`~streamsvc.server.limits_redis.RedisLimiter` implements the same
Protocol and replaces it at start-up, so the per-key limits hold across
instances. Keys are API key ids (see ``streamsvc.server.auth``), never
the keys themselves; ``None`` means auth is off, and then only the
per-instance limit applies.

Over a limit: :class:`~streamsvc.errors.LimitError`, answered ``429
rate_limited`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from streamsvc.config import LimitsConfig
from streamsvc.errors import LimitError

__all__ = [
    "Limiter", "MemoryLimiter", "StreamSlot", "rate_exceeded",
    "streams_per_key_exceeded",
]

# How long a client over a concurrency limit is told to wait: streams end at
# unknown times, so this is a hint to back off, not a promise.
CONCURRENCY_RETRY_AFTER_S = 1.0


def rate_exceeded(rpm: int, wait_s: float) -> LimitError:
    """Over ``requests_per_minute_per_key``: one more request in ``wait_s``."""
    return LimitError(
        f"this API key made more than limits.requests_per_minute_per_key ({rpm})"
        f" requests in the last minute: retry after {math.ceil(wait_s)} s",
        retry_after=wait_s,
    )


def streams_per_key_exceeded(per_key: int, where: str = "") -> LimitError:
    """Over ``max_streams_per_key`` (``where``: " on all instances" with Redis)."""
    return LimitError(
        f"this API key has limits.max_streams_per_key ({per_key}) streams open{where}:"
        " retry when one ends",
        retry_after=CONCURRENCY_RETRY_AFTER_S,
    )


class StreamSlot:
    """One open stream counted against the limits; :meth:`release` once it ends (idempotent)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def released(self) -> bool:
        return self._release is None


class Limiter(Protocol):
    """What the server needs from a limiter; memory now, Redis for several instances."""

    async def check_rate(self, key_id: str) -> None:
        """Count one request of ``key_id``; raises LimitError when over the rate."""

    async def acquire_stream(self, key_id: str | None) -> StreamSlot:
        """Count one open stream; raises LimitError when over a concurrency limit."""

    def open_streams(self, key_id: str | None = None) -> int:
        """Open streams of ``key_id``, or of the instance when None (tests, metrics)."""


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class MemoryLimiter:
    """The limits of one process: counters and a token bucket per key, in memory.

    Requests per minute is a token bucket holding ``requests_per_minute_per_key``
    tokens, refilled at that rate: a key may burst up to a minute's worth,
    then goes at the rate. ``0`` turns a limit off.
    """

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._open = 0
        self._per_key: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    async def check_rate(self, key_id: str) -> None:
        rpm = self._config.requests_per_minute_per_key
        if rpm <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(float(rpm), now)
        rate = rpm / 60.0
        bucket.tokens = min(float(rpm), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            raise rate_exceeded(rpm, (1.0 - bucket.tokens) / rate)
        bucket.tokens -= 1.0

    async def acquire_stream(self, key_id: str | None) -> StreamSlot:
        limits = self._config
        if limits.max_streams and self._open >= limits.max_streams:
            raise LimitError(
                f"this instance has limits.max_streams ({limits.max_streams}) streams open:"
                " retry later",
                retry_after=CONCURRENCY_RETRY_AFTER_S,
            )
        per_key = limits.max_streams_per_key
        if key_id is not None and per_key and self._per_key.get(key_id, 0) >= per_key:
            raise streams_per_key_exceeded(per_key)
        self._open += 1
        if key_id is not None:
            self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        return StreamSlot(partial(self._release, key_id))  # a closure is two objects more

    def _release(self, key_id: str | None) -> None:
        self._open -= 1
        if key_id is not None:
            left = self._per_key[key_id] - 1
            if left:
                self._per_key[key_id] = left
            else:
                del self._per_key[key_id]

    def open_streams(self, key_id: str | None = None) -> int:
        return self._open if key_id is None else self._per_key.get(key_id, 0)


