"""Where a generation puts its chunks: the journal, one reader's backlog, or a collector.

Every sink takes the same three calls from :class:`~streamsvc.streams.generation.Generation`
(``put`` each chunk, then ``end`` or ``fail`` once) and turns them into what
its readers need. The wire format is the reader's: a sink holds encoded
bytes, so what it holds is what it counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from streamsvc.chunks import Chunk, ChunkBuffer
from streamsvc.errors import ErrorCode, StreamError, StreamsvcError
from streamsvc.journal.base import Journal
from streamsvc.reactive.backpressure import Valve
from streamsvc.wire import Ending, EntryEncoder, WireEncoder
from streamsvc.wire.events import EventEntries
from streamsvc.wire.openai_completion import CompletionBuilder

__all__ = ["WRITE_SLICE", "Backlog", "Collector", "JournalSink", "Sink"]

WRITE_SLICE = 65_536
"""The most bytes one write to a client's connection carries: what the transport holds at most."""


class Sink(Protocol):
    """What a generation writes to."""

    def put(self, chunk: Chunk) -> bool:
        """Take one chunk; True when it made output (an event, a frame) for the readers.

        Raises a :class:`StreamsvcError` when a bound forces the stream to end.
        """

    def end(self, ending: Ending) -> None:
        """The stream ended normally."""

    def fail(self, error: StreamsvcError) -> None:
        """The stream ended with ``error``."""


class JournalSink:
    """A resumable stream's entries in its format (default: streamsvc events), numbered and
    kept by the journal for every reader."""

    __slots__ = ("_append_one", "_chunk", "_entries", "_journal", "_stream_id")

    def __init__(
        self, journal: Journal, stream_id: str, entries: EntryEncoder | None = None
    ) -> None:
        self._journal = journal
        self._stream_id = stream_id
        self._entries: EntryEncoder = entries if entries is not None else EventEntries()
        self._chunk = self._entries.chunk  # bound once: put runs once per token
        self._append_one = journal.append_one_nowait

    def opened(self) -> None:
        """The stream's journal entry exists: write what the format begins with."""
        first = self._entries.start()
        if first:
            self._journal.append_nowait(self._stream_id, first)

    def put(self, chunk: Chunk) -> bool:
        entries = self._chunk(chunk)
        if not entries:
            return False
        if len(entries) == 1:  # nearly every chunk: one delta
            kind, data = entries[0]
            self._append_one(self._stream_id, kind, data)
        else:
            self._journal.append_nowait(self._stream_id, entries)
        return True

    def end(self, ending: Ending) -> None:
        self._journal.append_nowait(self._stream_id, self._entries.done(ending))

    def fail(self, error: StreamsvcError) -> None:
        self._journal.append_nowait(self._stream_id, self._entries.error(error))


def _time_up(first: asyncio.Future[None]) -> None:
    if not first.done():
        first.set_result(None)


