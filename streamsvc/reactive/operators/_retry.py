"""Body of :func:`streamsvc.operators.retry_with_backoff`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import SerialDisposable

from streamsvc.chunks import Chunk
from streamsvc.errors import StreamsvcError
from streamsvc.reactive.operators._common import scheduler_of

RetryListener = Callable[[int, int, Exception, float], None]
"""Called as (source index, attempt, error, delay) before each new attempt."""


def is_retryable(error: Exception) -> bool:
    """Only classified errors that say so are retried."""
    return isinstance(error, StreamsvcError) and error.retryable


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never shorter than ``retry_after``.

    A ``retry_after`` beyond ``cap`` is returned as it is: the caller decides
    not to wait that long (and falls back or gives up) rather than retry early.
    """
    delay = random.uniform(0, min(cap, base * (2 ** (attempt - 1))))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def next_attempt(
    error: Exception,
    index: int,
    attempt: int,
    sources: int,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
) -> tuple[int, int, float] | None:
    """After ``attempt`` on source ``index`` failed: (source, attempt, delay) next, or None.

    The one retry policy, for streams (the operator) and plain requests alike:
    classified retryable errors only; the same source again after a backoff
    while attempts remain, unless it asked (``retry_after``) for longer than
    ``backoff_max`` (it is not retried early) or was too slow to answer
    (``fallback_only``: a first-token timeout); then the next source at once.
    """
    if not is_retryable(error):
        return None
    retry_after = getattr(error, "retry_after", None)
    same_again = not getattr(error, "fallback_only", False) and (
        retry_after is None or retry_after <= backoff_max
    )
    if attempt < max_attempts and same_again:
        return index, attempt + 1, backoff_delay(attempt, backoff_base, backoff_max, retry_after)
    if index + 1 < sources:
        return index + 1, 1, 0.0
    return None


def retry_with_backoff_(
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    fallbacks: Sequence[Observable[Chunk]],
    scheduler: abc.SchedulerBase | None,
    on_retry: RetryListener | None,
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        sources = [source, *fallbacks]

        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            # At subscribe, as every timed operator: without a scheduler the first
            # retryable error would have nowhere to wait its backoff.
            timer_scheduler = scheduler_of(scheduler, scheduler_, "retry_with_backoff")
            current = SerialDisposable()
            index = 0
            attempt = 1
            started = False
            # Framing chunks (role-only deltas) wait for the first content, so an
            # attempt that sent only framing can still be replaced without a duplicate.
            held: list[Chunk] = []

            def start(*_: Any) -> None:
                held.clear()
                before = current.disposable
                subscription = sources[index].subscribe(
                    on_next, on_error, on_completed, scheduler=scheduler_
                )
                # A source that failed inside subscribe has already scheduled the
                # next attempt into ``current``: keep that timer, drop the dead subscription.
                if current.disposable is before:
                    current.disposable = subscription
                else:
                    subscription.dispose()

            def release_held() -> None:
                for chunk in held:
                    observer.on_next(chunk)
                held.clear()

            def on_next(chunk: Chunk) -> None:
                nonlocal started
                if started:
                    observer.on_next(chunk)
                elif chunk.has_content:
                    started = True
                    release_held()
                    observer.on_next(chunk)
                else:
                    held.append(chunk)

            def on_error(error: Exception) -> None:
                nonlocal index, attempt
                plan = None
                if not started:
                    plan = next_attempt(error, index, attempt, len(sources), max_attempts,
                                        backoff_base, backoff_max)
                if plan is None:
                    # Framing of an attempt that failed before content is no part of
                    # any answer; holding it back keeps the error first (an HTTP status).
                    if not started:
                        held.clear()
                    observer.on_error(error)
                    return
                index, attempt, delay = plan
                if on_retry is not None:
                    on_retry(index, attempt, error, delay)
                held.clear()
                current.disposable = timer_scheduler.schedule_relative(delay, start)

            def on_completed() -> None:
                release_held()
                observer.on_completed()

            start()
            return current

        return Observable(subscribe)

    return operator
