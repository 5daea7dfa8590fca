"""The server's default per-attempt chain as one operator: first-token timeout, idle timeout
and retry with fallbacks, with one observer per attempt.

Composed from the public operators (``source.pipe(first_token_timeout(a),
idle_timeout(b))`` per upstream, then ``retry_with_backoff``) every chunk
passes three observers and their auto-detaching wrappers: several calls per
token on the relay's hot path. This does the same in one ``on_next``, with
the same rules, the same errors and at most one timer of each kind at a time
(``tests/test_attempts.py`` checks it against the composed chain). The
public operators stay as they are, for embedders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SerialDisposable

from streamsvc.chunks import Chunk
from streamsvc.reactive.operators._common import scheduler_of
from streamsvc.reactive.operators._retry import RetryListener, next_attempt
from streamsvc.reactive.operators._timeouts import first_token_error, idle_error, seconds_clock

__all__ = ["attempts_"]


def attempts_(
    sources: Sequence[Observable[Chunk]],
    *,
    first_token_s: float,
    idle_s: float,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    held: Callable[[], bool] | None = None,
    on_retry: RetryListener | None = None,
    scheduler: abc.SchedulerBase | None = None,
) -> Observable[Chunk]:
    """The chunks of the first of ``sources`` that gets its answer through; 0 s: no timeout.

    Equivalent to ``sources[0].pipe(first_token_timeout, idle_timeout,
    retry_with_backoff(max_attempts, fallbacks=sources[1:] with the same timeouts))``.
    """

    def subscribe(
        observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        # Named as what it stands for: the error an embedder sees stays the same.
        timers = scheduler_of(scheduler, scheduler_, "retry_with_backoff")
        clock = seconds_clock(timers)
        subscription = SerialDisposable()  # the current attempt's source, or a backoff timer
        timer = SerialDisposable()  # the current attempt's first-token or idle timer
        state: dict[str, Any] = {"index": 0, "attempt": 1, "started": False, "last": 0.0,
                                 "token": 0}
        held_back: list[Chunk] = []  # framing of the attempt, until its first content

        def start(*_: Any) -> None:
            state["token"] += 1
            token = state["token"]  # calls from an abandoned attempt are ignored
            state["content"] = False
            held_back.clear()
            if first_token_s > 0:
                timer.disposable = timers.schedule_relative(
                    first_token_s, lambda *_: fail(token, first_token_error(first_token_s)))
            before = subscription.disposable
            attempt = sources[state["index"]].subscribe(
                lambda chunk: on_next(token, chunk), lambda error: fail(token, error),
                lambda: on_completed(token), scheduler=scheduler_)
            if token == state["token"] and subscription.disposable is before:
                subscription.disposable = attempt
            else:  # it failed inside subscribe, and the next attempt is already planned
                attempt.dispose()

        def on_next(token: int, chunk: Chunk) -> None:
            if token != state["token"]:
                return
            if state["content"]:
                state["last"] = clock()
                observer.on_next(chunk)
                return
            if not chunk.has_content:
                # Framing waits for the first content: an attempt that sent only
                # framing can still be replaced without a duplicate.
                held_back.append(chunk)
                return
            state["content"] = state["started"] = True
            timer.disposable = None
            if idle_s > 0:
                state["last"] = clock()
                timer.disposable = timers.schedule_relative(idle_s, lambda *_: check(token))
            for framing in held_back:
                observer.on_next(framing)
            held_back.clear()
            observer.on_next(chunk)

        def check(token: int) -> None:
            if token != state["token"]:
                return
            if held is not None and held():
                state["last"] = clock()
            waited = clock() - state["last"]
            if waited < idle_s:
                timer.disposable = timers.schedule_relative(idle_s - waited,
                                                            lambda *_: check(token))
                return
            fail(token, idle_error(idle_s))

        def fail(token: int, error: Exception) -> None:
            if token != state["token"]:
                return
            state["token"] += 1  # this attempt is over: what it sends now is dropped
            timer.disposable = None
            plan = None
            if not state["started"]:
                plan = next_attempt(error, state["index"], state["attempt"], len(sources),
                                    max_attempts, backoff_base, backoff_max)
            held_back.clear()
            if plan is None:
                subscription.disposable = None
                observer.on_error(error)
                return
            state["index"], state["attempt"], delay = plan
            if on_retry is not None:
                on_retry(state["index"], state["attempt"], error, delay)
            subscription.disposable = timers.schedule_relative(delay, start)

        def on_completed(token: int) -> None:
            if token != state["token"]:
                return
            state["token"] += 1
            timer.disposable = None
            for framing in held_back:
                observer.on_next(framing)
            held_back.clear()
            observer.on_completed()

        start()
        return CompositeDisposable(subscription, timer)

    return Observable(subscribe)
