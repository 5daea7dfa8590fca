"""streamsvc.operators.throttle and pace in virtual time: marble tests on a TestScheduler.

Times are ticks (one tick is one second to the operators); ``scheduler.start()``
subscribes at 200 and disposes at 1000 unless told otherwise.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reactivex import Observable
from reactivex.testing import ReactiveTest, TestScheduler

from streamsvc.chunks import Chunk
from streamsvc.operators import pace, throttle
from tests.test_operators import SpyScheduler, finish, retryable, role, text, timed_pieces

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe


def role_text(content: str) -> Chunk:
    return Chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": content}}]})


def tool_args(arguments: str) -> Chunk:
    call = {"index": 0, "function": {"arguments": arguments}}
    return Chunk({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})


def contents(messages: list[Any]) -> list[tuple[float, str]]:
    """(time, content) of each on_next."""
    return [(m.time, m.value.value.content) for m in messages if m.value.kind == "N"]


@pytest.fixture
def scheduler() -> TestScheduler:
    return TestScheduler()


# -- throttle ----------------------------------------------------------------------------------


def test_throttle_emits_at_once_after_a_quiet_interval_and_merges_inside_it(
    scheduler: TestScheduler,
) -> None:
    # --a-b-c-------------d-e--|       min_interval = 10
    # [     throttle(10)      ]
    # --a-------bc--------d----e|     bc at a+10; d at once; e flushed by completion
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(212, text("b")), on_next(214, text("c")),
        on_next(240, text("d")), on_next(242, text("e")), on_completed(245),
    )
    results = scheduler.start(lambda: source.pipe(throttle(10, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, text("a")), on_next(220, text("bc")), on_next(240, text("d")),
        on_next(245, text("e")), on_completed(245),
    ]


def test_throttle_holds_until_the_last_emission_plus_the_interval(
    scheduler: TestScheduler,
) -> None:
    # --a----b--c--d-------|     min_interval = 10
    # [    throttle(10)    ]
    # --a-------b-------cd-|     b at 210+10; c, d at 220+10 (the flush counts as an emission)
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(215, text("b")), on_next(222, text("c")),
        on_next(225, text("d")), on_completed(300),
    )
    results = scheduler.start(lambda: source.pipe(throttle(10, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, text("a")), on_next(220, text("b")), on_next(230, text("cd")),
        on_completed(300),
    ]


def test_throttle_emits_a_chunk_that_cannot_merge_in_the_same_emission_in_order(
    scheduler: TestScheduler,
) -> None:
    # --r-a-x-b-f----------|     r: role, x: choice 1, f: finish
    # [    throttle(10)    ]
    # --r-------(axbf)-----|     all held chunks at 220, in their order
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(212, text("a")), on_next(213, text("x", index=1)),
        on_next(214, text("b")), on_next(215, finish()), on_completed(300),
    )
    results = scheduler.start(lambda: source.pipe(throttle(10, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, role()),
        on_next(220, text("a")), on_next(220, text("x", index=1)), on_next(220, text("b")),
        on_next(220, finish()),
        on_completed(300),
    ]


def test_throttle_emits_what_it_holds_before_completion(scheduler: TestScheduler) -> None:
    # --a-b-c-|
    # [ throttle(10) ]
    # --a-----(bc)|      completion flushes at once, the timer at 220 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(212, text("b")), on_next(213, text("c")),
        on_completed(214),
    )
    results = scheduler.start(
        lambda: source.pipe(throttle(10, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(210, text("a")), on_next(214, text("bc")),
                                on_completed(214)]
    assert spy.scheduled == [220] and spy.fired == 0


def test_throttle_emits_what_it_holds_before_an_error(scheduler: TestScheduler) -> None:
    # --a-b-c-#
    # [ throttle(10) ]
    # --a-----(bc)#
    error = retryable("upstream went away")
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(212, text("b")), on_next(213, text("c")),
        on_error(214, error),
    )
    results = scheduler.start(
        lambda: source.pipe(throttle(10, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(210, text("a")), on_next(214, text("bc")),
                                on_error(214, error)]
    assert spy.fired == 0


def test_throttle_dispose_cancels_the_timer_and_the_source(scheduler: TestScheduler) -> None:
    # --a-b--!        ! dispose at 215, while b is held
    # [ throttle(10) ]
    # --a----!        b is not emitted, the timer at 220 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(212, text("b")), on_next(400, text("c")))
    results = scheduler.start(
        lambda: source.pipe(throttle(10, scheduler=spy)),  # type: ignore[arg-type]
        disposed=215,
    )
    assert results.messages == [on_next(210, text("a"))]
    assert source.subscriptions == [subscribe(200, 215)]
    assert spy.scheduled == [220] and spy.fired == 0


def test_throttle_schedules_no_timer_when_nothing_is_held(scheduler: TestScheduler) -> None:
    # --r---------a---------f--|     each chunk at least min_interval after the last
    # [        throttle(10)      ]
    # --r---------a---------f--|
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(220, text("a")), on_next(235, finish()),
        on_completed(240),
    )
    results = scheduler.start(
        lambda: source.pipe(throttle(10, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(210, role()), on_next(220, text("a")),
                                on_next(235, finish()), on_completed(240)]
    assert spy.scheduled == []


def test_throttle_one_timer_for_many_tokens_in_one_interval(scheduler: TestScheduler) -> None:
    # xxxxxxxxxxxxxxxxxxxx-------|     20 tokens at 201..220
    # [      throttle(50)       ]
    # x-----------------(x*19)---|     one timer, at 201 + 50
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        *(on_next(201 + i, text("x")) for i in range(20)), on_completed(300))
    results = scheduler.start(
        lambda: source.pipe(throttle(50, scheduler=spy))  # type: ignore[arg-type]
    )
    assert results.messages == [on_next(201, text("x")), on_next(251, text("x" * 19)),
                                on_completed(300)]
    assert spy.scheduled == [251] and spy.fired == 1


def test_throttle_uses_the_subscription_scheduler_by_default(scheduler: TestScheduler) -> None:
    # --a-b------|   ->   --a-------b-|   the TestScheduler given to subscribe runs the timer
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(212, text("b")), on_completed(300))
    results = scheduler.start(lambda: source.pipe(throttle(10)))
    assert results.messages == [on_next(210, text("a")), on_next(220, text("b")),
                                on_completed(300)]


def test_throttle_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="throttle needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            throttle(1)
        ).subscribe()


@settings(max_examples=200, deadline=None)
@given(timed_pieces(), st.integers(1, 60))
def test_throttle_is_lossless_and_keeps_the_interval_over_random_timings(
    case: tuple[str, list[tuple[int, str]]], min_interval: int
) -> None:
    whole, timed = case
    scheduler = TestScheduler()
    end = timed[-1][0] + 1
    source = scheduler.create_hot_observable(
        *(on_next(t, text(p)) for t, p in timed), on_next(end, finish()), on_completed(end))
    results = scheduler.start(lambda: source.pipe(throttle(min_interval, scheduler=scheduler)))
    values = [m.value.value for m in results.messages if m.value.kind == "N"]
    times = [m.time for m in results.messages]
    assert "".join(v.content for v in values) == whole
    assert values[-1] == finish() and results.messages[-1] == on_completed(end)
    assert times == sorted(times)
    emissions = sorted({m.time for m in results.messages if m.value.kind == "N"})
    for before, after in pairwise(emissions):
        # only the flush by completion may come sooner than min_interval
        assert after - before >= min_interval or after == end


# -- pace ----------------------------------------------------------------------------------------
# chars_per_s=0.4 with tick=5 allows 2 characters per tick.


def test_pace_releases_text_at_the_rate_and_completion_waits(scheduler: TestScheduler) -> None:
    # --"Hello world"-|               2 chars per 5 ticks
    # [ pace(0.4, max_lag=0, tick=5) ]
    # --He---ll---o ---wo---rl---(d|)
    source = scheduler.create_hot_observable(on_next(210, text("Hello world")), on_completed(212))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, text("He")), on_next(215, text("ll")), on_next(220, text("o ")),
        on_next(225, text("wo")), on_next(230, text("rl")), on_next(235, text("d")),
        on_completed(235),
    ]


def test_pace_keeps_the_role_on_the_first_piece(scheduler: TestScheduler) -> None:
    # --(role+"Hello")---|
    # [ pace(0.4, tick=5) ]
    # --(role+"He")---ll---o|
    source = scheduler.create_hot_observable(on_next(210, role_text("Hello")), on_completed(211))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, role_text("He")), on_next(215, text("ll")), on_next(220, text("o")),
        on_completed(220),
    ]


def test_pace_emits_chunks_without_text_in_their_place(scheduler: TestScheduler) -> None:
    # --r-"abcde"-f-|         r: role, f: finish; f waits behind the text, in order
    # [ pace(0.4, tick=5) ]
    # --r-ab---cd---(ef|)
    source = scheduler.create_hot_observable(
        on_next(205, role()), on_next(210, text("abcde")), on_next(211, finish()),
        on_completed(212),
    )
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert results.messages == [
        on_next(205, role()), on_next(210, text("ab")), on_next(215, text("cd")),
        on_next(220, text("e")), on_next(220, finish()), on_completed(220),
    ]


def test_pace_sends_the_backlog_at_once_before_an_error(scheduler: TestScheduler) -> None:
    # --"abcdefgh"-f-#
    # [ pace(0.4, tick=5) ]
    # --ab---------(cdefgh f #)      the timer at 215 never fires
    error = retryable("upstream went away")
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, text("abcdefgh")), on_next(211, finish()), on_error(212, error))
    results = scheduler.start(lambda: source.pipe(
        pace(0.4, max_lag=0, tick=5, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [
        on_next(210, text("ab")), on_next(212, text("cdefgh")), on_next(212, finish()),
        on_error(212, error),
    ]
    assert spy.scheduled == [215] and spy.fired == 0


def test_pace_sends_a_chunk_that_cannot_be_cut_whole(scheduler: TestScheduler) -> None:
    # --("abcd" T f)-|       T: tool-call arguments, 10 chars; f: finish
    # [ pace(0.4, tick=5) ]
    # --ab---cd---(T f|)     T goes whole once the allowance is positive again
    arguments = '{"q": "ab"}'
    source = scheduler.create_hot_observable(
        on_next(210, text("abcd")), on_next(210, tool_args(arguments)), on_next(210, finish()),
        on_completed(211),
    )
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, text("ab")), on_next(215, text("cd")), on_next(220, tool_args(arguments)),
        on_next(220, finish()), on_completed(220),
    ]


def test_pace_max_lag_zero_keeps_the_steady_rate(scheduler: TestScheduler) -> None:
    # --"x"*1000--...    2 chars per 5 ticks however long the backlog
    source = scheduler.create_hot_observable(on_next(210, text("x" * 1000)), on_completed(211))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert contents(results.messages) == [(210 + 5 * i, "xx") for i in range(158)]


def test_pace_max_lag_speeds_up_a_big_backlog(scheduler: TestScheduler) -> None:
    # --"x"*1000-|       at the steady rate this would take 2500 ticks
    # [ pace(0.4, max_lag=10, tick=5) ]
    # --X-X-X-...|       big pieces first, done long before 1000
    source = scheduler.create_hot_observable(on_next(210, text("x" * 1000)), on_completed(211))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=10, tick=5, scheduler=scheduler)))
    pieces = contents(results.messages)
    assert "".join(p for _, p in pieces) == "x" * 1000
    assert len(pieces[0][1]) > 2  # the rate rose at once
    assert results.messages[-1].value.kind == "C" and results.messages[-1].time <= 260


def test_pace_max_lag_drains_a_big_backlog_in_about_max_lag(scheduler: TestScheduler) -> None:
    # --"x"*1000-|
    # [ pace(0.4, max_lag=10, tick=5) ]
    # --X--X--(X|)       drained within max_lag + tick
    source = scheduler.create_hot_observable(on_next(210, text("x" * 1000)), on_completed(211))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=10, tick=5, scheduler=scheduler)))
    assert results.messages[-1].value.kind == "C"
    assert results.messages[-1].time <= 210 + 10 + 5


def test_pace_paces_small_deltas_that_arrive_quickly(scheduler: TestScheduler) -> None:
    # --ab-cd-ef-|            each delta fits in one tick's allowance (2 chars)
    # [ pace(0.4, max_lag=0, tick=5) ]
    # --ab----cd----(ef|)     ab from the saved-up tick; cd 0.4+2 later; then 2 per 5 ticks
    source = scheduler.create_hot_observable(
        on_next(210, text("ab")), on_next(211, text("cd")), on_next(212, text("ef")),
        on_completed(213),
    )
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=scheduler)))
    assert results.messages == [
        on_next(210, text("ab")), on_next(216, text("cd")), on_next(221, text("ef")),
        on_completed(221),
    ]


def test_pace_dispose_cancels_the_timer_and_the_source(scheduler: TestScheduler) -> None:
    # --"Hello world"---------
    # [ pace(0.4, tick=5) ]
    # --He---ll-!             ! dispose at 217: the timer at 220 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("Hello world")))
    results = scheduler.start(
        lambda: source.pipe(pace(0.4, max_lag=0, tick=5, scheduler=spy)),  # type: ignore[arg-type]
        disposed=217,
    )
    assert results.messages == [on_next(210, text("He")), on_next(215, text("ll"))]
    assert source.subscriptions == [subscribe(200, 217)]
    assert spy.scheduled == [215, 220] and spy.fired == 1


def test_pace_schedules_no_timer_when_nothing_waits(scheduler: TestScheduler) -> None:
    # --r----ab----f-|     "ab" fits in one tick's allowance
    # [ pace(0.4, tick=5) ]
    # --r----ab----f-|
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(220, text("ab")), on_next(230, finish()),
        on_completed(240),
    )
    results = scheduler.start(lambda: source.pipe(
        pace(0.4, max_lag=0, tick=5, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, role()), on_next(220, text("ab")),
                                on_next(230, finish()), on_completed(240)]
    assert spy.scheduled == []


def test_pace_one_timer_per_tick_not_per_token(scheduler: TestScheduler) -> None:
    # 20 deltas "abc" at 201..220, 60 chars at 2 per tick: emissions at 201, 206, ..., 346;
    # timers only at those ticks, none when a delta arrives
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        *(on_next(201 + i, text("abc")) for i in range(20)), on_completed(221))
    results = scheduler.start(lambda: source.pipe(
        pace(0.4, max_lag=0, tick=5, scheduler=spy)))  # type: ignore[arg-type]
    pieces = contents(results.messages)
    assert "".join(p for _, p in pieces) == "abc" * 20
    ticks = [201 + 5 * i for i in range(30)]
    assert sorted({t for t, _ in pieces}) == ticks
    # a tick's 2 characters may span two deltas ("c" then "a"), never more
    assert all(sum(len(p) for t, p in pieces if t == tick) == 2 for tick in ticks)
    assert results.messages[-1] == on_completed(346)
    assert spy.scheduled == [206 + 5 * i for i in range(29)] and spy.fired == 29


def test_pace_uses_the_subscription_scheduler_by_default(scheduler: TestScheduler) -> None:
    # --"Hello"-|   ->   --He---ll---(o|)   the TestScheduler given to subscribe runs the timer
    source = scheduler.create_hot_observable(on_next(210, text("Hello")), on_completed(211))
    results = scheduler.start(lambda: source.pipe(pace(0.4, max_lag=0, tick=5)))
    assert results.messages == [on_next(210, text("He")), on_next(215, text("ll")),
                                on_next(220, text("o")), on_completed(220)]


def test_pace_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="pace needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            pace(10)
        ).subscribe()


def test_pace_below_one_character_per_tick_still_releases_text(scheduler: TestScheduler) -> None:
    # --"abc"--|            0.1 chars per tick of 1: the allowance never reaches one
    # [ pace(0.1, max_lag=0, tick=1) ]   character a tick, yet one goes out every 10 ticks
    # --a---------b---------(c|)
    source = scheduler.create_hot_observable(on_next(210, text("abc")), on_completed(211))
    results = scheduler.start(
        lambda: source.pipe(pace(0.1, max_lag=0, tick=1, scheduler=scheduler)))
    assert contents(results.messages) == [(210, "a"), (220, "b"), (230, "c")]
    assert results.messages[-1] == on_completed(230)
