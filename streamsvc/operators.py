"""``streamsvc.operators``: the lossless operators, for embedders (see docs/operators.md)."""

from streamsvc.reactive.operators import (
    RetryListener,
    coalesce,
    first_token_timeout,
    idle_timeout,
    pace,
    retry_with_backoff,
    throttle,
    total_timeout,
)

__all__ = [
    "RetryListener",
    "coalesce",
    "first_token_timeout",
    "idle_timeout",
    "pace",
    "retry_with_backoff",
    "throttle",
    "total_timeout",
]
