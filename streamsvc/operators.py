"""``streamsvc.operators``: the lossless operators, for embedders (see docs/architecture.md)."""

from streamsvc.reactive.operators import RetryListener, coalesce, retry_with_backoff

__all__ = ["RetryListener", "coalesce", "retry_with_backoff"]
