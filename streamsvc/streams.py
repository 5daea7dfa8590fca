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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgspec
from reactivex import Observable, abc
from reactivex.scheduler.eventloop import AsyncIOScheduler

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, StreamError, StreamsvcError
from streamsvc.events import DELTA, DONE, ERROR, EventBuilder
from streamsvc.journal.base import Journal
from streamsvc.pipeline import StreamContext
from streamsvc.usage import Usage, UsageMeter

__all__ = [
    "Generation", "GenerationState", "Peers", "StreamObserver", "StreamRegistry", "TokenClock",
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

    def usage(self, key_id: str | None, usage: Usage) -> None:
        """A stream an upstream had accepted ended; it used this (once per stream)."""


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
    token). Readers take whatever is pending from the journal. When it ends, the
    observer learns its usage (:mod:`streamsvc.usage`), once.
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
        self._meter = UsageMeter()
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

    def arm_grace(self, seconds: float, expired: Callable[[], object] | None = None) -> None:
        """Stop after ``seconds`` with no reader; or call ``expired`` then, to decide."""
        self.cancel_grace()
        self._grace = asyncio.get_running_loop().call_later(
            seconds, expired or (lambda: self.stop("cancelled")))

    def cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _on_next(self, chunk: Chunk) -> None:
        if self.state is not GenerationState.RUNNING:
            return
        try:
            self._meter.add(chunk)
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
        if self._observer is not None:
            if self.context.retried:
                self._observer.retried(self.context.retried)
            # Only once an upstream answered 200: one that refused (429, 5xx) bills nothing.
            if self.context.upstream is not None:
                self._observer.usage(
                    self.context.key_id, self._meter.result(self.context.prompt_tokens)
                )
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


class Peers(Protocol):
    """Readers and DELETEs on other instances (``streamsvc.journal.peers.RedisPeers``)."""

    async def enter(self, stream_id: str) -> Any:
        """Count a reader here of a stream another instance writes; returns its presence."""

    def leave(self, presence: Any) -> None:
        """That reader left."""

    async def readers(self, stream_id: str) -> int:
        """Live readers of ``stream_id`` on other instances."""

    async def cancel(self, stream_id: str) -> bool:
        """Ask the instance writing ``stream_id`` to stop it; False when none got it."""


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
        self._checks: set[asyncio.Task[None]] = set()
        self.on_error: Callable[[str], None] | None = None
        """Told the code of every stream that ends with an ``error`` event."""
        self.observer: StreamObserver | None = None
        """Told each generation's first-token time, gaps and retries."""
        self.peers: Peers | None = None
        """Other instances on the same journal (Redis); None for one process."""

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
            self._arm_grace(generation)  # nobody has attached yet
        generation.ended.add_done_callback(lambda _: self._running.pop(stream_id, None))
        return generation

    async def attach(self, stream_id: str) -> Any:
        """A reader arrived: a pending grace period is called off.

        Returns what :meth:`detach` needs: for a stream another instance
        writes, the reader's presence there.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.readers += 1
            generation.cancel_grace()
            return None
        if self.peers is not None:
            return await self.peers.enter(stream_id)
        return None

    def detach(self, stream_id: str, presence: Any = None) -> None:
        """A reader left: with none left, stop now or after the grace period."""
        if presence is not None and self.peers is not None:
            self.peers.leave(presence)
        generation = self._running.get(stream_id)
        if generation is None:
            return
        generation.readers -= 1
        if generation.readers > 0:
            return
        if generation.resumable:
            self._arm_grace(generation)
        else:
            generation.stop("cancelled")

    def _arm_grace(self, generation: Generation) -> None:
        if self.peers is None:
            generation.arm_grace(self._grace_s)
        else:
            generation.arm_grace(self._grace_s, lambda: self._check_readers(generation))

    def _check_readers(self, generation: Generation) -> None:
        """The grace period ran out with no reader here: stop unless one reads elsewhere."""
        peers = self.peers
        assert peers is not None

        async def check() -> None:
            if await peers.readers(generation.id) > 0:
                if generation.readers == 0 and generation.state is GenerationState.RUNNING:
                    self._arm_grace(generation)
            elif generation.readers == 0:
                generation.stop("cancelled")

        task = asyncio.ensure_future(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def cancel(self, stream_id: str, error: StreamsvcError | None = None) -> bool:
        """Stop a stream's generation (DELETE), here or on the instance that runs it.

        With ``error`` the stream ends with that error event instead of
        ``done``. Returns False when no instance runs it.
        """
        generation = self._running.get(stream_id)
        if generation is None:
            return self.peers is not None and await self.peers.cancel(stream_id)
        generation.stop("cancelled", error=error)
        return True

    def cancel_here(self, stream_id: str) -> None:
        """Stop a generation of this process at another's word: a DELETE it took, or
        a reader there that ended the stream when our writer lease had lapsed."""
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.stop("cancelled")

    def fail_all(self, error: StreamsvcError) -> None:
        """End every running generation with ``error`` (the journal became unreachable)."""
        for generation in list(self._running.values()):
            generation.stop("cancelled", error=error)

    async def drain(self, timeout_s: float, also: Iterable[asyncio.Future[None]] = ()) -> int:
        """Let the running generations (and ``also``) finish, for at most ``timeout_s``;
        then stop the generations still running.

        A generation stopped here ends with the ``shutting_down`` error event
        (retryable), so a client knows its answer was cut by a restart.

        Returns:
            How many generations had to be stopped.
        """
        pending = [g.ended for g in self._running.values()] + list(also)
        if pending and timeout_s > 0:
            await asyncio.wait(pending, timeout=timeout_s)
        return await self._stop_all()

    async def close(self) -> None:
        """Stop every generation and wait for each to write its final event."""
        await self._stop_all()
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

    async def _stop_all(self) -> int:
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("cancelled", error=StreamError(
                "the server is shutting down; the answer was cut here",
                code=ErrorCode.SHUTTING_DOWN, retryable=True,
            ))
        await asyncio.gather(*(g.ended for g in generations), return_exceptions=True)
        return len(generations)
