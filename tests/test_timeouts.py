"""The timeout operators, and retry_with_backoff's fallback_only, in virtual time.

Times are ticks (one tick is one second to the operators); ``scheduler.start()``
subscribes at 200 and disposes at 1000 unless told otherwise. An expected error
given as a predicate (``on_error(t, timed_out(...))``) only matches when the
expected messages are the left operand of ``==``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from reactivex import Observable
from reactivex.testing import ReactiveTest, TestScheduler

from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.operators import (
    first_token_timeout,
    idle_timeout,
    retry_with_backoff,
    total_timeout,
)
from streamsvc.reactive.operators._retry import next_attempt
from tests.test_operators import SpyScheduler, finish, retryable, role, text

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed
subscribe = ReactiveTest.subscribe


def timed_out(code: ErrorCode, *, fallback_only: bool = False) -> Callable[[Exception], bool]:
    """Matches the retryable UpstreamError a timeout operator raises."""

    def match(error: Exception) -> bool:
        return (
            isinstance(error, UpstreamError) and error.code is code and error.retryable
            and error.fallback_only is fallback_only
        )

    return match


FIRST_TOKEN = timed_out(ErrorCode.UPSTREAM_TIMEOUT, fallback_only=True)
IDLE = timed_out(ErrorCode.IDLE_TIMEOUT)
TOTAL = timed_out(ErrorCode.UPSTREAM_TIMEOUT)


def slow(message: str = "too slow") -> UpstreamError:
    """What first_token_timeout raises: retryable, but not on the same upstream."""
    return UpstreamError(message, code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True,
                         fallback_only=True)


@pytest.fixture
def scheduler() -> TestScheduler:
    return TestScheduler()


# -- first_token_timeout -----------------------------------------------------------------------


def test_first_token_timeout_is_not_stopped_by_framing(scheduler: TestScheduler) -> None:
    # --r-e---------------a--|      r: role only, e: empty content; timeout 50
    # [ first_token_timeout(50) ]
    # --r-e-----#                   upstream_timeout at 250, source disposed then
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(220, text("")), on_next(300, text("late")),
        on_completed(310),
    )
    results = scheduler.start(
        lambda: source.pipe(first_token_timeout(50, scheduler=scheduler)))
    assert [on_next(210, role()), on_next(220, text("")),
            on_error(250, FIRST_TOKEN)] == results.messages
    assert source.subscriptions == [subscribe(200, 250)]


def test_first_token_timeout_is_stopped_by_the_first_content(scheduler: TestScheduler) -> None:
    # --r--a--------------------b--|     the source is slow after a: no error
    # [ first_token_timeout(50) ]
    # --r--a--------------------b--|
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(240, text("a")), on_next(400, text("b")),
        on_completed(500),
    )
    results = scheduler.start(lambda: source.pipe(
        first_token_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, role()), on_next(240, text("a")),
                                on_next(400, text("b")), on_completed(500)]
    assert source.subscriptions == [subscribe(200, 500)]
    assert spy.scheduled == [250] and spy.fired == 0


def test_first_token_timeout_completion_cancels_the_timer(scheduler: TestScheduler) -> None:
    # --r-f-|
    # [ first_token_timeout(50) ]
    # --r-f-|       the timer at 250 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(215, finish()), on_completed(220))
    results = scheduler.start(lambda: source.pipe(
        first_token_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, role()), on_next(215, finish()),
                                on_completed(220)]
    assert spy.scheduled == [250] and spy.fired == 0


def test_first_token_timeout_passes_a_source_error_through(scheduler: TestScheduler) -> None:
    # --r-#
    # [ first_token_timeout(50) ]
    # --r-#         the source's error, unchanged; the timer never fires
    error = retryable()
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, role()), on_error(220, error))
    results = scheduler.start(lambda: source.pipe(
        first_token_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, role()), on_error(220, error)]
    assert results.messages[-1].value.exception is error
    assert spy.fired == 0


def test_first_token_timeout_dispose_cancels_the_timer_and_the_source(
    scheduler: TestScheduler,
) -> None:
    # --r---!          ! dispose at 230: the timer at 250 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, role()), on_next(400, text("a")))
    results = scheduler.start(
        lambda: source.pipe(first_token_timeout(50, scheduler=spy)),  # type: ignore[arg-type]
        disposed=230,
    )
    assert results.messages == [on_next(210, role())]
    assert source.subscriptions == [subscribe(200, 230)]
    assert spy.scheduled == [250] and spy.fired == 0


def test_first_token_timeout_one_timer_not_one_per_token(scheduler: TestScheduler) -> None:
    # rxxxxxxxxxxxxxxxxxxxx---|     role at 201, 20 tokens at 202..221: one timer, at 250
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(201, role()), *(on_next(202 + i, text("x")) for i in range(20)),
        on_completed(300),
    )
    results = scheduler.start(lambda: source.pipe(
        first_token_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert len(results.messages) == 22 and results.messages[-1] == on_completed(300)
    assert spy.scheduled == [250] and spy.fired == 0


def test_first_token_timeout_uses_the_subscription_scheduler_by_default(
    scheduler: TestScheduler,
) -> None:
    # --r-----#     the TestScheduler given to subscribe runs the timer
    source = scheduler.create_hot_observable(on_next(210, role()))
    results = scheduler.start(lambda: source.pipe(first_token_timeout(50)))
    assert [on_next(210, role()), on_error(250, FIRST_TOKEN)] == results.messages


def test_first_token_timeout_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="first_token_timeout needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            first_token_timeout(1)
        ).subscribe()


# -- idle_timeout ------------------------------------------------------------------------------


def test_idle_timeout_fires_after_the_last_chunk(scheduler: TestScheduler) -> None:
    # --a-b-c---------#---d     timeout 20
    # [ idle_timeout(20) ]
    # --a-b-c---------#         idle_timeout 20 after c; source disposed then
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(215, text("b")), on_next(220, text("c")),
        on_next(300, text("d")),
    )
    results = scheduler.start(lambda: source.pipe(idle_timeout(20, scheduler=scheduler)))
    assert [on_next(210, text("a")), on_next(215, text("b")), on_next(220, text("c")),
            on_error(240, IDLE)] == results.messages
    assert source.subscriptions == [subscribe(200, 240)]


def test_idle_timeout_starts_at_the_first_content_not_at_framing(
    scheduler: TestScheduler,
) -> None:
    # --r--------------a----b-------#     r: role only; a long think before a is not idle
    # [ idle_timeout(20) ]
    # --r--------------a----b-------#     idle_timeout 20 after b
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(300, text("a")), on_next(310, text("b")))
    results = scheduler.start(lambda: source.pipe(idle_timeout(20, scheduler=scheduler)))
    assert [on_next(210, role()), on_next(300, text("a")), on_next(310, text("b")),
            on_error(330, IDLE)] == results.messages
    assert source.subscriptions == [subscribe(200, 330)]


def test_idle_timeout_does_not_count_a_gap_the_consumer_holds(scheduler: TestScheduler) -> None:
    # --a-----------------b---------#     held (backpressure) from 215 to 280: not idle
    # [ idle_timeout(20, held) ]
    # --a-----------------b---------#     idle_timeout 20 after b, once nothing holds it
    holding = {"on": False}
    scheduler.schedule_absolute(215, lambda *_: holding.update(on=True))
    scheduler.schedule_absolute(280, lambda *_: holding.update(on=False))
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_next(290, text("b")))
    results = scheduler.start(lambda: source.pipe(
        idle_timeout(20, scheduler=scheduler, held=lambda: holding["on"])))
    assert [on_next(210, text("a")), on_next(290, text("b")),
            on_error(310, IDLE)] == results.messages


def test_idle_timeout_schedules_no_timer_before_content(scheduler: TestScheduler) -> None:
    # --r------------------f---|     framing only: no clock, no timer
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, role()), on_next(400, finish()), on_completed(500))
    results = scheduler.start(lambda: source.pipe(
        idle_timeout(20, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, role()), on_next(400, finish()),
                                on_completed(500)]
    assert spy.scheduled == []


def test_idle_timeout_completion_cancels_the_timer(scheduler: TestScheduler) -> None:
    # --a---|       the timer at 230 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_completed(225))
    results = scheduler.start(lambda: source.pipe(
        idle_timeout(20, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, text("a")), on_completed(225)]
    assert spy.scheduled == [230] and spy.fired == 0


def test_idle_timeout_passes_a_source_error_through(scheduler: TestScheduler) -> None:
    # --a-#         the source's error, unchanged; the timer at 230 never fires
    error = retryable()
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_error(215, error))
    results = scheduler.start(lambda: source.pipe(
        idle_timeout(20, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, text("a")), on_error(215, error)]
    assert results.messages[-1].value.exception is error
    assert spy.scheduled == [230] and spy.fired == 0


def test_idle_timeout_dispose_cancels_the_timer_and_the_source(scheduler: TestScheduler) -> None:
    # --a-!         ! dispose at 220: the timer at 230 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_next(400, text("b")))
    results = scheduler.start(
        lambda: source.pipe(idle_timeout(20, scheduler=spy)),  # type: ignore[arg-type]
        disposed=220,
    )
    assert results.messages == [on_next(210, text("a"))]
    assert source.subscriptions == [subscribe(200, 220)]
    assert spy.scheduled == [230] and spy.fired == 0


def test_idle_timeout_one_timer_per_period_not_per_token(scheduler: TestScheduler) -> None:
    # 50 tokens at 201..250, one a tick, then silence; timeout 20
    # the timer is re-armed for what is left when it fires early: 221, 241, 261, 270
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(*(on_next(201 + i, text("x")) for i in range(50)))
    results = scheduler.start(lambda: source.pipe(
        idle_timeout(20, scheduler=spy)))  # type: ignore[arg-type]
    assert [*(on_next(201 + i, text("x")) for i in range(50)),
            on_error(270, IDLE)] == results.messages
    assert len(spy.scheduled) <= math.ceil(50 / 20) + 1
    assert spy.scheduled[-1] == 270 and spy.fired == len(spy.scheduled)


def test_idle_timeout_uses_the_subscription_scheduler_by_default(
    scheduler: TestScheduler,
) -> None:
    # --a---#       the TestScheduler given to subscribe runs the timer
    source = scheduler.create_hot_observable(on_next(210, text("a")))
    results = scheduler.start(lambda: source.pipe(idle_timeout(20)))
    assert [on_next(210, text("a")), on_error(230, IDLE)] == results.messages


def test_idle_timeout_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="idle_timeout needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            idle_timeout(1)
        ).subscribe()


# -- total_timeout -----------------------------------------------------------------------------


def test_total_timeout_fires_while_chunks_flow(scheduler: TestScheduler) -> None:
    # -a-b-c-d-e-#-f-g-...     a chunk every 10 ticks from 205; timeout 50
    # [ total_timeout(50) ]
    # -a-b-c-d-e-#             what was emitted stays; source disposed at 250
    source = scheduler.create_hot_observable(
        *(on_next(205 + 10 * i, text(str(i))) for i in range(20)))
    results = scheduler.start(lambda: source.pipe(total_timeout(50, scheduler=scheduler)))
    assert [*(on_next(205 + 10 * i, text(str(i))) for i in range(5)),
            on_error(250, TOTAL)] == results.messages
    assert source.subscriptions == [subscribe(200, 250)]


def test_total_timeout_completion_cancels_the_timer(scheduler: TestScheduler) -> None:
    # --a-f-|       the timer at 250 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        on_next(210, text("a")), on_next(220, finish()), on_completed(230))
    results = scheduler.start(lambda: source.pipe(
        total_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, text("a")), on_next(220, finish()),
                                on_completed(230)]
    assert spy.scheduled == [250] and spy.fired == 0


def test_total_timeout_passes_a_source_error_through(scheduler: TestScheduler) -> None:
    # --a-#         the source's error, unchanged; the timer at 250 never fires
    error = retryable()
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_error(220, error))
    results = scheduler.start(lambda: source.pipe(
        total_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert results.messages == [on_next(210, text("a")), on_error(220, error)]
    assert results.messages[-1].value.exception is error
    assert spy.fired == 0


def test_total_timeout_dispose_cancels_the_timer_and_the_source(scheduler: TestScheduler) -> None:
    # --a-!         ! dispose at 230: the timer at 250 never fires
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_next(400, text("b")))
    results = scheduler.start(
        lambda: source.pipe(total_timeout(50, scheduler=spy)),  # type: ignore[arg-type]
        disposed=230,
    )
    assert results.messages == [on_next(210, text("a"))]
    assert source.subscriptions == [subscribe(200, 230)]
    assert spy.scheduled == [250] and spy.fired == 0


def test_total_timeout_one_timer_not_one_per_token(scheduler: TestScheduler) -> None:
    # xxxxxxxx...x|     40 tokens at 201..240: one timer, at 250, cancelled by completion
    spy = SpyScheduler(scheduler)
    source = scheduler.create_hot_observable(
        *(on_next(201 + i, text("x")) for i in range(40)), on_completed(241))
    results = scheduler.start(lambda: source.pipe(
        total_timeout(50, scheduler=spy)))  # type: ignore[arg-type]
    assert len(results.messages) == 41 and results.messages[-1] == on_completed(241)
    assert spy.scheduled == [250] and spy.fired == 0


def test_total_timeout_outside_retry_bounds_the_retries(scheduler: TestScheduler) -> None:
    # attempts at 200, 210, 220, 230 each fail after 10; the whole answer is cut at 235
    source = scheduler.create_cold_observable(on_error(10, retryable()))
    results = scheduler.start(lambda: source.pipe(
        retry_with_backoff(10, backoff_base=0, scheduler=scheduler),
        total_timeout(35, scheduler=scheduler),
    ))
    assert [on_error(235, TOTAL)] == results.messages
    assert source.subscriptions == [subscribe(200, 210), subscribe(210, 220),
                                    subscribe(220, 230), subscribe(230, 235)]


def test_total_timeout_uses_the_subscription_scheduler_by_default(
    scheduler: TestScheduler,
) -> None:
    # --a-----#     the TestScheduler given to subscribe runs the timer
    source = scheduler.create_hot_observable(on_next(210, text("a")))
    results = scheduler.start(lambda: source.pipe(total_timeout(50)))
    assert [on_next(210, text("a")), on_error(250, TOTAL)] == results.messages


def test_total_timeout_without_any_scheduler_refuses_to_subscribe() -> None:
    with pytest.raises(ValueError, match="total_timeout needs a scheduler"):
        Observable(lambda observer, scheduler=None: observer.on_completed()).pipe(
            total_timeout(1)
        ).subscribe()


# -- retry_with_backoff: fallback_only ---------------------------------------------------------


def test_next_attempt_fallback_only_skips_the_remaining_attempts() -> None:
    # (error, index, attempt, sources, max_attempts, backoff_base, backoff_max)
    assert next_attempt(slow(), 0, 1, 2, 3, 10.0, 10.0) == (1, 1, 0.0)
    assert next_attempt(slow(), 1, 1, 2, 3, 10.0, 10.0) is None  # no fallback left: final
    plan = next_attempt(retryable(), 0, 1, 2, 3, 10.0, 10.0)  # the same source again
    assert plan is not None and plan[:2] == (0, 2)


def test_retry_fallback_only_moves_to_the_fallback_at_once(scheduler: TestScheduler) -> None:
    # primary:  ----------#            # fallback_only; backoff would be up to 100
    # fallback:           -----o|
    # result:   ---------------o|      no second attempt on the primary, no wait
    error = slow()
    primary = scheduler.create_cold_observable(on_next(5, role()), on_error(10, error))
    fallback = scheduler.create_cold_observable(on_next(5, text("ok")), on_completed(6))
    calls: list[tuple[int, int, Exception, float]] = []
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        3, backoff_base=100, backoff_max=100, fallbacks=[fallback], scheduler=scheduler,
        on_retry=lambda *a: calls.append(a))))
    assert primary.subscriptions == [subscribe(200, 210)]
    assert fallback.subscriptions == [subscribe(210, 216)]
    # the primary's held role chunk was dropped with it
    assert results.messages == [on_next(215, text("ok")), on_completed(216)]
    assert calls == [(1, 1, error, 0.0)]


def test_retry_fallback_only_without_a_fallback_is_final(scheduler: TestScheduler) -> None:
    # primary: --r-#      # fallback_only, 2 attempts left but no fallback
    # result:  ----#      the error alone (the held role is dropped): no retry of the same source
    error = slow()
    primary = scheduler.create_cold_observable(on_next(5, role()), on_error(10, error))
    calls: list[Any] = []
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        3, backoff_base=0, scheduler=scheduler, on_retry=lambda *a: calls.append(a))))
    assert primary.subscriptions == [subscribe(200, 210)]
    assert results.messages == [on_error(210, error)]
    assert calls == []


def test_retry_fallback_only_from_the_last_fallback_is_final(scheduler: TestScheduler) -> None:
    # primary:  ----------#             both fallback_only
    # fallback:           ----------#
    # result:   --------------------#   the last error; each source subscribed once
    first, last = slow("first too slow"), slow("last too slow")
    primary = scheduler.create_cold_observable(on_error(10, first))
    fallback = scheduler.create_cold_observable(on_error(10, last))
    results = scheduler.start(lambda: primary.pipe(retry_with_backoff(
        3, backoff_base=0, fallbacks=[fallback], scheduler=scheduler)))
    assert primary.subscriptions == [subscribe(200, 210)]
    assert fallback.subscriptions == [subscribe(210, 220)]
    assert results.messages == [on_error(220, last)]
    assert results.messages[-1].value.exception is last


def test_retry_moves_to_the_fallback_when_the_first_token_times_out(
    scheduler: TestScheduler,
) -> None:
    # A:       --r-----------------    role, then nothing
    # [ first_token_timeout(30) ]  ->  #  at 230, fallback_only
    # B:                        --r--a----|
    # result:  ---------------------(ra)--|    A's r was held and dropped: r once
    a = scheduler.create_cold_observable(on_next(5, role()))
    b = scheduler.create_cold_observable(
        on_next(5, role()), on_next(10, text("Hi")), on_completed(20))
    calls: list[tuple[int, int, Exception, float]] = []
    results = scheduler.start(lambda: a.pipe(
        first_token_timeout(30, scheduler=scheduler),
        retry_with_backoff(
            3, backoff_base=100, backoff_max=100, scheduler=scheduler,
            fallbacks=[b.pipe(first_token_timeout(30, scheduler=scheduler))],
            on_retry=lambda *args: calls.append(args)),
    ))
    assert a.subscriptions == [subscribe(200, 230)]
    assert b.subscriptions == [subscribe(230, 250)]
    assert results.messages == [on_next(240, role()), on_next(240, text("Hi")),
                                on_completed(250)]
    assert [(i, n, d) for i, n, _, d in calls] == [(1, 1, 0.0)]
    assert FIRST_TOKEN(calls[0][2])


def test_retry_gives_up_when_every_source_times_out_before_content(
    scheduler: TestScheduler,
) -> None:
    # A: --r------#(230)   B: --r------#(260)   no fallback left: the error, no framing
    a = scheduler.create_cold_observable(on_next(5, role()))
    b = scheduler.create_cold_observable(on_next(5, role()))
    results = scheduler.start(lambda: a.pipe(
        first_token_timeout(30, scheduler=scheduler),
        retry_with_backoff(3, backoff_base=0, scheduler=scheduler,
                           fallbacks=[b.pipe(first_token_timeout(30, scheduler=scheduler))]),
    ))
    assert a.subscriptions == [subscribe(200, 230)]
    assert b.subscriptions == [subscribe(230, 260)]
    assert [on_error(260, FIRST_TOKEN)] == results.messages
