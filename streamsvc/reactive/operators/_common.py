"""What the timed operators share: where their timers run, and ending after what they hold."""

from __future__ import annotations

from collections.abc import Callable

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable

from streamsvc.chunks import Chunk


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
