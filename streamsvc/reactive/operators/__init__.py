"""Lossless operators for streams of :class:`~streamsvc.Chunk`, for ``Observable.pipe``.

Each is a curried function: ``source.pipe(coalesce(0.02), retry_with_backoff(3))``.
Nothing here drops or reorders text; time-based operators take an explicit
scheduler or use the one the subscription was made with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from reactivex import Observable, abc

from streamsvc.chunks import Chunk
from streamsvc.reactive.operators._coalesce import coalesce_
from streamsvc.reactive.operators._retry import RetryListener, retry_with_backoff_

__all__ = ["RetryListener", "coalesce", "retry_with_backoff"]


def coalesce(
    max_delay: float = 0.0,
    max_chars: int = 4096,
    *,
    scheduler: abc.SchedulerBase | None = None,
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    """Merge adjacent text deltas of the same choice into fewer chunks, losing nothing.

    A held chunk is flushed after ``max_delay`` seconds (0: at the end of the
    current event-loop iteration, i.e. what arrived together), when the merged
    text would pass ``max_chars``, before a chunk that cannot merge (role,
    finish reason, usage, another choice, another tool call), and before an
    error or completion. A timer runs only while something is held.

    ::

        ---a--b--c-----------d--|      deltas " He", "ll", "o" ... " world"
        [   coalesce(5)   ]
        ---------abc---------d--|      (timer started at a, flushed 5 ticks later)

    Args:
        max_delay: seconds a delta may wait for the next one.
        max_chars: the most text characters one merged chunk carries.
        scheduler: for the flush timer; default the subscription's scheduler.
    """
    return coalesce_(max_delay, max_chars, scheduler)


def retry_with_backoff(
    max_attempts: int = 3,
    *,
    backoff_base: float = 0.2,
    backoff_max: float = 5.0,
    fallbacks: Sequence[Observable[Chunk]] = (),
    scheduler: abc.SchedulerBase | None = None,
    on_retry: RetryListener | None = None,
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    """Resubscribe after a retryable error, only while no content has been emitted.

    Waits with exponential backoff and full jitter (at least the error's
    ``retry_after``). Framing chunks (a role-only delta) are held until the
    first content so they are not duplicated by a retry. When ``max_attempts``
    are used up, the next Observable in ``fallbacks`` is tried. After content
    has been emitted an error passes through: a retry would repeat text.

    ::

        source:  --r--#              (r: role only, #: retryable error)
                 ......--r--a--b--|  (second attempt after the backoff)
        [ retry_with_backoff(2) ]
        result:  ----------r-a--b--| (r held until a; the first r is not repeated)

    Args:
        max_attempts: attempts per source, the first included.
        backoff_base: seconds before the second attempt (doubled each time, jittered).
        backoff_max: cap on one wait.
        fallbacks: Observables tried in order once the source is exhausted.
        scheduler: for the backoff timer; default the subscription's scheduler.
        on_retry: told (source index, attempt, error, delay) before each new attempt.
    """
    return retry_with_backoff_(max_attempts, backoff_base, backoff_max, fallbacks, scheduler, on_retry)
