"""Bodies of the timeout operators: first token, idle gap, whole stream.

Each runs at most one timer per subscription at a time. ``idle_timeout``
does not restart its timer per chunk: it notes the time of the last chunk
(a monotonic float, not the scheduler's datetime) and, when the timer fires
early, re-arms it for the time that is left, so a fast stream costs one
timer per timeout period, not one per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SerialDisposable, SingleAssignmentDisposable
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.reactive.operators._common import scheduler_of

Operator = Callable[[Observable[Chunk]], Observable[Chunk]]


class _Watch:
    """One watched subscription: the source, its timer, and whether it has ended."""

    __slots__ = ("done", "observer", "subscription", "timer")

    def __init__(self, observer: abc.ObserverBase[Chunk]) -> None:
        self.observer = observer
        self.subscription = SingleAssignmentDisposable()
        self.timer = SerialDisposable()
        self.done = False

    def subscribe(
        self,
        source: Observable[Chunk],
        on_next: Callable[[Chunk], None],
        scheduler: abc.SchedulerBase | None,
    ) -> abc.DisposableBase:
        self.subscription.disposable = source.subscribe(
            on_next, self.on_error, self.on_completed, scheduler=scheduler
        )
        return CompositeDisposable(self.subscription, self.timer)

    def fail(self, error: Exception) -> None:
        """The timer fired: cancel the source (the upstream request) and report."""
        if not self.done:
            self.done = True
            self.subscription.dispose()
            self.observer.on_error(error)

    def on_error(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self.timer.disposable = None
            self.observer.on_error(error)

    def on_completed(self) -> None:
        if not self.done:
            self.done = True
            self.timer.disposable = None
            self.observer.on_completed()


def first_token_error(seconds: float) -> UpstreamError:
    """What ``first_token_timeout`` fails with: try the next upstream, not this one again."""
    return UpstreamError(
        f"no content from the upstream within {seconds:g} s (first_token_timeout)",
        code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True, fallback_only=True,
    )


def idle_error(seconds: float) -> UpstreamError:
    """What ``idle_timeout`` fails with."""
    return UpstreamError(
        f"the upstream sent nothing for {seconds:g} s mid-stream (idle_timeout)",
        code=ErrorCode.IDLE_TIMEOUT, retryable=True,
    )


def first_token_timeout_(seconds: float, scheduler: abc.SchedulerBase | None) -> Operator:
    return _deadline("first_token_timeout", seconds, scheduler,
                     lambda: first_token_error(seconds), until_content=True)


def total_timeout_(seconds: float, scheduler: abc.SchedulerBase | None) -> Operator:
    def error() -> Exception:
        return UpstreamError(
            f"the stream did not finish within {seconds:g} s (total_timeout)",
            code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True,
        )

    return _deadline("total_timeout", seconds, scheduler, error, until_content=False)


def _deadline(
    name: str,
    seconds: float,
    scheduler: abc.SchedulerBase | None,
    make_error: Callable[[], Exception],
    *,
    until_content: bool,
) -> Operator:
    """One timer from subscription; it fails the stream unless content (or the end) came first."""

    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, name)
            watch = _Watch(observer)

            def on_next(chunk: Chunk) -> None:
                if watch.done:
                    return
                if until_content and watch.timer.disposable is not None and chunk.has_content:
                    watch.timer.disposable = None
                observer.on_next(chunk)

            watch.timer.disposable = timer_scheduler.schedule_relative(
                seconds, lambda *_: watch.fail(make_error())
            )
            return watch.subscribe(source, on_next, scheduler_)

        return Observable(subscribe)

    return operator


def seconds_clock(scheduler: abc.SchedulerBase) -> Callable[[], float]:
    """A cheap clock in seconds that agrees with the scheduler's relative timers.

    ``scheduler.now`` builds a datetime (about a microsecond, once per chunk);
    asyncio times its timers by a monotonic clock, which costs far less. Any
    other scheduler (virtual time in tests) is asked for its ``now``.
    """
    if isinstance(scheduler, AsyncIOScheduler):
        return time.monotonic  # what asyncio's loop.time() and call_later go by
    return lambda: scheduler.now.timestamp()


def idle_timeout_(
    seconds: float, scheduler: abc.SchedulerBase | None, held: Callable[[], bool] | None = None
) -> Operator:
    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, "idle_timeout")
            clock = seconds_clock(timer_scheduler)
            watch = _Watch(observer)
            last: float | None = None

            def check(*_: Any) -> None:
                nonlocal last
                if watch.done or last is None:
                    return
                if held is not None and held():
                    last = clock()
                waited = clock() - last
                if waited < seconds:
                    watch.timer.disposable = timer_scheduler.schedule_relative(
                        seconds - waited, check
                    )
                    return
                watch.fail(idle_error(seconds))

            def on_next(chunk: Chunk) -> None:
                nonlocal last
                if watch.done:
                    return
                if last is not None:
                    last = clock()
                elif chunk.has_content:
                    # Before the first content the wait is first_token_timeout's
                    # (a reasoning model may think long after its role chunk).
                    last = clock()
                    watch.timer.disposable = timer_scheduler.schedule_relative(seconds, check)
                observer.on_next(chunk)

            return watch.subscribe(source, on_next, scheduler_)

        return Observable(subscribe)

    return operator

