"""streamsvc.operators in virtual time: marble tests on a TestScheduler.

Times are ticks; ``scheduler.start()`` creates at 100, subscribes at 200 and
disposes at 1000 unless told otherwise. Cold observables count from their
subscription, so a resubscription replays them.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reactivex import Observable, abc, defer
from reactivex.testing import ReactiveTest, TestScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ClientError, ErrorCode, UpstreamError
from streamsvc.operators import coalesce, retry_with_backoff

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe


def text(content: str, index: int = 0) -> Chunk:
    return Chunk({"choices": [{"index": index, "delta": {"content": content}}]})


def role() -> Chunk:
    return Chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})


def finish(reason: str = "stop") -> Chunk:
    return Chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


def retryable(message: str = "502 from upstream", retry_after: float | None = None) -> UpstreamError:
    return UpstreamError(message, code=ErrorCode.UPSTREAM_UNAVAILABLE, retryable=True,
                         retry_after=retry_after)


class SpyScheduler:
    """Hands work to a TestScheduler and counts what an operator scheduled and what ran."""

    def __init__(self, inner: TestScheduler) -> None:
        self.inner = inner
        self.scheduled: list[float] = []  # due times
        self.fired = 0

    @property
    def now(self) -> Any:
        return self.inner.now

    def _wrap(self, action: Any) -> Any:
        def run(scheduler: abc.SchedulerBase, state: Any = None) -> Any:
            self.fired += 1
            return action(scheduler, state)
        return run

    def schedule(self, action: Any, state: Any = None) -> abc.DisposableBase:
        self.scheduled.append(self.inner.clock)
        return self.inner.schedule(self._wrap(action), state)

    # Due times may come as ticks, timedeltas (idle_timeout) or datetimes (throttle).
    def schedule_relative(self, duetime: Any, action: Any, state: Any = None) -> abc.DisposableBase:
        duetime = self.inner.to_seconds(duetime)
        self.scheduled.append(self.inner.clock + duetime)
        return self.inner.schedule_relative(duetime, self._wrap(action), state)

    def schedule_absolute(self, duetime: Any, action: Any, state: Any = None) -> abc.DisposableBase:
        duetime = self.inner.to_seconds(duetime)
        self.scheduled.append(duetime)
        return self.inner.schedule_absolute(duetime, self._wrap(action), state)


@pytest.fixture
def scheduler() -> TestScheduler:
    return TestScheduler()


# -- coalesce ----------------------------------------------------------------------------------


def test_coalesce_merges_deltas_within_max_delay(scheduler: TestScheduler) -> None:
    # ---a--b--c---------|       " He" "ll" "o"
    # [ coalesce(50) ]
    # ---------------abc-|       one timer, started at a, fires at 210 + 50
    source = scheduler.create_hot_observable(
        on_next(210, text(" He")), on_next(220, text("ll")), on_next(230, text("o")),
        on_completed(300),
    )
    results = scheduler.start(lambda: source.pipe(coalesce(50, scheduler=scheduler)))
    assert results.messages == [on_next(260, text(" Hello")), on_completed(300)]


def test_coalesce_flushes_on_delay_and_starts_a_new_window(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(240, text("b")), on_next(270, text("c")),
        on_completed(400),
    )
    results = scheduler.start(lambda: source.pipe(coalesce(40, scheduler=scheduler)))
    assert results.messages == [
        on_next(250, text("ab")), on_next(310, text("c")), on_completed(400)]


def test_coalesce_zero_delay_merges_what_arrives_together(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(210, text("b")), on_next(220, text("c")),
        on_completed(300),
    )
    results = scheduler.start(lambda: source.pipe(coalesce(0, scheduler=scheduler)))
    assert results.messages == [on_next(210, text("ab")), on_next(220, text("c")),
                                on_completed(300)]


def test_coalesce_flushes_on_size(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, text("abc")), on_next(220, text("de")), on_next(230, text("f")),
        on_next(240, text("ghijk")), on_completed(500),
    )
    results = scheduler.start(lambda: source.pipe(coalesce(100, 5, scheduler=scheduler)))
    assert results.messages == [
        on_next(230, text("abcde")),  # "f" would pass 5 chars: flush, hold "f"
        on_next(240, text("f")),       # "ghijk" would pass 5: flush "f"
        on_next(240, text("ghijk")),   # a chunk at the bound is not held
        on_completed(500),
    ]


def test_coalesce_flushes_before_a_chunk_that_cannot_merge(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(220, text("a")), on_next(230, text("b")),
        on_next(240, text("x", index=1)), on_next(250, finish()), on_completed(260),
    )
    results = scheduler.start(lambda: source.pipe(coalesce(100, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, role()),
        on_next(240, text("ab")),
        on_next(250, text("x", index=1)),
        on_next(250, finish()),
        on_completed(260),
    ]


def test_coalesce_emits_what_it_holds_before_completion(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(220, text("b")), on_completed(230))
    results = scheduler.start(lambda: source.pipe(coalesce(100, scheduler=scheduler)))
    assert results.messages == [on_next(230, text("ab")), on_completed(230)]


def test_coalesce_emits_what_it_holds_before_an_error(scheduler: TestScheduler) -> None:
    error = retryable("upstream went away")
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(220, text("b")), on_error(230, error))
    results = scheduler.start(lambda: source.pipe(coalesce(100, scheduler=scheduler)))
    assert results.messages == [on_next(230, text("ab")), on_error(230, error)]


def test_coalesce_dispose_cancels_the_timer_and_the_source(scheduler: TestScheduler) -> None:
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_next(400, text("b")))
    results = scheduler.start(
        lambda: source.pipe(coalesce(50, scheduler=spy)),  # type: ignore[arg-type]
        disposed=230,
    )
    assert results.messages == []
    assert source.subscriptions == [subscribe(200, 230)]
    assert spy.scheduled == [260] and spy.fired == 0


def test_coalesce_schedules_no_timer_when_nothing_is_held(scheduler: TestScheduler) -> None:
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(220, finish()), on_next(230, text("long", index=0)),
        on_completed(240),
    )
    results = scheduler.start(
        lambda: source.pipe(coalesce(50, 4, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(210, role()), on_next(220, finish()),
                                on_next(230, text("long")), on_completed(240)]
    assert spy.scheduled == []


def test_coalesce_one_timer_per_held_batch_not_per_token(scheduler: TestScheduler) -> None:
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        *(on_next(201 + i, text("x")) for i in range(20)), on_completed(300))
    results = scheduler.start(
        lambda: source.pipe(coalesce(50, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(251, text("x" * 20)), on_completed(300)]
    assert spy.scheduled == [251]


def test_coalesce_uses_the_subscription_scheduler_by_default(scheduler: TestScheduler) -> None:
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(220, text("b")), on_completed(300))
    results = scheduler.start(lambda: source.pipe(coalesce(50)))
    assert results.messages == [on_next(260, text("ab")), on_completed(300)]


def test_coalesce_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="coalesce needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            coalesce(1)
        ).subscribe()


@st.composite
def timed_pieces(draw: st.DrawFn) -> tuple[str, list[tuple[int, str]]]:
    whole = draw(st.text(st.sampled_from("ab \r\n世😀é"), max_size=60))
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=20)))
    bounds = [0, *cuts, len(whole)]
    pieces = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    gaps = draw(st.lists(st.integers(0, 30), min_size=len(pieces), max_size=len(pieces)))
    time, timed = 200, []
    for gap, piece in zip(gaps, pieces, strict=True):
        time += gap
        timed.append((time + 1, piece))
    return whole, timed


@settings(max_examples=200, deadline=None)
@given(timed_pieces(), st.integers(0, 60), st.integers(1, 20))
def test_coalesce_is_lossless_over_random_chunkings_and_timings(
    case: tuple[str, list[tuple[int, str]]], max_delay: int, max_chars: int
) -> None:
    whole, timed = case
    scheduler = TestScheduler()
    end = timed[-1][0] + 1
    source = scheduler.create_hot_observable(
        *(on_next(t, text(p)) for t, p in timed), on_next(end, finish()), on_completed(end))
    results = scheduler.start(
        lambda: source.pipe(coalesce(max_delay, max_chars, scheduler=scheduler)))
    values = [m.value.value for m in results.messages if m.value.kind == "N"]
    times = [m.time for m in results.messages]
    assert "".join(v.content for v in values) == whole
    assert values[-1] == finish() and results.messages[-1] == on_completed(end)
    assert times == sorted(times)
    for chunk in values[:-1]:
        size = len(chunk.content)
        assert size <= max(max_chars, max(len(p) for _, p in timed))
    assert len(values) - 1 <= len(timed)


# -- retry_with_backoff ------------------------------------------------------------------------


def test_retry_resubscribes_after_a_retryable_error_before_content(scheduler: TestScheduler) -> None:
    error = retryable()
    calls = 0

    def factory() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return scheduler.create_cold_observable(on_next(5, role()), on_error(10, error))
        return scheduler.create_cold_observable(
            on_next(5, role()), on_next(10, text("Hi")), on_completed(20))

    results = scheduler.start(lambda: defer(lambda _: factory()).pipe(
        retry_with_backoff(3, backoff_base=0, scheduler=scheduler)))
    assert calls == 2
    # the first attempt's role chunk was held and dropped; the second's is sent once
    assert results.messages == [on_next(220, role()), on_next(220, text("Hi")),
                                on_completed(230)]


def test_retry_subscribes_the_cold_source_again(scheduler: TestScheduler) -> None:
    source = scheduler.create_cold_observable(on_error(10, retryable()))
    results = scheduler.start(lambda: source.pipe(
        retry_with_backoff(2, backoff_base=0, scheduler=scheduler)))
    assert source.subscriptions == [subscribe(200, 210), subscribe(210, 220)]
    assert results.messages == [on_error(220, retryable())]


def test_retry_honours_retry_after(scheduler: TestScheduler) -> None:
    source = scheduler.create_cold_observable(on_error(10, retryable(retry_after=30)))
    results = scheduler.start(lambda: source.pipe(
        retry_with_backoff(2, backoff_base=0, backoff_max=100, scheduler=scheduler)))
    assert source.subscriptions == [subscribe(200, 210), subscribe(240, 250)]
    assert results.messages == [on_error(250, retryable(retry_after=30))]


def test_retry_after_beyond_backoff_max_is_not_retried_early(scheduler: TestScheduler) -> None:
    error = retryable(retry_after=300)
    source = scheduler.create_cold_observable(on_error(10, error))
    results = scheduler.start(lambda: source.pipe(
        retry_with_backoff(2, backoff_base=0, backoff_max=20, scheduler=scheduler)))
    assert source.subscriptions == [subscribe(200, 210)]
    assert results.messages == [on_error(210, error)]  # the client learns the retry_after


def test_retry_after_beyond_backoff_max_moves_to_the_fallback(scheduler: TestScheduler) -> None:
    primary = scheduler.create_cold_observable(on_error(10, retryable(retry_after=300)))
    fallback = scheduler.create_cold_observable(on_next(5, text("ok")), on_completed(6))
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        3, backoff_base=0, backoff_max=20, fallbacks=[fallback], scheduler=scheduler)))
    assert primary.subscriptions == [subscribe(200, 210)]
    assert fallback.subscriptions == [subscribe(210, 216)]
    assert results.messages == [on_next(215, text("ok")), on_completed(216)]


def test_retry_backoff_is_jittered_within_the_exponential_bound(
    scheduler: TestScheduler,
) -> None:
    delays: list[float] = []
    source = scheduler.create_cold_observable(on_error(10, retryable()))
    scheduler.start(lambda: source.pipe(retry_with_backoff(
        4, backoff_base=10, backoff_max=25, scheduler=scheduler,
        on_retry=lambda i, a, e, d: delays.append(d))))
    assert len(delays) == 3
    for delay, bound in zip(delays, [10, 20, 25], strict=True):
        assert 0 <= delay <= bound


def test_retry_does_not_retry_after_content(scheduler: TestScheduler) -> None:
    error = retryable()
    source = scheduler.create_cold_observable(
        on_next(5, role()), on_next(10, text("Hel")), on_error(20, error))
    results = scheduler.start(lambda: source.pipe(
        retry_with_backoff(3, backoff_base=0, scheduler=scheduler)))
    assert source.subscriptions == [subscribe(200, 220)]
    assert results.messages == [on_next(210, role()), on_next(210, text("Hel")),
                                on_error(220, error)]


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("bad request upstream", retryable=False),
        ClientError("no such model", code=ErrorCode.MODEL_NOT_FOUND),
        RuntimeError("a bug"),
        ValueError("not ours"),
    ],
    ids=["non-retryable UpstreamError", "ClientError", "RuntimeError", "ValueError"],
)
def test_retry_passes_other_errors_through(scheduler: TestScheduler, error: Exception) -> None:
    source = scheduler.create_cold_observable(on_next(5, role()), on_error(10, error))
    retries: list[Any] = []
    results = scheduler.start(lambda: source.pipe(retry_with_backoff(
        3, backoff_base=0, scheduler=scheduler, on_retry=lambda *a: retries.append(a))))
    assert source.subscriptions == [subscribe(200, 210)]
    # the held framing of the failed attempt is no answer: the error comes first
    # (so an HTTP endpoint can still answer with the error's status)
    assert results.messages == [on_error(210, error)]
    assert retries == []


def test_retry_holds_a_role_chunk_until_content_and_emits_it_once(
    scheduler: TestScheduler,
) -> None:
    source = scheduler.create_cold_observable(
        on_next(5, role()), on_next(30, text("Hi")), on_next(40, text("!")), on_completed(50))
    results = scheduler.start(lambda: source.pipe(retry_with_backoff(scheduler=scheduler)))
    assert results.messages == [on_next(230, role()), on_next(230, text("Hi")),
                                on_next(240, text("!")), on_completed(250)]


def test_retry_releases_held_framing_on_completion(scheduler: TestScheduler) -> None:
    source = scheduler.create_cold_observable(
        on_next(5, role()), on_next(10, finish()), on_completed(20))
    results = scheduler.start(lambda: source.pipe(retry_with_backoff(scheduler=scheduler)))
    assert results.messages == [on_next(220, role()), on_next(220, finish()), on_completed(220)]


def test_retry_falls_back_after_max_attempts(scheduler: TestScheduler) -> None:
    error = retryable()
    primary = scheduler.create_cold_observable(on_next(5, role()), on_error(10, error))
    second = scheduler.create_cold_observable(on_error(10, error))
    third = scheduler.create_cold_observable(
        on_next(5, role()), on_next(10, text("from third")), on_completed(20))
    calls: list[tuple[int, int, Exception, float]] = []
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        2, backoff_base=0, fallbacks=[second, third], scheduler=scheduler,
        on_retry=lambda *a: calls.append(a))))
    assert primary.subscriptions == [subscribe(200, 210), subscribe(210, 220)]
    assert second.subscriptions == [subscribe(220, 230), subscribe(230, 240)]
    assert third.subscriptions == [subscribe(240, 260)]
    assert results.messages == [on_next(250, role()), on_next(250, text("from third")),
                                on_completed(260)]
    # (source index, attempt, error, delay) before each new attempt
    assert calls == [(0, 2, error, 0.0), (1, 1, error, 0.0), (1, 2, error, 0.0),
                     (2, 1, error, 0.0)]


def test_retry_gives_up_with_the_last_error_when_everything_failed(
    scheduler: TestScheduler,
) -> None:
    first, last = retryable("first"), retryable("last")
    primary = scheduler.create_cold_observable(on_error(10, first))
    fallback = scheduler.create_cold_observable(on_error(10, last))
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        1, backoff_base=0, fallbacks=[fallback], scheduler=scheduler)))
    assert results.messages == [on_error(220, last)]


def test_retry_on_retry_reports_the_delay_it_waits(scheduler: TestScheduler) -> None:
    error = retryable(retry_after=15)
    calls: list[tuple[int, int, Exception, float]] = []
    source = scheduler.create_cold_observable(on_error(10, error))
    scheduler.start(lambda: source.pipe(retry_with_backoff(
        2, backoff_base=0, backoff_max=100, scheduler=scheduler,
        on_retry=lambda *a: calls.append(a))))
    assert calls == [(0, 2, error, 15)]
    assert source.subscriptions == [subscribe(200, 210), subscribe(225, 235)]


def test_retry_dispose_during_backoff_cancels_the_retry(scheduler: TestScheduler) -> None:
    source = scheduler.create_cold_observable(on_error(10, retryable(retry_after=100)))
    results = scheduler.start(
        lambda: source.pipe(retry_with_backoff(2, backoff_base=0, backoff_max=100,
                                               scheduler=scheduler)),
        disposed=250,
    )
    assert source.subscriptions == [subscribe(200, 210)]
    assert results.messages == []


def test_retry_a_source_that_fails_during_subscribe_is_still_retried(
    scheduler: TestScheduler,
) -> None:
    # Regression: an error raised synchronously inside subscribe (an Observable that
    # fails before returning its disposable) scheduled the retry, then the returned
    # subscription replaced the timer and cancelled it: the stream hung forever.
    subscribed: list[float] = []

    def failing(observer: abc.ObserverBase[Chunk], _: abc.SchedulerBase | None = None) -> Any:
        subscribed.append(scheduler.clock)
        observer.on_error(retryable())
        return None

    results = scheduler.start(lambda: Observable(failing).pipe(
        retry_with_backoff(3, backoff_base=0, backoff_max=100, scheduler=scheduler)))
    assert subscribed == [200, 200, 200]
    assert results.messages == [on_error(200, retryable())]


def test_retry_uses_the_subscription_scheduler_by_default(scheduler: TestScheduler) -> None:
    # --#                 retry_after 30
    #     ......--a--|    the second attempt, on the scheduler given to subscribe
    error = retryable(retry_after=30)
    calls = 0

    def factory() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return scheduler.create_cold_observable(on_error(10, error))
        return scheduler.create_cold_observable(on_next(5, text("a")), on_completed(10))

    retries: list[Any] = []
    results = scheduler.start(lambda: defer(lambda _: factory()).pipe(retry_with_backoff(
        2, backoff_base=0, backoff_max=100, on_retry=lambda *a: retries.append(a))))
    assert retries == [(0, 2, error, 30)]
    assert results.messages == [on_next(245, text("a")), on_completed(250)]


def test_retry_falls_back_on_the_subscription_scheduler_by_default(
    scheduler: TestScheduler,
) -> None:
    primary = scheduler.create_cold_observable(on_error(10, retryable()))
    fallback = scheduler.create_cold_observable(on_next(5, text("ok")), on_completed(6))
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        1, backoff_base=0, fallbacks=[fallback])))
    assert primary.subscriptions == [subscribe(200, 210)]
    assert fallback.subscriptions == [subscribe(210, 216)]
    assert results.messages == [on_next(215, text("ok")), on_completed(216)]


def test_retry_its_own_scheduler_runs_the_backoff(scheduler: TestScheduler) -> None:
    spy = SpyScheduler(scheduler)
    source = scheduler.create_cold_observable(on_error(10, retryable(retry_after=30)))
    results = scheduler.start(lambda: source.pipe(retry_with_backoff(
        2, backoff_base=0, backoff_max=100, scheduler=spy)))  # type: ignore[arg-type]
    assert spy.scheduled == [240]  # the one backoff wait, on the operator's own scheduler
    assert source.subscriptions == [subscribe(200, 210), subscribe(240, 250)]
    assert results.messages == [on_error(250, retryable(retry_after=30))]


def test_retry_without_any_scheduler_refuses_to_subscribe() -> None:
    # Regression: with no scheduler anywhere it made one attempt and called it final.
    # Now it refuses at subscribe, before the source is subscribed (no request made).
    subscribed = 0

    def source(observer: abc.ObserverBase[Chunk], _: abc.SchedulerBase | None = None) -> Any:
        nonlocal subscribed
        subscribed += 1
        observer.on_completed()

    with pytest.raises(ValueError, match="retry_with_backoff needs a scheduler"):
        Observable(source).pipe(retry_with_backoff()).subscribe()
    assert subscribed == 0
