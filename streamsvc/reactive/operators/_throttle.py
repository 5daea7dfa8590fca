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
from reactivex.disposable import SerialDisposable

from streamsvc.chunks import Chunk, ChunkBuffer
from streamsvc.reactive.operators._common import scheduler_of, subscribe_flushing


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

            return subscribe_flushing(source, observer, on_next, flush, timer, scheduler_)

        return Observable(subscribe)

    return operator
