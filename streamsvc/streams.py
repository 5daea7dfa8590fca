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
from collections.abc import Callable
from typing import Any

import msgspec
from reactivex import Observable

from streamsvc.chunks import Chunk, coalesce_batch
from streamsvc.errors import ErrorCode, StreamError, StreamsvcError
from streamsvc.events import DELTA, DONE, ERROR, EventBuilder
from streamsvc.journal.base import Journal
from streamsvc.pipeline import StreamContext
from streamsvc.reactive.bridge import ObservableIterator

__all__ = ["Generation", "GenerationState", "StreamRegistry", "new_stream_id"]

log = logging.getLogger("streamsvc.streams")

# Chunks that may wait for the journal writer before the generation fails;
# the writer takes all of them each time it runs, so this only fills if the
# event loop is starved.
_MAX_PENDING_CHUNKS = 100_000


def new_stream_id() -> str:
    """A random stream id: URL-safe, no ':' (it separates the seq in event ids)."""
    return "st_" + secrets.token_hex(12)


class GenerationState(enum.Enum):
    RUNNING = "running"
    ENDED = "ended"


class Generation:
    """One upstream answer being written into the journal."""

    def __init__(
        self,
        stream_id: str,
        source: Observable[Chunk],
        context: StreamContext,
        journal: Journal,
        *,
        resumable: bool,
        coalesce_chars: int | None,
        max_lag_bytes: int | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.id = stream_id
        self.resumable = resumable
        self.context = context
        self.state = GenerationState.RUNNING
        self.readers = 0
        self.delivered = 0
        """Bytes of the journal its reader has written to its socket (non-resumable streams)."""
        self._max_lag = None if resumable else max_lag_bytes
        self._source = source
        self._journal = journal
        self._coalesce_chars = coalesce_chars
        self._on_error = on_error
        self._stop_reason: str | None = None
        self._failure: StreamsvcError | None = None
        self._iterator: ObservableIterator[Chunk] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"stream {self.id}")

    def stop(self, reason: str = "cancelled", *, error: StreamsvcError | None = None) -> None:
        """End the generation: the upstream request is cancelled.

        Readers get ``done`` with ``reason`` as the finish reason, or the
        ``error`` event of ``error`` when one is given (``slow_consumer``).
        """
        if self.state is not GenerationState.RUNNING or self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._failure = error
        self.cancel_grace()
        if self._iterator is not None:
            self._iterator.dispose()

    def arm_grace(self, seconds: float) -> None:
        self.cancel_grace()
        self._grace = asyncio.get_running_loop().call_later(seconds, self.stop, "cancelled")

    def cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    async def _run(self) -> None:
        builder = EventBuilder()
        final: tuple[str, bytes]
        try:
            iterator = ObservableIterator(self._source, max_pending=_MAX_PENDING_CHUNKS)
            self._iterator = iterator
            if self._stop_reason is not None:
                iterator.dispose()
            async with iterator:
                async for batch in iterator:
                    if self._coalesce_chars is not None:
                        batch = coalesce_batch(batch, self._coalesce_chars)
                    events: list[tuple[str, bytes]] = []
                    for chunk in batch:
                        for data in builder.deltas(chunk):
                            events.append((DELTA, data))
                    if events:
                        await self._journal.append(self.id, events)
                        self._check_lag()
            if self._failure is not None:
                raise self._failure
            final = (DONE, builder.done(finish_reason=self._stop_reason, **self.context.summary()))
        except StreamsvcError as exc:
            log.info("stream %s ended with %s: %s", self.id, exc.code, exc.message)
            final = (ERROR, _error_data(exc.to_event()))
            if self._on_error is not None:
                self._on_error(str(exc.code))
        except Exception:
            log.exception("stream %s failed", self.id)
            final = (ERROR, _error_data({
                "code": str(ErrorCode.INTERNAL_ERROR),
                "message": "internal error while relaying the stream",
                "retryable": True,
            }))
        finally:
            self.state = GenerationState.ENDED
            self.cancel_grace()
        await self._journal.append(self.id, [final])


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
        coalesce_chars: merge what is pending for the journal up to this many
            characters per event (None: no merging).
        max_lag_bytes: how far the reader of a non-resumable stream may fall
            behind the journal before the stream ends with ``slow_consumer``.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        resume_grace_s: float,
        coalesce_chars: int | None,
        max_lag_bytes: int | None = None,
    ) -> None:
        self.journal = journal
        self._grace_s = resume_grace_s
        self._coalesce_chars = coalesce_chars
        self._max_lag = max_lag_bytes
        self._running: dict[str, Generation] = {}
        self.on_error: Callable[[str], None] | None = None
        """Told the code of every stream that ends with an ``error`` event."""

    def __len__(self) -> int:
        return len(self._running)

    def get(self, stream_id: str) -> Generation | None:
        return self._running.get(stream_id)

    async def start(
        self, source: Observable[Chunk], context: StreamContext, *, resumable: bool
    ) -> Generation:
        """Create a stream and start its upstream now."""
        stream_id = new_stream_id()
        await self.journal.create(stream_id)
        generation = Generation(
            stream_id, source, context, self.journal,
            resumable=resumable, coalesce_chars=self._coalesce_chars,
            max_lag_bytes=self._max_lag, on_error=self.on_error,
        )
        self._running[stream_id] = generation
        generation.start()
        if resumable:
            generation.arm_grace(self._grace_s)  # nobody has attached yet
        assert generation.task is not None
        generation.task.add_done_callback(lambda _: self._running.pop(stream_id, None))
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

    async def close(self) -> None:
        """Stop every generation and wait for each to write its final event."""
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("cancelled")
        tasks = [g.task for g in generations if g.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
