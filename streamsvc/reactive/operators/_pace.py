"""Body of :func:`streamsvc.operators.pace`.

A token bucket over characters: every ``tick`` the text that the rate allows
goes out, cutting a long delta where the allowance ends; quiet time saves up
at most one tick's allowance (or one character, at slow rates). When a backlog builds, the rate rises so that
it drains in about ``max_lag``; the timer runs only while something waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SerialDisposable

from streamsvc.chunks import TEXT_FIELDS, Chunk, split_text
from streamsvc.reactive.operators._common import scheduler_of

# Allowance is a float sum of rate * elapsed: 10 x 0.1 must count as 1.
_EPSILON = 1e-9


def _chars(chunk: Chunk) -> int:
    """Characters of text and tool-call arguments a chunk carries, over all choices."""
    total = 0
    for choice in chunk.choices:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for field in TEXT_FIELDS:
            value = delta.get(field)
            if isinstance(value, str):
                total += len(value)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    total += len(arguments)
    return total


def pace_(
    chars_per_s: float, max_lag: float, tick: float, scheduler: abc.SchedulerBase | None
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, "pace")
            timer = SerialDisposable()
            queue: deque[tuple[Chunk, int]] = deque()
            backlog = 0  # characters waiting
            allowance = 0.0
            rate = chars_per_s
            last_tick: datetime | None = None
            completed = False

            def emit_allowed() -> None:
                nonlocal allowance, backlog
                while queue:
                    chunk, size = queue[0]
                    whole = int(allowance + _EPSILON)  # characters allowed now
                    if size <= whole or size == 0:
                        queue.popleft()
                    elif whole >= 1 and (parts := split_text(chunk, whole)):
                        head, rest = parts
                        size = whole
                        queue[0] = (rest, queue[0][1] - size)
                        chunk = head
                    elif allowance > 0 and size > 1 and split_text(chunk, 1) is None:
                        queue.popleft()  # cannot be cut: goes whole, paid for by the next ticks
                    else:
                        return
                    allowance -= size
                    backlog -= size
                    observer.on_next(chunk)

            def run(*_: Any, after_quiet: bool = False) -> None:
                nonlocal allowance, last_tick, rate
                timer.disposable = None
                # Catch up: the rate rises so that what waits now drains in about
                # max_lag, and stays there until the backlog is gone (recomputing
                # it every tick would drain it ever more slowly).
                if max_lag > 0 and backlog / max_lag > rate:
                    rate = backlog / max_lag
                now = timer_scheduler.now
                # At least one character, or a slow rate would never release one.
                burst = max(rate * tick, 1.0)
                if last_tick is None:
                    allowance = burst
                else:
                    elapsed = (now - last_tick).total_seconds()
                    allowance += rate * elapsed
                    if after_quiet:
                        # Quiet time pays off debt but saves up no more than one tick;
                        # while text waits, the fraction a tick leaves over is kept.
                        allowance = min(allowance, burst)
                last_tick = now
                emit_allowed()
                if queue:
                    timer.disposable = timer_scheduler.schedule_relative(tick, run)
                    return
                rate = chars_per_s
                if completed:
                    observer.on_completed()

            def on_next(chunk: Chunk) -> None:
                nonlocal backlog
                size = _chars(chunk)
                queue.append((chunk, size))
                backlog += size
                if timer.disposable is None and len(queue) == 1:
                    run(after_quiet=True)

            def on_error(error: Exception) -> None:
                # The error is not held back: what waits goes out at once, then the error.
                timer.disposable = None
                while queue:
                    observer.on_next(queue.popleft()[0])
                observer.on_error(error)

            def on_completed() -> None:
                nonlocal completed
                completed = True
                if not queue:
                    observer.on_completed()

            subscription = source.subscribe(on_next, on_error, on_completed, scheduler=scheduler_)
            return CompositeDisposable(subscription, timer)

        return Observable(subscribe)

    return operator
