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

from streamsvc.chunks import Chunk
from streamsvc.reactive.direct import DirectObservable, subscribe_direct
from streamsvc.reactive.operators._common import LoopScheduler, scheduler_of
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
    plan = _Plan(sources, first_token_s, idle_s, max_attempts, backoff_base, backoff_max, held,
                 on_retry, scheduler)
    return DirectObservable(plan.subscribe)  # it keeps the observer grammar itself


class _Plan:
    """What :func:`attempts_` was given; each subscription to it is a :class:`_Run`, which
    reads its settings here.

    An object, not a closure: the Observable lives as long as its stream, and a
    closure over these nine values would be eleven objects (a function, its
    tuple and a cell each) for every collection of the garbage collector to walk.
    """

    __slots__ = ("backoff_base", "backoff_max", "first_token_s", "held", "idle_s",
                 "max_attempts", "on_retry", "scheduler", "sources")

    def __init__(
        self, sources: Sequence[Observable[Chunk]], first_token_s: float, idle_s: float,
        max_attempts: int, backoff_base: float, backoff_max: float,
        held: Callable[[], bool] | None, on_retry: RetryListener | None,
        scheduler: abc.SchedulerBase | None,
    ) -> None:
        self.sources = sources
        self.first_token_s = first_token_s
        self.idle_s = idle_s
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.held = held
        self.on_retry = on_retry
        self.scheduler = scheduler

    def subscribe(
        self, observer: abc.ObserverBase[Chunk], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        # Named as what it stands for: the error an embedder sees stays the same.
        timers = scheduler_of(self.scheduler, scheduler, "retry_with_backoff")
        run = _Run(self, observer, scheduler, timers)
        run.start()
        return run


class _Run(abc.DisposableBase):
    """One subscription's attempts, and their disposable.

    Its state lives in one object, not in closures that call each other: those
    would form a reference cycle, and every stream's whole chain would wait
    for the garbage collector instead of being freed when the stream ends.
    It holds the attempt in flight (its subscription, or the backoff timer
    before it) and that attempt's timer as what stops each, and drops them
    when it is disposed, so nothing refers back afterwards. No Rx
    disposables or locks of its own: a subscription lives on one thread.
    """

    __slots__ = ("_attempt", "_timer", "attempt", "clock", "content", "disposed", "held_back",
                 "index", "last", "loop", "observer", "plan", "scheduler", "started", "timers",
                 "token")

    def __init__(
        self,
        plan: _Plan,
        observer: abc.ObserverBase[Chunk],
        scheduler: abc.SchedulerBase | None,
        timers: abc.SchedulerBase,
    ) -> None:
        self.plan = plan
        self.observer = observer
        self.scheduler = scheduler
        self.timers = timers
        # On the server's scheduler a timer is the loop's own (one TimerHandle).
        self.loop = timers.loop if isinstance(timers, LoopScheduler) else None
        self.clock = seconds_clock(timers)
        self._attempt = _Slot()  # the current attempt's source, or the backoff timer before it
        self._timer = _Slot()  # the current attempt's first-token or idle timer
        self.disposed = False
        self.index = 0
        self.attempt = 1
        self.started = False  # some attempt sent content: no retry from here on
        self.content = False  # the current attempt sent content
        self.last = 0.0
        self.token = 0  # calls from an abandoned attempt carry an older token and are ignored
        self.held_back: list[Chunk] = []  # framing of the attempt, until its first content

    def dispose(self) -> None:
        if not self.disposed:
            self.disposed = True
            self.token += 1  # what the attempt still sends is dropped
            self._timer.dispose()
            self._attempt.dispose()

    def start(self, *_: Any) -> None:
        self.token += 1
        token = self.token
        self.content = False
        self.held_back.clear()
        if self.plan.first_token_s > 0:
            self._timer.set(self._later(self.plan.first_token_s,
                                        _Call(self, token, self._first_token_late)))
        before = self._attempt.stop
        attempt = subscribe_direct(self.plan.sources[self.index], _Attempt(self, token),
                                   self.scheduler)
        if token == self.token and self._attempt.stop is before:
            self._attempt.set(attempt.dispose)
        else:  # it failed inside subscribe (the next attempt is planned), or we were disposed
            attempt.dispose()

    def first(self, chunk: Chunk) -> None:
        """A chunk of the current attempt before its first content."""
        if not chunk.has_content:
            # Framing waits for the first content: an attempt that sent only
            # framing can still be replaced without a duplicate.
            self.held_back.append(chunk)
            return
        self.content = self.started = True
        self._timer.set(None)
        if self.plan.idle_s > 0:
            self.last = self.clock()
            self._timer.set(self._later(self.plan.idle_s, _Call(self, self.token, self._check)))
        observer = self.observer
        for framing in self.held_back:
            observer.on_next(framing)
        self.held_back.clear()
        observer.on_next(chunk)

    def _first_token_late(self) -> None:
        self.fail(self.token, first_token_error(self.plan.first_token_s))

    def _check(self) -> None:
        if self.plan.held is not None and self.plan.held():
            self.last = self.clock()
        waited = self.clock() - self.last
        if waited < self.plan.idle_s:
            self._timer.set(self._later(self.plan.idle_s - waited,
                                        _Call(self, self.token, self._check)))
            return
        self.fail(self.token, idle_error(self.plan.idle_s))

    def fail(self, token: int, error: Exception) -> None:
        if token != self.token:
            return
        self.token += 1  # this attempt is over: what it sends now is dropped
        self._timer.set(None)
        given = self.plan
        upcoming = None
        if not self.started:
            upcoming = next_attempt(error, self.index, self.attempt, len(given.sources),
                                    given.max_attempts, given.backoff_base, given.backoff_max)
        self.held_back.clear()
        if upcoming is None:
            self._attempt.set(None)
            self.observer.on_error(error)
            return
        self.index, self.attempt, delay = upcoming
        if given.on_retry is not None:
            given.on_retry(self.index, self.attempt, error, delay)
        self._attempt.set(self._later(delay, self.start))

    def completed(self, token: int) -> None:
        if token != self.token:
            return
        self.token += 1
        self._timer.set(None)
        observer = self.observer
        for framing in self.held_back:
            observer.on_next(framing)
        self.held_back.clear()
        observer.on_completed()

    def _later(self, seconds: float, action: Callable[..., None]) -> Callable[[], object]:
        """Call ``action`` in ``seconds``; returns what cancels it."""
        if self.loop is not None:
            return self.loop.call_later(seconds, action).cancel
        return self.timers.schedule_relative(seconds, action).dispose


class _Slot:
    """What stops one running thing (a subscription, a timer), replaced as the run goes on.

    As a ``SerialDisposable`` without its lock: setting another stops the one
    before; once disposed, what is set is stopped at once.
    """

    __slots__ = ("disposed", "stop")

    def __init__(self) -> None:
        self.stop: Callable[[], object] | None = None
        self.disposed = False

    def set(self, stop: Callable[[], object] | None) -> None:
        if self.disposed and stop is not None:
            stop()
            return
        old, self.stop = self.stop, stop
        if old is not None:
            old()

    def dispose(self) -> None:
        self.disposed = True  # first: what the stop sets meanwhile is stopped at once
        old, self.stop = self.stop, None
        if old is not None:
            old()


class _Attempt(abc.ObserverBase[Chunk]):
    """The observer of one attempt's source: what it sends counts while it is the current one."""

    __slots__ = ("run", "token")

    def __init__(self, run: _Run, token: int) -> None:
        self.run = run
        self.token = token

    def on_next(self, value: Chunk) -> None:
        run = self.run
        if self.token != run.token:
            return
        if run.content:
            run.last = run.clock()
            run.observer.on_next(value)
        else:
            run.first(value)

    def on_error(self, error: Exception) -> None:
        self.run.fail(self.token, error)

    def on_completed(self) -> None:
        self.run.completed(self.token)


class _Call:
    """A timer's action for one attempt: ignored once that attempt is over."""

    __slots__ = ("action", "run", "token")

    def __init__(self, run: _Run, token: int, action: Callable[[], None]) -> None:
        self.run = run
        self.token = token
        self.action = action

    def __call__(self, *_: Any) -> None:
        if self.token == self.run.token:
            self.action()
