"""Body of :func:`streamsvc.operators.coalesce`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import SerialDisposable

from streamsvc.chunks import Chunk, merge, text_size
from streamsvc.reactive.operators._common import scheduler_of, subscribe_flushing


def coalesce_(
    max_delay: float, max_chars: int, scheduler: abc.SchedulerBase | None
) -> Callable[[Observable[Chunk]], Observable[Chunk]]:
    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, "coalesce")
            timer = SerialDisposable()
            held: Chunk | None = None
            held_chars = 0

            def flush(*_: Any) -> None:
                nonlocal held
                timer.disposable = None
                if held is not None:
                    chunk, held = held, None
                    observer.on_next(chunk)

            def hold(chunk: Chunk) -> None:
                nonlocal held, held_chars
                size = text_size(chunk)
                if size is None or size >= max_chars:
                    observer.on_next(chunk)
                    return
                held, held_chars = chunk, size
                # One timer per held batch, never per token or per empty window.
                if max_delay > 0:
                    timer.disposable = timer_scheduler.schedule_relative(max_delay, flush)
                else:
                    timer.disposable = timer_scheduler.schedule(flush)

            def on_next(chunk: Chunk) -> None:
                nonlocal held, held_chars
                if held is None:
                    hold(chunk)
                    return
                size = text_size(chunk)
                merged = merge(held, chunk) if size is not None else None
                if merged is not None and size is not None and held_chars + size <= max_chars:
                    held, held_chars = merged, held_chars + size
                    return
                flush()
                hold(chunk)

            return subscribe_flushing(source, observer, on_next, flush, timer, scheduler_)

        return Observable(subscribe)

    return operator
