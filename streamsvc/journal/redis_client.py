"""The process's one Redis client: one connection pool, checked at start-up."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from streamsvc.config import JournalConfig, redact_url
from streamsvc.errors import ErrorCode, StreamError

__all__ = ["connect_redis", "journal_unavailable"]


def journal_unavailable(url: str, error: BaseException) -> StreamError:
    """The typed error for a Redis that cannot be reached; names the journal, never a password."""
    return StreamError(
        f"journal: Redis at {redact_url(url)} is unavailable ({type(error).__name__}: {error})",
        code=ErrorCode.JOURNAL_UNAVAILABLE, retryable=True,
    )


async def connect_redis(config: JournalConfig) -> Redis:
    """A client on ``journal.redis_url`` that answered PING; the caller closes it.

    Raises:
        StreamError: ``journal_unavailable``, naming ``journal.redis_url``, when
            Redis does not answer (the process then exits with that message).
    """
    # Blocking reads (XREAD BLOCK) wait up to one writer lease; the socket
    # timeout must be longer, or a quiet stream would look like a dead Redis.
    # A bounded pool: commands are short pipelines and the waiting is done by one
    # shared blocking call (redis_tail), so a few connections serve thousands of
    # streams; past the bound a command waits for a free connection.
    pool = BlockingConnectionPool.from_url(
        config.redis_url,
        max_connections=config.redis_max_connections,
        timeout=5.0,
        socket_connect_timeout=5.0,
        socket_timeout=config.writer_lease_s + 10.0,
        health_check_interval=30,
        # A pooled connection that Redis closed (a restart, a failover) fails its next
        # command: that command is sent again on a new connection instead of failing
        # a reader (redis-py's connections do not retry by default).
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
    )
    client = Redis.from_pool(pool)  # the client owns the pool: aclose() closes both
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StreamError(
            f"journal.redis_url: cannot reach Redis at {redact_url(config.redis_url)}"
            f" ({type(exc).__name__}: {exc})",
            code=ErrorCode.JOURNAL_UNAVAILABLE, retryable=True,
        ) from exc
    return client
