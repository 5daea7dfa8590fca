"""Lossless operators for streams of :class:`~streamsvc.Chunk`, for ``Observable.pipe``.

Each is a curried function: ``source.pipe(coalesce(0.02), retry_with_backoff(3))``.
Nothing here drops or reorders text. Every operator here has a timer (a
deadline, a flush, a tick, a backoff): it takes an explicit scheduler or uses
the one the subscription was made with, and subscribing with neither raises
``ValueError`` naming the operator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from reactivex import Observable, abc

from streamsvc.chunks import Chunk
from streamsvc.reactive.operators._coalesce import coalesce_
from streamsvc.reactive.operators._pace import pace_
from streamsvc.reactive.operators._retry import RetryListener, retry_with_backoff_
from streamsvc.reactive.operators._throttle import throttle_
from streamsvc.reactive.operators._timeouts import (
    first_token_timeout_,
    idle_timeout_,
    total_timeout_,
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

Operator = Callable[[Observable[Chunk]], Observable[Chunk]]


def coalesce(
    max_delay: float = 0.0,
    max_chars: int = 4096,
    *,
    scheduler: abc.SchedulerBase | None = None,
) -> Operator:
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
) -> Operator:
    """Resubscribe after a retryable error, only while no content has been emitted.

    Waits with exponential backoff and full jitter (at least the error's
    ``retry_after``); an error marked ``fallback_only`` (a first-token
    timeout) goes to the next source at once. Framing chunks (a role-only
    delta) are held until the first content so they are not duplicated by a
    retry; when the last attempt fails before content they are dropped, so the
    error is the first thing downstream sees (an HTTP endpoint can still answer
    with its status). When ``max_attempts`` are used up, the next Observable in
    ``fallbacks`` is tried. After content has been emitted an error passes
    through: a retry would repeat text.

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


def throttle(min_interval: float, *, scheduler: abc.SchedulerBase | None = None) -> Operator:
    """At most one emission per ``min_interval`` seconds; what arrives in between is merged.

    Lossless, unlike Rx's ``throttle_first``, ``sample`` and ``debounce``: a
    chunk that arrives inside the interval is held and goes out, merged with
    the others, when the interval ends (a chunk that cannot merge, such as
    the finish, goes out in the same emission, in order). A chunk arriving
    after a quiet interval goes out at once. Completion and errors flush
    what is held first. A timer runs only while something is held.

    ::

        --a-b-c------------d-e--|      deltas, min_interval = 10 ticks
        [     throttle(10)     ]
        --a-------bc-------d---e|      (bc at a+10; d at once; e flushed by completion)

    Args:
        min_interval: seconds between two emissions.
        scheduler: for the timer; default the subscription's scheduler.
    """
    return throttle_(min_interval, scheduler)


def pace(
    chars_per_s: float,
    *,
    max_lag: float = 1.0,
    tick: float = 0.05,
    scheduler: abc.SchedulerBase | None = None,
) -> Operator:
    """Release text at a steady ``chars_per_s``, for a typing effect; nothing is lost.

    Every ``tick`` seconds the characters the rate allows go out, a long
    delta being cut where the allowance ends (a role stays on the first
    piece). It never emits what the upstream has not sent, and when more
    than ``max_lag`` seconds' worth of text waits, the rate rises so that the
    backlog drains in about ``max_lag``: the output never falls far behind
    the upstream. Chunks without text (role, finish, usage) go out in their
    place in order; a chunk that cannot be cut goes whole. Completion waits
    for the backlog; an error sends the backlog at once, then the error.

    ::

        --"Hello world"-----------|          chars_per_s = 2 per tick
        [         pace(...)        ]
        --"He"-"ll"-"o "-"wo"-"rl"-"d"|

    Args:
        chars_per_s: the steady output rate.
        max_lag: seconds of text that may wait before the rate rises (0: never rises).
        tick: seconds between releases while text waits.
        scheduler: for the timer; default the subscription's scheduler.
    """
    return pace_(chars_per_s, max_lag, tick, scheduler)


def first_token_timeout(seconds: float, *, scheduler: abc.SchedulerBase | None = None) -> Operator:
    """Fail with ``upstream_timeout`` unless content arrives within ``seconds`` of subscribing.

    Framing chunks (a role-only delta) do not stop the clock; the first text
    or tool call does. On timeout the source is disposed (the upstream
    request is cancelled); the error is ``fallback_only``, so
    ``retry_with_backoff`` around it moves to the next upstream.

    ::

        --r---------------#        r: role only, timeout 10 ticks
        [ first_token_timeout(10) ]
        --r-------#                (upstream_timeout at 10; source disposed)

    Args:
        seconds: the wait for the first content.
        scheduler: for the timer; default the subscription's scheduler.
    """
    return first_token_timeout_(seconds, scheduler)


def idle_timeout(
    seconds: float,
    *,
    scheduler: abc.SchedulerBase | None = None,
    held: Callable[[], bool] | None = None,
) -> Operator:
    """Fail with ``idle_timeout`` when no chunk arrives for ``seconds`` once content has begun.

    The wait for the first content is ``first_token_timeout``'s (a reasoning
    model may send its role chunk and then think for long). One timer per
    ``seconds`` at most, not one per chunk: the time of the last chunk is
    noted and the timer re-armed for what is left.

    ::

        --a-b-c--------------      timeout 10 ticks
        [   idle_timeout(10)   ]
        --a-b-c---------#          (idle_timeout 10 after c; source disposed)

    Args:
        seconds: the longest gap between two chunks.
        scheduler: for the timer; default the subscription's scheduler.
        held: True while the consumer holds the source back (backpressure):
            a gap then is the consumer's doing and does not count.
    """
    return idle_timeout_(seconds, scheduler, held)


def total_timeout(seconds: float, *, scheduler: abc.SchedulerBase | None = None) -> Operator:
    """Fail with ``upstream_timeout`` when the stream has not completed ``seconds`` after subscribing.

    What was emitted stays emitted; the error follows it and the source is
    disposed. Put it outside ``retry_with_backoff`` to bound the whole
    answer, retries included.

    ::

        --a-b-c-d-e-f-g-h-...      timeout 10 ticks
        [  total_timeout(10)  ]
        --a-b-c-d-#                (upstream_timeout at 10; source disposed)

    Args:
        seconds: the longest the whole stream may take.
        scheduler: for the timer; default the subscription's scheduler.
    """
    return total_timeout_(seconds, scheduler)
