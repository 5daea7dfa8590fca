"""What the timed operators share: where their timers run, and ending after what they hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.chunks import Chunk


class LoopScheduler(AsyncIOScheduler):
    """An ``AsyncIOScheduler`` that names its loop, for subscriptions made on the loop's thread.

    The server subscribes every stream with one. The fused operator of the
    server's chain (``_attempts.py``) then sets its timers with the loop's own
    ``call_later``: one handle, instead of the scheduler's disposables and
    locks around it, at the same times.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.loop = loop


def scheduler_of(
    given: abc.SchedulerBase | None, subscription: abc.SchedulerBase | None, name: str
) -> abc.SchedulerBase:
    """The operator's own scheduler, else the subscription's; an operator with a timer needs one."""
    scheduler = given or subscription
    if scheduler is None:
        raise ValueError(f"{name} needs a scheduler: pass one or subscribe with one")
    return scheduler


def subscribe_flushing(
    source: Observable[Chunk],
    observer: abc.ObserverBase[Chunk],
    on_next: Callable[[Chunk], None],
    flush: Callable[[], None],
    timer: abc.DisposableBase,
    scheduler: abc.SchedulerBase | None,
) -> abc.DisposableBase:
    """Subscribe an operator that holds chunks: what it holds goes out before an error or the end.

    Returns the subscription and the operator's timer, disposed together.
    """

    def on_error(error: Exception) -> None:
        flush()
        observer.on_error(error)

    def on_completed() -> None:
        flush()
        observer.on_completed()

    subscription = source.subscribe(on_next, on_error, on_completed, scheduler=scheduler)
    return CompositeDisposable(subscription, timer)
