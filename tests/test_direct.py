"""Direct subscriptions (streamsvc.reactive.direct): the observer as it is, the grammar kept.

The server's chain (upstream request -> fused attempt operator -> generation)
skips Rx's ``AutoDetachObserver``; each piece must then itself send nothing
after its end or after it was disposed, and end once.
"""

from __future__ import annotations

from typing import Any

import pytest
import reactivex
from reactivex import abc
from reactivex.disposable import Disposable
from reactivex.scheduler import ImmediateScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.reactive.direct import DirectObservable, subscribe_direct
from streamsvc.reactive.operators._attempts import attempts_
from tests.test_operators import finish, text


class Recorder(abc.ObserverBase[Chunk]):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_next(self, value: Chunk) -> None:
        self.events.append(("N", value))

    def on_error(self, error: Exception) -> None:
        self.events.append(("E", error))

    def on_completed(self) -> None:
        self.events.append(("C", None))


class Source:
    """A direct source whose observers the test drives by hand."""

    def __init__(self) -> None:
        self.observers: list[abc.ObserverBase[Chunk]] = []
        self.disposed = 0

    def observable(self) -> DirectObservable[Chunk]:
        def subscribe(observer: abc.ObserverBase[Chunk], _: Any = None) -> abc.DisposableBase:
            self.observers.append(observer)
            return Disposable(self._dispose)
        return DirectObservable(subscribe)

    def _dispose(self) -> None:
        self.disposed += 1


def test_a_direct_source_gets_the_observer_itself_and_others_get_rx() -> None:
    source, observer = Source(), Recorder()
    subscribe_direct(source.observable(), observer, None)
    assert source.observers == [observer]

    plain = Recorder()
    subscribe_direct(reactivex.of(text("a")), plain, ImmediateScheduler())
    assert [kind for kind, _ in plain.events] == ["N", "C"]


def test_a_direct_source_subscribed_through_rx_is_an_ordinary_observable() -> None:
    source, observer = Source(), Recorder()
    source.observable().subscribe(observer)
    (wrapped,) = source.observers
    assert wrapped is not observer  # Rx's own wrapper
    wrapped.on_completed()
    wrapped.on_next(text("late"))  # dropped by Rx after the end
    assert observer.events == [("C", None)]
    assert source.disposed == 1  # and Rx disposed the source at the end


def test_a_subscribe_function_that_raises_tells_the_observer() -> None:
    def subscribe(_: abc.ObserverBase[Chunk], __: Any = None) -> abc.DisposableBase:
        raise RuntimeError("cannot start")

    observer = Recorder()
    subscribe_direct(DirectObservable(subscribe), observer, None)
    assert [kind for kind, _ in observer.events] == ["E"]
    assert str(observer.events[0][1]) == "cannot start"


def fused(source: Source, **overrides: Any) -> DirectObservable[Chunk]:
    options: dict[str, Any] = {"first_token_s": 0, "idle_s": 0, "max_attempts": 1,
                               "backoff_base": 0, "backoff_max": 0}
    observable = attempts_([source.observable()], scheduler=ImmediateScheduler(),
                           **options | overrides)
    assert isinstance(observable, DirectObservable)
    return observable


def test_the_fused_operator_sends_nothing_once_disposed() -> None:
    source, observer = Source(), Recorder()
    subscription = subscribe_direct(fused(source), observer, None)
    (upstream,) = source.observers
    upstream.on_next(text("a"))
    subscription.dispose()
    assert source.disposed == 1  # the upstream request is cancelled
    upstream.on_next(text("b"))
    upstream.on_completed()
    assert [(kind, value.content if value else None) for kind, value in observer.events] \
        == [("N", "a")]


@pytest.mark.parametrize("end", ["complete", "error"])
def test_the_fused_operator_ends_once_and_sends_nothing_after(end: str) -> None:
    source, observer = Source(), Recorder()
    subscribe_direct(fused(source), observer, None)
    (upstream,) = source.observers
    upstream.on_next(text("a"))
    upstream.on_next(finish())
    if end == "complete":
        upstream.on_completed()
    else:
        upstream.on_error(UpstreamError("cut", code=ErrorCode.UPSTREAM_ERROR))
    upstream.on_next(text("late"))
    upstream.on_completed()
    upstream.on_error(UpstreamError("late", code=ErrorCode.UPSTREAM_ERROR))
    assert [kind for kind, _ in observer.events] == ["N", "N", "C" if end == "complete" else "E"]


def test_a_retried_attempt_is_ignored_once_the_next_one_runs() -> None:
    source, observer = Source(), Recorder()
    subscribe_direct(fused(source, max_attempts=2), observer, None)
    first = source.observers[0]
    first.on_error(UpstreamError("refused", code=ErrorCode.UPSTREAM_UNAVAILABLE,
                                 retryable=True))
    second = source.observers[1]  # backoff 0 on the immediate scheduler: at once
    first.on_next(text("stale"))
    second.on_next(text("fresh"))
    second.on_completed()
    assert [(kind, value.content if value else None) for kind, value in observer.events] \
        == [("N", "fresh"), ("C", None)]
