"""Running streams: each generation runs its pipeline into the journal, apart from readers.

A generation is owned by the :class:`StreamRegistry`, not by an HTTP handler,
so a reader can leave and come back (``Last-Event-ID``) while the upstream
goes on. Readers are counted: when the last one leaves, a non-resumable
stream is stopped at once (the upstream request is cancelled) and a resumable
one after ``resume_grace_s``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec
from reactivex import Observable, abc
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, StreamError, StreamsvcError
from streamsvc.events import DELTA, DONE, ERROR, EventBuilder
from streamsvc.journal.base import Journal
from streamsvc.pipeline import StreamContext

__all__ = [
    "Generation", "GenerationState", "StreamObserver", "StreamRegistry", "TokenClock",
    "new_stream_id",
]

log = logging.getLogger("streamsvc.streams")

class StreamObserver(Protocol):
    """Told what each generation does, for metrics (the server's ``Metrics`` is one)."""

    def first_token(self, seconds: float) -> None:
        """The first event of a stream was journaled, ``seconds`` after it started."""

    def gap(self, seconds: float) -> None:
        """Another event was journaled, ``seconds`` after the one before it."""

    def retried(self, codes: list[str]) -> None:
        """A stream ended; its pipeline retried or fell back after these error codes."""


class TokenClock:
    """Tells a :class:`StreamObserver` the time to the first event of a stream and the gaps."""

    __slots__ = ("_first", "_last", "_observer")

    def __init__(self, observer: StreamObserver) -> None:
        self._observer = observer
        self._last = time.monotonic()  # the start, then the last event
        self._first = True

    def tick(self) -> None:
        """An event went out (or into the journal) now."""
        now = time.monotonic()
        if self._first:
            self._first = False
            self._observer.first_token(now - self._last)
        else:
            self._observer.gap(now - self._last)
        self._last = now


def new_stream_id() -> str:
    """A random stream id: URL-safe, no ':' (it separates the seq in event ids)."""
    return "st_" + secrets.token_hex(12)


class GenerationState(enum.Enum):
    RUNNING = "running"
    ENDED = "ended"


class Generation:
    """One upstream answer being written into the journal.

    It subscribes to the pipeline and journals each chunk's events from
    ``on_next`` itself, on the upstream reader's own turn of the loop: no task
    of its own and no hand-off per token (that hop cost a task wake-up per
    token). Readers take whatever is pending from the journal.
    """

    def __init__(
        self,
        stream_id: str,
        source: Observable[Chunk],
        context: StreamContext,
        journal: Journal,
        *,
        resumable: bool,
        max_lag_bytes: int | None = None,
        on_error: Callable[[str], None] | None = None,
        observer: StreamObserver | None = None,
    ) -> None:
        self.id = stream_id
        self.resumable = resumable
        self.context = context
        self.state = GenerationState.RUNNING
        self.readers = 0
        self.delivered = 0
        """Bytes of the journal its reader has written to its socket (non-resumable streams)."""
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the final event (``done`` or ``error``) is journaled."""
        self._max_lag = None if resumable else max_lag_bytes
        self._source = source
        self._journal = journal
        self._on_error = on_error
        self._builder = EventBuilder()
        self._observer = observer
        self._clock = TokenClock(observer) if observer is not None else None
        self._subscription: abc.DisposableBase | None = None
        self._grace: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Subscribe to the pipeline: the upstream request starts now."""
        scheduler = AsyncIOScheduler(asyncio.get_running_loop())
        try:
            subscription = self._source.subscribe(
                self._on_next, self._on_error_event, self._on_completed, scheduler=scheduler
            )
        except Exception as exc:  # noqa: BLE001 - a pipeline that fails to start ends the stream
            self._on_error_event(exc)
            return
        if self.state is GenerationState.RUNNING:
            self._subscription = subscription
        else:
            subscription.dispose()

    def stop(self, reason: str = "cancelled", *, error: StreamsvcError | None = None) -> None:
        """End the generation: the upstream request is cancelled.

        Readers get ``done`` with ``reason`` as the finish reason, or the
        ``error`` event of ``error`` when one is given (``slow_consumer``).
        """
        if self.state is not GenerationState.RUNNING:
            return
        if error is not None:
            self._fail(error)
        else:
            self._finish(DONE, self._builder.done(finish_reason=reason, **self.context.summary()))

    def wrote_through(self, end: int) -> None:
        """A reader wrote the journal up to byte ``end`` to its socket.

        The reader furthest on counts, should a second one read the stream:
        the lag that ends a non-resumable stream with ``slow_consumer``.
        """
        self.delivered = max(self.delivered, end)

    def arm_grace(self, seconds: float) -> None:
        self.cancel_grace()
        self._grace = asyncio.get_running_loop().call_later(seconds, self.stop, "cancelled")

    def cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _on_next(self, chunk: Chunk) -> None:
        if self.state is not GenerationState.RUNNING:
            return
        try:
            events = [(DELTA, data) for data in self._builder.deltas(chunk)]
            if events:
                self._journal.append_nowait(self.id, events)
                if self._clock is not None:
                    self._clock.tick()
                self._check_lag()
        except Exception as exc:  # noqa: BLE001 - journal_full, slow_consumer, or a bug of ours
            self._on_error_event(exc)

    def _on_completed(self) -> None:
        if self.state is GenerationState.RUNNING:
            self._finish(DONE, self._builder.done(**self.context.summary()))

    def _on_error_event(self, error: Exception) -> None:
        if self.state is not GenerationState.RUNNING:
            return
        if isinstance(error, StreamsvcError):
            self._fail(error)
            return
        log.error("stream %s failed", self.id, exc_info=error)
        self._finish(ERROR, _error_data({
            "code": str(ErrorCode.INTERNAL_ERROR),
            "message": "internal error while relaying the stream",
            "retryable": True,
        }))

    def _fail(self, error: StreamsvcError) -> None:
        log.info("stream %s ended with %s: %s", self.id, error.code, error.message)
        self._finish(ERROR, _error_data(error.to_event()))
        if self._on_error is not None:
            self._on_error(str(error.code))

    def _finish(self, kind: str, data: bytes) -> None:
        """Cancel the upstream (if it still runs) and journal the final event, once."""
        self.state = GenerationState.ENDED
        self.cancel_grace()
        if self._observer is not None and self.context.retried:
            self._observer.retried(self.context.retried)
        if self._subscription is not None:
            self._subscription.dispose()
            self._subscription = None
        try:
            self._journal.append_nowait(self.id, [(kind, data)])
        except Exception:  # the journal was closed under us (shutdown): nothing to tell
            log.exception("stream %s: the final event could not be journaled", self.id)
        if not self.ended.done():
            self.ended.set_result(None)

    def _check_lag(self) -> None:
        """A non-resumable stream's one reader must keep up: it has nowhere else to read."""
        if self._max_lag is None:
            return
        lag = (self._journal.size(self.id) or 0) - self.delivered
        if lag > self._max_lag:
            raise StreamError(
                f"the client did not keep up: {lag} bytes waiting, more than"
                f" server.max_pending_bytes ({self._max_lag})",
                code=ErrorCode.SLOW_CONSUMER,
            )


def _error_data(event: dict[str, Any]) -> bytes:
    return msgspec.json.encode(event)


class StreamRegistry:
    """The generations this process runs, and the reader counts that keep them alive.

    Args:
        journal: where generations write and readers read.
        resume_grace_s: how long a resumable stream with no reader keeps generating.
        max_lag_bytes: how far the reader of a non-resumable stream may fall
            behind the journal before the stream ends with ``slow_consumer``.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        resume_grace_s: float,
        max_lag_bytes: int | None = None,
    ) -> None:
        self.journal = journal
        self._grace_s = resume_grace_s
        self._max_lag = max_lag_bytes
        self._running: dict[str, Generation] = {}
        self.on_error: Callable[[str], None] | None = None
        """Told the code of every stream that ends with an ``error`` event."""
        self.observer: StreamObserver | None = None
        """Told each generation's first-token time, gaps and retries."""

    def __len__(self) -> int:
        return len(self._running)

    def get(self, stream_id: str) -> Generation | None:
        return self._running.get(stream_id)

    async def start(
        self, source: Observable[Chunk], context: StreamContext, *, resumable: bool,
        meta: Mapping[str, str] | None = None,
    ) -> Generation:
        """Create a stream (with ``meta`` kept in the journal) and start its upstream now."""
        stream_id = new_stream_id()
        await self.journal.create(stream_id, meta)
        generation = Generation(
            stream_id, source, context, self.journal,
            resumable=resumable, max_lag_bytes=self._max_lag, on_error=self.on_error,
            observer=self.observer,
        )
        self._running[stream_id] = generation
        generation.start()
        if resumable and generation.state is GenerationState.RUNNING:
            generation.arm_grace(self._grace_s)  # nobody has attached yet
        generation.ended.add_done_callback(lambda _: self._running.pop(stream_id, None))
        return generation

    def attach(self, stream_id: str) -> None:
        """A reader arrived: a pending grace period is called off."""
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.readers += 1
            generation.cancel_grace()

    def detach(self, stream_id: str) -> None:
        """A reader left: with none left, stop now or after the grace period."""
        generation = self._running.get(stream_id)
        if generation is None:
            return
        generation.readers -= 1
        if generation.readers > 0:
            return
        if generation.resumable:
            generation.arm_grace(self._grace_s)
        else:
            generation.stop("cancelled")

    def cancel(self, stream_id: str, error: StreamsvcError | None = None) -> bool:
        """Stop a stream's generation (DELETE); False when it does not run here.

        With ``error`` the stream ends with that error event instead of ``done``.
        """
        generation = self._running.get(stream_id)
        if generation is None:
            return False
        generation.stop("cancelled", error=error)
        return True

    async def drain(self, timeout_s: float) -> int:
        """Let the running generations finish, for at most ``timeout_s``; then stop the rest.

        A generation stopped here ends with the ``shutting_down`` error event
        (retryable), so a client knows its answer was cut by a restart.

        Returns:
            How many generations had to be stopped.
        """
        pending = [g.ended for g in self._running.values()]
        if pending and timeout_s > 0:
            await asyncio.wait(pending, timeout=timeout_s)
        return await self._stop_all()

    async def close(self) -> None:
        """Stop every generation and wait for each to write its final event."""
        await self._stop_all()

    async def _stop_all(self) -> int:
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("cancelled", error=StreamError(
                "the server is shutting down; the answer was cut here",
                code=ErrorCode.SHUTTING_DOWN, retryable=True,
            ))
        await asyncio.gather(*(g.ended for g in generations), return_exceptions=True)
        return len(generations)
