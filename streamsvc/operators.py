"""``streamsvc.operators``: the lossless operators, for embedders (see docs/operators.md)."""

from streamsvc.reactive.operators import RetryListener, coalesce, retry_with_backoff

__all__ = ["RetryListener", "coalesce", "retry_with_backoff"]
