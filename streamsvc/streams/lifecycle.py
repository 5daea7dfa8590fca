"""The one way a stream starts, for every endpoint, streamed or not.

An endpoint parses its request, then asks here for a stream; what it gets
differs only in who reads it:

- :meth:`Streams.direct`: one client reads it as it comes (``POST
  /v1/chat/completions`` streamed, ``POST /v1/chat/stream``), in that
  client's wire format, through a bounded :class:`~streamsvc.streams.sinks.Backlog`
  that holds the upstream back when the client is slow;
- :meth:`Streams.journaled`: a resumable stream, written to the journal and
  read by any number of readers from any ``Last-Event-ID``;
- :meth:`Streams.complete`: the non-streamed answer, the same pipeline collected.

Every one runs the same steps: refused while draining, routed, counted
against the limits, its prompt's usage estimated, the pipeline built from
``[pipeline]``, run by the registry (which drains it at shutdown), and ended
once (:class:`~streamsvc.streams.generation.Generation`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from streamsvc.chat_request import ChatRequest
from streamsvc.config import Config
from streamsvc.journal.base import Journal
from streamsvc.pipeline import StreamContext, build_pipeline
from streamsvc.reactive.backpressure import Valve
from streamsvc.streams.generation import Generation, StreamObserver, new_stream_id
from streamsvc.streams.registry import StreamRegistry
from streamsvc.streams.sinks import Backlog, Collector, JournalSink, Sink
from streamsvc.upstream.routing import Router
from streamsvc.usage import UsageMeter, estimate_prompt_tokens
from streamsvc.wire import EntryEncoder, WireEncoder

__all__ = ["Slot", "Slots", "Streams"]


class Slot(Protocol):
    def release(self) -> None:
        """The stream ended: its slot is free again."""


class Slots(Protocol):
    """The concurrency limits a stream counts against (the server's limiter)."""

    async def acquire_stream(self, key_id: str | None) -> Slot:
        """Count one open stream; raises ``LimitError`` when over a limit."""


class Streams:
    """Starts every stream of this process.

    Args:
        config: the whole config (``[pipeline]``, ``[server]``, ``[journal]``).
        router: model name to upstreams.
        registry: runs the generations and drains them at shutdown.
        journal: where resumable streams are written.
        limits: the concurrency limits.
        observer: the metrics, told each stream's start, tokens, retries, usage, errors.
        accepting: raises ``shutting_down`` once the server drains.
    """

    def __init__(
        self,
        *,
        config: Config,
        router: Router,
        registry: StreamRegistry,
        journal: Journal,
        limits: Slots,
        observer: StreamObserver | None,
        accepting: Callable[[], None],
    ) -> None:
        self._config = config
        self._router = router
        self.registry = registry
        self._journal = journal
        self._limits = limits
        self._observer = observer
        self._accepting = accepting

    async def direct(
        self, chat: ChatRequest, encoder: Callable[[str], WireEncoder], *,
        key_id: str | None, kind: str,
    ) -> tuple[Generation, Backlog]:
        """A stream its one client reads as it comes, in the format ``encoder(stream_id)`` makes.

        The caller is that client: it calls :meth:`done_reading` when it stops.
        """
        stream_id = new_stream_id()
        valve = Valve()
        pipeline = self._config.pipeline
        backlog = Backlog(
            encoder(stream_id), max_bytes=self._config.server.max_pending_bytes, valve=valve,
            coalesce_chars=pipeline.coalesce_max_chars if pipeline.coalesce else None,
        )
        generation = await self._start(stream_id, chat, backlog, key_id=key_id, kind=kind,
                                       valve=valve, resumable=False)
        return generation, backlog

    async def journaled(
        self, chat: ChatRequest, *, key_id: str | None, meta: Mapping[str, str] | None = None,
        stream_id: str | None = None, entries: EntryEncoder | None = None,
        kind: str = "resumable", resumable: bool = True, background: bool = False,
        meter: UsageMeter | None = None, prompt_tokens: int | None = None,
    ) -> Generation:
        """A stream in the journal (with ``meta`` kept beside it), read by any number of readers.

        Args:
            stream_id: its id (default: a new ``st_...`` id).
            entries: its format (default: the streamsvc event format).
            kind: its label in ``streamsvc_streams_started_total``.
            resumable: False: its one reader is the caller, who calls
                :meth:`done_reading` when it stops (the stream stops then).
            background: it runs to its end whoever reads it (no ``resume_grace_s``).
            meter: the stream's usage meter, for a format that reports usage itself
                (``entries`` reads it; the generation counts each chunk into it).
            prompt_tokens: the prompt's estimated tokens, when the caller has them already
                (default: estimated from ``chat``'s messages).
        """
        stream_id = stream_id or new_stream_id()
        sink = JournalSink(self._journal, stream_id, entries)

        async def admitted() -> None:
            await self._journal.create(stream_id, meta)
            sink.opened()

        return await self._start(
            stream_id, chat, sink, key_id=key_id, kind=kind, valve=None,
            resumable=resumable, background=background, admitted=admitted, meter=meter,
            prompt_tokens=prompt_tokens,
        )

    async def complete(
        self, chat: ChatRequest, *, key_id: str | None
    ) -> tuple[dict[str, Any], StreamContext]:
        """The non-streamed answer: the pipeline's chunks collected into a ``chat.completion``.

        Cancelling the caller (its client left) cancels the upstream.
        """
        collector = Collector(max_bytes=self._config.journal.max_bytes)
        generation = await self._start(new_stream_id(), chat, collector, key_id=key_id,
                                       kind="complete", valve=None, resumable=False)
        try:
            answer = await collector.result
        finally:
            self.done_reading(generation)
        return answer, generation.context

    def done_reading(self, generation: Generation) -> None:
        """The one client of a direct stream or answer stopped reading: stop it if it runs."""
        self.registry.detach(generation.id)

    async def _start(
        self, stream_id: str, chat: ChatRequest, sink: Sink, *, key_id: str | None,
        kind: str, valve: Valve | None, resumable: bool, background: bool = False,
        admitted: Callable[[], Awaitable[None]] | None = None,
        meter: UsageMeter | None = None, prompt_tokens: int | None = None,
    ) -> Generation:
        """Admit the request (drain, route, limits), then run it.

        ``admitted`` runs once the request is admitted (the journal's ``create``):
        a request refused before it leaves nothing behind.
        """
        self._accepting()
        clients = self._router.clients_for(chat.model)
        if prompt_tokens is None:
            prompt_tokens = estimate_prompt_tokens(chat.body.get("messages"))
        context = StreamContext(key_id=key_id, valve=valve, prompt_tokens=prompt_tokens)
        source = build_pipeline(chat.body, clients, self._config.pipeline, context,
                                retries=chat.retries,
                                continuation=self._router.continues(chat.model))
        # Counted against the limits from here until the generation ends (done, error,
        # cancelled, or stopped because its client left).
        slot = await self._limits.acquire_stream(key_id)
        if admitted is not None:
            try:
                await admitted()
            except BaseException:
                slot.release()
                raise
        generation = Generation(stream_id, source, context, sink, resumable=resumable,
                                background=background, observer=self._observer, meter=meter)
        generation.when_ended(slot.release)
        if self._observer is not None:
            self._observer.stream_started(kind)
        self.registry.start(generation, readers=0 if resumable else 1)
        return generation

