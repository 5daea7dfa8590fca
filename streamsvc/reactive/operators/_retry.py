"""Body of :func:`streamsvc.operators.retry_with_backoff`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import SerialDisposable

from streamsvc.chunks import Chunk
from streamsvc.errors import StreamsvcError

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
            timer_scheduler = scheduler or scheduler_
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
                if started or not is_retryable(error) or timer_scheduler is None:
                    release_held()
                    observer.on_error(error)
                    return
                retry_after = getattr(error, "retry_after", None)
                # An upstream that asks for more than backoff_max is not retried early.
                patient = retry_after is None or retry_after <= backoff_max
                if attempt < max_attempts and patient:
                    attempt += 1
                    delay = backoff_delay(attempt - 1, backoff_base, backoff_max, retry_after)
                elif index + 1 < len(sources):
                    index, attempt, delay = index + 1, 1, 0.0
                else:
                    release_held()
                    observer.on_error(error)
                    return
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