class Backlog:
    """The frames of a stream with one reader and no journal, waiting for its socket.

    Bounded in bytes (the encoded frames, not the chunks they came from): at
    ``max_bytes`` the valve closes and the upstream is not read until the
    reader has taken half of it. Chunks that wait together are merged first
    (``coalesce_chars``), so a slow reader gets fewer, larger events. A source
    that ignores the valve and doubles the bound ends with ``slow_consumer``.

    While the reader waits for more, ``direct`` (its connection's ``write_now``)
    takes a frame at once, from the upstream's own callback: no task switch per token.
    """

    __slots__ = ("_buffer", "_bytes", "_encoder", "_ended", "_error", "_frames", "_max",
                 "_output", "_valve", "_waiter", "direct", "first")

    def __init__(
        self,
        encoder: WireEncoder,
        *,
        max_bytes: int,
        valve: Valve,
        coalesce_chars: int | None = None,
    ) -> None:
        self._encoder = encoder
        self._max = max_bytes
        self._valve = valve
        self._buffer = ChunkBuffer(coalesce_chars) if coalesce_chars else None
        preamble = encoder.preamble()
        self._frames: list[bytes] = [preamble] if preamble else []
        self._bytes = len(preamble)
        self._ended = False
        self._output = False
        self._error: StreamsvcError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.direct: Callable[[bytes], bool] | None = None
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done at the first output, at the end, or when :meth:`wait_first` stops waiting."""

    def put(self, chunk: Chunk) -> bool:
        buffer = self._buffer
        if buffer is None or (not self._frames and not buffer.chunks):
            frame = self._encoder.chunk(chunk)
            if not frame:
                return False
            direct = self.direct
            if self._frames or direct is None or not direct(frame):
                self._push(frame)
        else:
            buffer.append(chunk)
            if len(buffer) > 1:  # what cannot merge with the newest chunk is final: encode it
                chunks = buffer.drain()
                buffer.append(chunks.pop())
                for held in chunks:
                    self._push(self._encoder.chunk(held))
            self._wake()
        if not self._output:
            self._produced()
        if self._bytes > 2 * self._max:
            raise StreamError(
                f"the client did not keep up: {self._bytes} bytes waiting, more than twice"
                f" server.max_pending_bytes ({self._max})",
                code=ErrorCode.SLOW_CONSUMER,
            )
        return True

    def end(self, ending: Ending) -> None:
        if not self._ended:
            self._flush()  # first: the encoder sees every chunk before it writes the end
            self._close(self._encoder.done(ending))

    def fail(self, error: StreamsvcError) -> None:
        if not self._ended:
            if not self._output:
                self._error = error  # before any output: an HTTP status may still say it
            self._flush()
            self._close(self._encoder.error(error))

    async def wait_first(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the first output; raise the error that came first."""
        first = self.first
        if not first.done():
            # One timer, where asyncio.wait makes a waiter, a set, callbacks and a timer.
            timer = asyncio.get_running_loop().call_later(timeout, _time_up, first)
            try:
                await first
            finally:
                timer.cancel()
        if self._error is not None:
            raise self._error

    async def take(self) -> tuple[bytes, bool]:
        """The next frames (at most :data:`WRITE_SLICE` bytes, or one frame), and whether
        they are the last."""
        while not self._frames and not (self._buffer and len(self._buffer)) and not self._ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._flush()
        frames = self._frames
        count, size = 0, 0
        for frame in frames:
            if count and size + len(frame) > WRITE_SLICE:
                break
            count += 1
            size += len(frame)
        data = frames[0] if count == 1 else b"".join(frames[:count])
        del frames[:count]
        self._bytes -= size
        if not self._valve.is_open and self._bytes <= self._max // 2:
            self._valve.open()
        return data, self._ended and not frames

    def _push(self, frame: bytes) -> None:
        if not frame:
            return
        self._frames.append(frame)
        self._bytes += len(frame)
        if self._bytes >= self._max and self._valve.is_open and not self._ended:
            self._valve.close()
        self._wake()

    def _produced(self) -> None:
        if not self._output:
            self._output = True
            if not self.first.done():
                self.first.set_result(None)

    def _flush(self) -> None:
        """Encode the chunks held for merging."""
        if self._buffer is not None and len(self._buffer):
            for chunk in self._buffer.drain():
                self._push(self._encoder.chunk(chunk))

    def _close(self, frame: bytes) -> None:
        self._ended = True  # final frames go past the bound: the end always reaches the reader
        self._push(frame)
        self._valve.open()
        if not self.first.done():
            self.first.set_result(None)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Collector:
    """A non-streamed answer: the chunks collected into one ``chat.completion``.

    Bounded by ``max_bytes`` of the upstream's chunks; past it the answer ends
    with ``journal_full``.
    """

    __slots__ = ("_builder", "_bytes", "_max", "result")

    def __init__(self, *, max_bytes: int) -> None:
        self._builder = CompletionBuilder()
        self._max = max_bytes
        self._bytes = 0
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def put(self, chunk: Chunk) -> bool:
        self._builder.add(chunk)
        raw = chunk.raw
        self._bytes += len(raw) if raw is not None else 256  # a merged chunk: about that
        if self._bytes > self._max:
            raise StreamError(
                f"the answer passed journal.max_bytes ({self._max}) before it ended",
                code=ErrorCode.JOURNAL_FULL,
            )
        return chunk.has_content

    def end(self, ending: Ending) -> None:
        if not self.result.done():
            self.result.set_result(self._builder.result())

    def fail(self, error: StreamsvcError) -> None:
        if not self.result.done():
            self.result.set_exception(error)
