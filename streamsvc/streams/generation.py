"""One answer being generated: the pipeline subscribed, its chunks handed to a sink.

The one lifecycle of every stream, streamed or not, journaled or read by its
one client: start (subscribe: the upstream request starts), chunks (usage
metered, the token clock ticked, the sink fed), end (the subscription
disposed, i.e. the upstream cancelled if it still runs; usage, retries and
the error code recorded once; the sink told how it ended, once).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from reactivex import Observable, abc

from streamsvc.chunks import Chunk, Seam
from streamsvc.errors import ErrorCode, StreamsvcError
from streamsvc.pipeline import StreamContext
from streamsvc.reactive.direct import subscribe_direct
from streamsvc.reactive.operators._common import LoopScheduler
from streamsvc.streams.sinks import Sink
from streamsvc.usage import Usage, UsageMeter
from streamsvc.wire import Ending

__all__ = [
    "Generation", "GenerationState", "StreamObserver", "new_stream_id",
    "terminal_error",
]

log = logging.getLogger("streamsvc.streams")


class StreamObserver(Protocol):
    """Told what each generation does, for metrics (the server's ``Metrics`` is one)."""

    def stream_started(self, kind: str) -> None:
        """A stream of this kind (``openai``, ``direct``, ``resumable``, ``complete``) started."""

    def first_token(self, seconds: float) -> None:
        """The first output of a stream, ``seconds`` after it started."""

    def gap(self, seconds: float) -> None:
        """Another output, ``seconds`` after the one before it."""

    def retried(self, codes: list[str]) -> None:
        """A stream ended; its pipeline retried or fell back after these error codes."""

    def usage(self, key_id: str | None, usage: Usage) -> None:
        """A stream an upstream had accepted ended; it used this (once per stream)."""

    def count_error(self, code: str) -> None:
        """A stream ended with an error of this code."""


def new_stream_id() -> str:
    """A random stream id: URL-safe, no ':' (it separates the seq in event ids)."""
    return "st_" + secrets.token_hex(12)


def terminal_error(error: BaseException, stream_id: str) -> StreamsvcError:
    """The typed error a stream ends with: ours as it is, anything else ``internal_error``."""
    if isinstance(error, StreamsvcError):
        return error
    log.error("stream %s failed", stream_id, exc_info=error)
    return StreamsvcError("internal error while relaying the stream",
                          code=ErrorCode.INTERNAL_ERROR, retryable=True)


class GenerationState(enum.Enum):
    RUNNING = "running"
    ENDED = "ended"


class Generation(abc.ObserverBase[Chunk]):
    """One upstream answer, from subscription to its one end; its pipeline's observer.

    Chunks go to the sink from ``on_next`` itself, on the upstream reader's
    own turn of the loop: no task of its own and no hand-off per token.
    Whatever comes after the end is ignored.

    Args:
        stream_id: the stream's id (events, logs, ``X-Stream-ID``).
        source: the pipeline (cold: subscribing starts the upstream request).
        context: filled in by the pipeline as it runs (upstream, attempts, retries).
        sink: where the chunks and the end go.
        resumable: whether the stream outlives its readers (``resume_grace_s``).
        background: whether it runs to its end whoever reads it (no grace period).
        observer: told the token times, retries, usage and error code.
        meter: where each chunk's usage is counted (default: a meter of its own); a
            sink whose format reports usage reads the same one.
    """

    def __init__(
        self,
        stream_id: str,
        source: Observable[Chunk],
        context: StreamContext,
        sink: Sink,
        *,
        resumable: bool,
        background: bool = False,
        observer: StreamObserver | None = None,
        meter: UsageMeter | None = None,
    ) -> None:
        self.id = stream_id
        self.resumable = resumable or background
        self.background = background
        self.context = context
        self.sink = sink
        self.state = GenerationState.RUNNING
        self.readers = 0
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the sink was told the end."""
        self._source = source
        self._observer = observer
        # The token clock: the time to the first output, then each gap, told to the observer.
        self._gap = observer.gap if observer is not None else None  # called per token
        self._last = time.monotonic()  # the start, then the last output
        self._first = True
        self._meter = meter if meter is not None else UsageMeter()
        self._subscription: abc.DisposableBase | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._when_ended: list[Callable[[], object]] = []

    def when_ended(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` at the end, right after ``ended`` is set (at once if it is).

        For what the stream holds until it ends (its limits slot, its place in the
        registry): called in the end's own call, not a turn of the loop later as a
        done callback of ``ended`` would be, and kept without a closure per stream.
        """
        if self.state is GenerationState.ENDED and self.ended.done():
            callback()
        else:
            self._when_ended.append(callback)

    def start(self) -> None:
        """Subscribe to the pipeline: the upstream request starts now."""
        scheduler = LoopScheduler(asyncio.get_running_loop())
        try:
            # The server's own chain takes this observer as it is (``reactive/direct.py``).
            subscription = subscribe_direct(self._source, self, scheduler)
        except Exception as exc:  # noqa: BLE001 - a pipeline that fails to start ends the stream
            self.on_error(exc)
            return
        if self.state is GenerationState.RUNNING:
            self._subscription = subscription
        else:
            subscription.dispose()

    def stop(self, reason: str = "cancelled", *, error: StreamsvcError | None = None) -> None:
        """End the generation now: the upstream request is cancelled.

        Readers get ``done`` with ``reason`` as the finish reason, or ``error``
        when one is given (``shutting_down``, ``slow_consumer``).
        """
        if self.state is GenerationState.RUNNING:
            self._end(error, reason)

    def arm_grace(self, seconds: float, expired: Callable[[], object] | None = None) -> None:
        """Stop after ``seconds`` with no reader; or call ``expired`` then, to decide."""
        self.cancel_grace()
        self._grace = asyncio.get_running_loop().call_later(
            seconds, expired or (lambda: self.stop("cancelled")))

    def cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def on_next(self, chunk: Chunk) -> None:
        if self.state is not GenerationState.RUNNING:
            return
        if isinstance(chunk, Seam):
            self._meter.seam(self.context.prompt_tokens)
        else:
            self._meter.add(chunk)
        try:
            made = self.sink.put(chunk)
        except Exception as exc:  # noqa: BLE001 - journal_full, slow_consumer, or a bug of ours
            self.on_error(exc)
            return
        if made and self._gap is not None:
            now = time.monotonic()
            if self._first:
                self._first = False
                assert self._observer is not None
                self._observer.first_token(now - self._last)
            else:
                self._gap(now - self._last)
            self._last = now

    def on_completed(self) -> None:
        if self.state is GenerationState.RUNNING:
            self._end(None, None)

    def on_error(self, error: Exception) -> None:
        if self.state is GenerationState.RUNNING:
            self._end(terminal_error(error, self.id), None)

    def _end(self, error: StreamsvcError | None, reason: str | None) -> None:
        """Cancel the upstream (if it still runs), record the stream once, tell the sink once."""
        self.state = GenerationState.ENDED
        self.cancel_grace()
        if self._subscription is not None:
            self._subscription.dispose()
            self._subscription = None
        context = self.context
        observer = self._observer
        if observer is not None:
            if context.retried:
                observer.retried(context.retried)
            # Only once an upstream answered 200: one that refused (429, 5xx) bills nothing.
            if context.upstream is not None:
                observer.usage(context.key_id, self._meter.result(context.prompt_tokens))
            if error is not None:
                observer.count_error(str(error.code))
        try:
            if error is None:
                self.sink.end(Ending(finish_reason=reason, upstream=context.upstream,
                                     attempts=context.attempts))
            else:
                log.info("stream %s ended with %s: %s", self.id, error.code, error.message)
                self.sink.fail(error)
        except Exception:  # the journal was closed under us (shutdown): nothing to tell
            log.exception("stream %s: its end could not be written", self.id)
        if not self.ended.done():
            self.ended.set_result(None)
        callbacks, self._when_ended = self._when_ended, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a bug of ours: the other callbacks still run
                log.exception("stream %s: a callback at its end failed", self.id)
