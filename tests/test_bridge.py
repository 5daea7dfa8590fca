"""streamsvc.reactive.bridge: asyncio <-> ReactiveX, on the running loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import reactivex
from reactivex import Subject
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.errors import ErrorCode, StreamError
from streamsvc.reactive.bridge import ObservableIterator, aiter_observable, from_async_iterable


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Recorder:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.errors: list[Exception] = []
        self.completed = asyncio.Event()
        self.ended = asyncio.Event()

    def on_next(self, item: Any) -> None:
        self.items.append(item)

    def on_error(self, error: Exception) -> None:
        self.errors.append(error)
        self.ended.set()

    def on_completed(self) -> None:
        self.completed.set()
        self.ended.set()

    def subscribe(self, source: reactivex.Observable[Any]) -> Any:
        return source.subscribe(self.on_next, self.on_error, self.on_completed)


# -- from_async_iterable -----------------------------------------------------------------------


async def test_from_async_iterable_is_cold() -> None:
    runs = 0

    async def numbers() -> AsyncIterator[int]:
        nonlocal runs
        runs += 1
        for i in range(3):
            yield i

    source = from_async_iterable(numbers)
    await settle()
    assert runs == 0  # nothing runs before a subscription
    first, second = Recorder(), Recorder()
    first.subscribe(source)
    second.subscribe(source)
    await asyncio.wait_for(asyncio.gather(first.completed.wait(), second.completed.wait()), 2)
    assert runs == 2
    assert first.items == second.items == [0, 1, 2]


async def test_from_async_iterable_dispose_cancels_the_task_and_runs_finally() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    log: list[str] = []

    async def forever() -> AsyncIterator[str]:
        try:
            yield "first"
            started.set()
            await release.wait()  # never set: only a cancellation gets out of here
            yield "never"
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    recorder = Recorder()
    subscription = recorder.subscribe(from_async_iterable(forever))
    await asyncio.wait_for(started.wait(), 2)
    assert recorder.items == ["first"]
    subscription.dispose()
    await settle()
    assert log == ["cancelled", "finally"]
    assert recorder.items == ["first"]
    assert recorder.errors == [] and not recorder.completed.is_set()


async def test_from_async_iterable_dispose_before_the_first_item() -> None:
    log: list[str] = []
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[str]:
        try:
            await gate.wait()
            yield "late"
        finally:
            log.append("finally")

    recorder = Recorder()
    subscription = recorder.subscribe(from_async_iterable(slow))
    await settle()
    subscription.dispose()
    await settle()
    assert log == ["finally"] and recorder.items == []


async def test_from_async_iterable_sends_errors_to_on_error() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("upstream broke")

    recorder = Recorder()
    recorder.subscribe(from_async_iterable(failing))
    await asyncio.wait_for(recorder.ended.wait(), 2)
    assert recorder.items == [1]
    assert [str(e) for e in recorder.errors] == ["upstream broke"]
    assert not recorder.completed.is_set()


async def test_from_async_iterable_factory_errors_go_to_on_error() -> None:
    def factory() -> AsyncIterator[int]:
        raise ValueError("cannot start")

    recorder = Recorder()
    recorder.subscribe(from_async_iterable(factory))
    await asyncio.wait_for(recorder.ended.wait(), 2)
    assert [type(e) for e in recorder.errors] == [ValueError]


async def test_from_async_iterable_completes_after_the_last_item() -> None:
    async def two() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    recorder = Recorder()
    recorder.subscribe(from_async_iterable(two))
    await asyncio.wait_for(recorder.completed.wait(), 2)
    assert recorder.items == ["a", "b"] and recorder.errors == []


# -- ObservableIterator ------------------------------------------------------------------------


async def test_observable_iterator_hands_over_everything_pending_as_one_batch() -> None:
    subject: Subject[int] = Subject()
    async with ObservableIterator(subject) as batches:
        for i in range(5):
            subject.on_next(i)
        assert await anext(batches) == [0, 1, 2, 3, 4]
        subject.on_next(5)
        assert await anext(batches) == [5]
        subject.on_next(6)
        subject.on_completed()
        assert await anext(batches) == [6]
        with pytest.raises(StopAsyncIteration):
            await anext(batches)


async def test_observable_iterator_waits_for_the_next_item() -> None:
    subject: Subject[str] = Subject()
    async with ObservableIterator(subject) as batches:
        waiting = asyncio.ensure_future(anext(batches))
        await settle()
        assert not waiting.done()
        subject.on_next("x")
        assert await asyncio.wait_for(waiting, 2) == ["x"]


async def test_observable_iterator_raises_the_sources_error_after_pending_items() -> None:
    subject: Subject[int] = Subject()
    async with ObservableIterator(subject) as batches:
        subject.on_next(1)
        subject.on_error(RuntimeError("boom"))
        assert await anext(batches) == [1]
        with pytest.raises(RuntimeError, match="boom"):
            await anext(batches)


async def test_observable_iterator_slow_consumer_when_max_pending_is_passed() -> None:
    disposed = asyncio.Event()

    def subscribe(observer: Any, scheduler: Any = None) -> Any:
        for i in range(4):
            observer.on_next(i)
        return reactivex.disposable.Disposable(disposed.set)

    async with ObservableIterator(reactivex.create(subscribe), max_pending=3) as batches:
        with pytest.raises(StreamError) as caught:
            await anext(batches)
    assert caught.value.code == ErrorCode.SLOW_CONSUMER
    assert disposed.is_set()


async def test_observable_iterator_max_pending_counts_units() -> None:
    subject: Subject[bytes] = Subject()
    async with ObservableIterator(subject, max_pending=10, size=len) as batches:
        subject.on_next(b"12345")
        subject.on_next(b"12345")  # exactly at the bound: fine
        assert await anext(batches) == [b"12345", b"12345"]
        subject.on_next(b"123456")  # the count restarts after each batch
        subject.on_next(b"12345")
        with pytest.raises(StreamError) as caught:
            await anext(batches)
    assert caught.value.code == ErrorCode.SLOW_CONSUMER
    assert not subject.observers  # the source was disposed


async def test_observable_iterator_exit_disposes_the_subscription() -> None:
    subject: Subject[int] = Subject()
    async with ObservableIterator(subject):
        assert len(subject.observers) == 1
    assert subject.observers == []


async def test_observable_iterator_dispose_ends_a_waiting_consumer() -> None:
    subject: Subject[int] = Subject()
    iterator = ObservableIterator(subject)
    async with iterator as batches:
        waiting = asyncio.ensure_future(anext(batches))
        await settle()
        iterator.dispose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 2)


async def test_observable_iterator_subscribes_with_an_asyncio_scheduler() -> None:
    seen: list[Any] = []

    def subscribe(observer: Any, scheduler: Any = None) -> Any:
        seen.append(scheduler)
        observer.on_completed()
        return reactivex.disposable.Disposable()

    async with ObservableIterator(reactivex.create(subscribe)) as batches:
        assert [b async for b in batches] == []
    assert isinstance(seen[0], AsyncIOScheduler)
    assert seen[0]._loop is asyncio.get_running_loop()


# -- aiter_observable --------------------------------------------------------------------------


async def test_aiter_observable_yields_in_order() -> None:
    async def words() -> AsyncIterator[str]:
        for word in ["Hello", ",", " reactive", " world"]:
            await asyncio.sleep(0)
            yield word

    assert [w async for w in aiter_observable(from_async_iterable(words))] == [
        "Hello", ",", " reactive", " world"]


async def test_aiter_observable_with_time_based_operators_on_the_loop() -> None:
    import reactivex.operators as ops

    source = reactivex.from_iterable(range(5)).pipe(ops.delay(0.01))
    assert [i async for i in aiter_observable(source)] == [0, 1, 2, 3, 4]


async def test_aiter_observable_raises_the_error() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("late failure")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="late failure"):
        async for i in aiter_observable(from_async_iterable(failing)):
            got.append(i)
    assert got == [1]


async def test_aiter_observable_closing_early_cancels_the_source() -> None:
    log: list[str] = []

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0)
                yield i
                i += 1
        finally:
            log.append("finally")

    iterator = aiter_observable(from_async_iterable(endless))
    async for i in iterator:
        if i == 3:
            break
    await iterator.aclose()  # type: ignore[attr-defined]
    await settle()
    assert log == ["finally"]
