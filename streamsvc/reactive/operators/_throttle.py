"""Body of :func:`streamsvc.operators.throttle`.

Unlike Rx's ``throttle_first``/``sample``/``debounce``, which drop items,
this one holds what arrives inside the interval and emits all of it, merged,
when the interval ends. A timer runs only while something is held.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SerialDisposable

from streamsvc.chunks import Chunk, ChunkBuffer
from streamsvc.reactive.operators._timeouts import scheduler_of


def throttle_(
    min_interval: float, scheduler: abc.SchedulerBase | None
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    interval = timedelta(seconds=min_interval)

    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, "throttle")
            timer = SerialDisposable()
            held = ChunkBuffer()
            last: datetime | None = None  # when the last emission went out

            def flush(*_: Any) -> None:
                nonlocal last
                timer.disposable = None
                chunks = held.drain()
                if chunks:
                    last = timer_scheduler.now
                    for chunk in chunks:
                        observer.on_next(chunk)

            def on_next(chunk: Chunk) -> None:
                nonlocal last
                if len(held):
                    held.append(chunk)
                    return
                now = timer_scheduler.now
                if last is None or now - last >= interval:
                    last = now
                    observer.on_next(chunk)
                    return
                held.append(chunk)
                timer.disposable = timer_scheduler.schedule_absolute(last + interval, flush)

            def on_error(error: Exception) -> None:
                flush()
                observer.on_error(error)

            def on_completed() -> None:
                flush()
                observer.on_completed()

            subscription = source.subscribe(on_next, on_error, on_completed, scheduler=scheduler_)
            return CompositeDisposable(subscription, timer)

        return Observable(subscribe)

    return operator
