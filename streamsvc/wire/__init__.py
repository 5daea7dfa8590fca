"""Wire encoders: one stream's chunks and its end, as the bytes of one wire format.

Pure: no I/O, no clock, no config lookups. The stream lifecycle
(:mod:`streamsvc.streams`) is the same for every endpoint; an endpoint picks
the encoder of its format, and a new format is a new module here:

- :mod:`streamsvc.wire.openai_chat`: OpenAI ``chat.completion.chunk`` frames and ``[DONE]``
- :mod:`streamsvc.wire.events`: the streamsvc event format (``id``, ``event: done|error``)
- :mod:`streamsvc.wire.openai_completion`: the non-streamed ``chat.completion`` object
- :mod:`streamsvc.wire.responses`: the OpenAI Responses API's events and response object

A journaled (resumable) stream's format is an :class:`EntryEncoder`: the
journal numbers and frames its entries, and replays them to any reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streamsvc.chunks import Chunk
from streamsvc.errors import StreamsvcError

__all__ = ["Ending", "Entries", "EntryEncoder", "WireEncoder"]

Entries = list[tuple[str, bytes]]
"""Journal entries: (kind, JSON data) pairs, numbered and framed by the journal."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ending:
    """How a stream ended normally: what the ``done`` of a format may say."""

    finish_reason: str | None = None
    """Overrides the upstream's finish reason (``"cancelled"``); None keeps the upstream's."""
    upstream: str | None = None
    """The upstream that answered."""
    attempts: int = 0
    """Upstream requests made (retries and fallbacks included)."""


class WireEncoder(Protocol):
    """The frames of one stream in one wire format, in order."""

    def preamble(self) -> bytes:
        """What goes first, before any chunk (b"" when nothing does)."""

    def chunk(self, chunk: Chunk) -> bytes:
        """The frames of one chunk (b"" when the client gets nothing of it)."""

    def done(self, ending: Ending) -> bytes:
        """The final frames of a stream that ended normally."""

    def error(self, error: StreamsvcError) -> bytes:
        """The final frames of a stream that ended with ``error``."""


class EntryEncoder(Protocol):
    """The journal entries of one stream in one format, in order."""

    def start(self) -> Entries:
        """What the stream begins with, once its journal entry exists."""

    def chunk(self, chunk: Chunk) -> Entries:
        """The entries of one chunk (often one, sometimes none)."""

    def done(self, ending: Ending) -> Entries:
        """The entries of a normal end; the last is final."""

    def error(self, error: StreamsvcError) -> Entries:
        """The entries of an end by ``error``; the last is final."""
