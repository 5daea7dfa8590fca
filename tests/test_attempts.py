"""The fused per-attempt operator behaves exactly as the public operators composed.

``attempts_`` (first-token timeout, idle timeout, retry with fallbacks in one
operator) is what the server runs; the composed chain is what its docs
describe. Property test in virtual time: random upstream behaviours (framing,
content, gaps, errors, ends, hangs), random timeouts and attempt limits; the
two must emit the same messages at the same times.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from reactivex import Observable
from reactivex.testing import ReactiveTest, TestScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.operators import first_token_timeout, idle_timeout, retry_with_backoff
from streamsvc.reactive.operators._attempts import attempts_
from tests.test_operators import finish, role, text

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed

_step = st.tuples(st.integers(1, 12), st.sampled_from(["role", "text", "finish"]))
_end = st.sampled_from(["complete", "retryable", "fatal", "hang"])
_source = st.tuples(st.lists(_step, max_size=6), _end, st.integers(1, 12))


def _messages(plan: tuple[list[tuple[int, str]], str, int], name: str) -> list[Any]:
    steps, end, gap = plan
    at, messages = 0, []
    for i, (delay, kind) in enumerate(steps):
        at += delay
        chunk = {"role": role(), "text": text(f"{name}{i}"), "finish": finish()}[kind]
        messages.append(on_next(at, chunk))
    at += gap
    if end == "complete":
        messages.append(on_completed(at))
    elif end == "retryable":
        messages.append(on_error(at, UpstreamError(f"{name} cut", code=ErrorCode.UPSTREAM_ERROR,
                                                   retryable=True)))
    elif end == "fatal":
        messages.append(on_error(at, UpstreamError(f"{name} refused", code=ErrorCode.BAD_REQUEST)))
    return messages


def _comparable(messages: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for message in messages:
        value = message.value
        if value.kind == "N":
            assert isinstance(value.value, Chunk)
            out.append((message.time, "N", repr(value.value.data)))
        elif value.kind == "E":
            error = value.exception
            out.append((message.time, "E", type(error).__name__, getattr(error, "code", None),
                        str(error)))
        else:
            out.append((message.time, "C"))
    return out


def _run(build: Any, plans: list[Any]) -> list[tuple[Any, ...]]:
    scheduler = TestScheduler()
    sources: list[Observable[Chunk]] = [
        scheduler.create_cold_observable(*_messages(plan, f"s{i}"))
        for i, plan in enumerate(plans)]
    results = scheduler.start(lambda: build(sources, scheduler), created=100, subscribed=200,
                              disposed=2000)
    return _comparable(results.messages)


@settings(max_examples=300, deadline=None)
@given(plans=st.lists(_source, min_size=1, max_size=3),
       first=st.sampled_from([0, 5, 15]), idle=st.sampled_from([0, 4, 15]),
       attempts=st.integers(1, 3))
def test_the_fused_operator_is_the_composed_chain(
    plans: list[Any], first: int, idle: int, attempts: int,
) -> None:
    def composed(sources: list[Observable[Chunk]], scheduler: TestScheduler) -> Any:
        chained = []
        for source in sources:
            if first:
                source = source.pipe(first_token_timeout(first, scheduler=scheduler))
            if idle:
                source = source.pipe(idle_timeout(idle, scheduler=scheduler))
            chained.append(source)
        return chained[0].pipe(retry_with_backoff(
            attempts, backoff_base=0, backoff_max=1, fallbacks=chained[1:], scheduler=scheduler))

    def fused(sources: list[Observable[Chunk]], scheduler: TestScheduler) -> Any:
        return attempts_(sources, first_token_s=first, idle_s=idle, max_attempts=attempts,
                         backoff_base=0, backoff_max=1, scheduler=scheduler)

    assert _run(fused, plans) == _run(composed, plans)


def test_the_fused_operator_counts_a_held_gap_as_the_consumers() -> None:
    holding = {"on": False}
    scheduler = TestScheduler()
    scheduler.schedule_absolute(215, lambda *_: holding.update(on=True))
    scheduler.schedule_absolute(280, lambda *_: holding.update(on=False))
    source = scheduler.create_hot_observable(on_next(210, text("a")), on_next(290, text("b")))
    results = scheduler.start(lambda: attempts_(
        [source], first_token_s=0, idle_s=20, max_attempts=1, backoff_base=0, backoff_max=1,
        held=lambda: holding["on"], scheduler=scheduler))
    assert [(m.time, m.value.kind) for m in results.messages] == [
        (210, "N"), (290, "N"), (310, "E")]
