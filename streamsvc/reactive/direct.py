"""Observables of streamsvc's own that a streamsvc subscriber can subscribe to without Rx's wrapper.

``Observable.subscribe`` wraps every observer in an ``AutoDetachObserver``
(which drops what comes after the end and disposes the source then) and runs
the first subscription of a chain inside Rx's trampoline. On the server's
chain that is one more call per token at each hop, and a trampoline, a
priority queue and its locks per stream. The upstream request
(``UpstreamClient.chunks``) and the fused attempt operator already keep the
observer grammar themselves: each sends nothing after its end or after it
was disposed, and ends once. So the fused operator subscribes to the
upstream, and a stream's generation to the fused operator, with
:func:`subscribe_direct`, which hands over the observer as it is.

For anyone else they are ordinary Observables: ``subscribe`` and ``pipe``
behave as Rx's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable, abc
from reactivex.disposable import Disposable

__all__ = ["DirectObservable", "subscribe_direct"]

T = TypeVar("T")

Subscribe = Callable[[abc.ObserverBase[T], abc.SchedulerBase | None], abc.DisposableBase]


class DirectObservable(Observable[T]):
    """An Observable whose subscribe function keeps the observer grammar itself.

    ``subscribe`` must call ``on_next`` only before the end, ``on_error`` or
    ``on_completed`` at most once, and nothing once disposed.
    """

    def __init__(self, subscribe: Subscribe[T]) -> None:
        super().__init__(subscribe)
        self._direct = subscribe


def subscribe_direct(
    source: Observable[T], observer: abc.ObserverBase[T], scheduler: abc.SchedulerBase | None
) -> abc.DisposableBase:
    """Subscribe ``observer`` as it is to a :class:`DirectObservable`, else through Rx.

    ``observer`` must itself ignore what comes after it was disposed of.
    As with Rx, a subscribe function that raises sends the error to ``observer``.
    """
    if type(source) is not DirectObservable:
        return source.subscribe(observer, scheduler=scheduler)
    try:
        return source._direct(observer, scheduler)  # a private method of our own class
    except Exception as exc:  # noqa: BLE001 - as Observable.subscribe does
        observer.on_error(exc)
        return Disposable()
