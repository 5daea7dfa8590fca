"""OpenAI's streamed chat completion: ``data: <chat.completion.chunk>`` frames, then ``[DONE]``.

A chunk nothing merged goes out as the upstream's own bytes. No ``id:`` or
``retry:`` frames (they crash the OpenAI Python SDK); an error after the
first byte is ``data: {"error": ...}`` and the body ends without ``[DONE]``,
as OpenAI does.
"""

from __future__ import annotations

import msgspec

from streamsvc.chunks import Chunk, Seam
from streamsvc.errors import StreamsvcError
from streamsvc.wire import Ending

__all__ = ["DONE_FRAME", "OpenAIChatEncoder"]

DONE_FRAME = b"data: [DONE]\n\n"
_NULL_USAGE = b',"usage":null}'


class OpenAIChatEncoder:
    """``chat.completion.chunk`` frames for one client (a :class:`~streamsvc.wire.WireEncoder`).

    Args:
        include_usage: whether the client asked for the usage chunk
            (``stream_options.include_usage``). streamsvc always asks the
            upstream for usage; a client that did not ask gets neither the
            usage chunk nor the ``"usage": null`` field on the others, as from OpenAI.
    """

    __slots__ = ("_include_usage",)

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage

    def preamble(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        raw = chunk.raw
        if chunk.text is not None and raw is not None:  # text alone: its usage is null or none
            if self._include_usage:
                return b"data: " + raw + b"\n\n"
            if raw.endswith(_NULL_USAGE):
                return b"data: " + raw[: -len(_NULL_USAGE)] + b"}\n\n"
            if b'"usage"' not in raw:  # a key's quotes: in a JSON string they are escaped
                return b"data: " + raw + b"\n\n"
        if isinstance(chunk, Seam):  # never text
            return b""  # the OpenAI format has no place for it: the text simply goes on
        if not self._include_usage and "usage" in chunk.data:
            if chunk.data["usage"] is not None and not chunk.choices:
                return b""  # the usage chunk itself
            raw = chunk.raw
            if raw is not None and raw.endswith(_NULL_USAGE):
                # The upstream's bytes minus the field: no parse or encode per token.
                return b"data: " + raw[: -len(_NULL_USAGE)] + b"}\n\n"
            chunk = Chunk({k: v for k, v in chunk.data.items() if k != "usage"})
        return b"data: " + chunk.to_json() + b"\n\n"

    def done(self, ending: Ending) -> bytes:
        return DONE_FRAME

    def error(self, error: StreamsvcError) -> bytes:
        return b"data: " + msgspec.json.encode(error.to_openai()) + b"\n\n"
