"""Bridges between asyncio and ReactiveX.

``from_async_iterable`` turns an async iterator factory into a cold
Observable: each subscription runs the factory in its own task, and disposing
the subscription cancels that task (so the HTTP request behind it is closed).

``ObservableIterator`` goes the other way, for embedders' async code. ``on_next``
is synchronous and cannot await, so items go into a hand-off and the consumer
takes *everything* pending each time it wakes: a slow consumer gets bigger
batches, not a longer queue; with ``max_pending`` a stalled one hits the bound
and gets ``slow_consumer``. (The server does not use it: its streams go to
sinks, ``streamsvc.streams.sinks``, whose bound holds the upstream back.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Generic, TypeVar

import reactivex
from reactivex import Observable, abc
from reactivex.disposable import Disposable
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.errors import ErrorCode, StreamError

__all__ = ["ObservableIterator", "aiter_observable", "from_async_iterable"]

T = TypeVar("T")


def from_async_iterable(factory: Callable[[], AsyncIterator[T]]) -> Observable[T]:
    """A cold Observable of what ``factory()`` yields; dispose cancels the iteration.

    Subscribe on the event loop's thread. Items are emitted from inside the
    iterating task, with no task switch per item.

    Example::

        source = from_async_iterable(lambda: client.stream(body))
    """

    def subscribe(
        observer: abc.ObserverBase[T], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        loop = asyncio.get_running_loop()
        disposed = False

        async def run() -> None:
            iterator: AsyncIterator[T] | None = None
            try:
                # Inside the try: a factory that fails at once is an error for the observer too.
                iterator = factory()
                async for item in iterator:
                    if disposed:
                        return
                    observer.on_next(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure goes to the observer
                if not disposed:
                    observer.on_error(exc)
                return
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not disposed:
                observer.on_completed()

        task = loop.create_task(run())

        def dispose() -> None:
            nonlocal disposed
            disposed = True
            if task is not asyncio.current_task():
                task.cancel()
            else:
                # Disposed from inside its own on_next: cancel once this step yields,
                # or a source blocked on the network would never notice.
                loop.call_soon(task.cancel)

        return Disposable(dispose)

    return reactivex.create(subscribe)


class ObservableIterator(Generic[T]):
    """Subscribe an Observable and hand its items to one coroutine in batches.

    Use as ``async with ObservableIterator(source) as items: async for batch in items``.
    Leaving the ``async with`` disposes the subscription (cancelling the source).

    Args:
        source: the Observable to subscribe (on an ``AsyncIOScheduler`` of the running loop).
        max_pending: how many units may wait for the consumer; past it the
            source is disposed and the iteration raises ``slow_consumer``.
        size: the units an item counts for (default 1 per item; a writer passes
            its byte size).
    """

    def __init__(
        self,
        source: Observable[T],
        *,
        max_pending: int | None = None,
        size: Callable[[T], int] | None = None,
    ) -> None:
        self._source = source
        self._max_pending = max_pending
        self._size = size
        self._pending: list[T] = []
        self._pending_units = 0
        self._error: BaseException | None = None
        self._completed = False
        self._waiter: asyncio.Future[None] | None = None
        self._subscription: abc.DisposableBase | None = None
        self._closed = False
        self._overflow = False

    async def __aenter__(self) -> ObservableIterator[T]:
        loop = asyncio.get_running_loop()
        self._subscription = self._source.subscribe(
            self._on_next, self._on_error, self._on_completed,
            scheduler=AsyncIOScheduler(loop),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Stop the subscription; pending items are dropped with it."""
        self._closed = True
        if self._subscription is not None:
            self._subscription.dispose()
            self._subscription = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_next(self, item: T) -> None:
        if self._error is not None or self._completed:
            return
        self._pending.append(item)
        if self._max_pending is not None:
            self._pending_units += self._size(item) if self._size else 1
            if self._pending_units > self._max_pending:
                self._overflow = True
                self._error = StreamError(
                    f"the client did not keep up: more than {self._max_pending} units pending",
                    code=ErrorCode.SLOW_CONSUMER,
                )
                if self._subscription is not None:
                    self._subscription.dispose()
        self._wake()

    def _on_error(self, error: Exception) -> None:
        self._error = error
        self._wake()

    def _on_completed(self) -> None:
        self._completed = True
        self._wake()

    def __aiter__(self) -> ObservableIterator[T]:
        return self

    async def __anext__(self) -> list[T]:
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self._completed or self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._overflow and self._error is not None:
            # slow_consumer: what was pending is over the bound; fail now rather than write it.
            raise self._error
        batch, self._pending = self._pending, []
        self._pending_units = 0
        return batch


async def aiter_observable(source: Observable[T]) -> AsyncIterator[T]:
    """Iterate an Observable's items one by one in async code.

    Example::

        async for chunk in aiter_observable(streamsvc.chat_stream(...)):
            print(chunk.content, end="")
    """
    async with ObservableIterator(source) as batches:
        async for batch in batches:
            for item in batch:
                yield item
