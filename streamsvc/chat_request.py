"""The one internal chat request every endpoint turns its request into.

Chat completions, the streamsvc endpoints and (translated) the Responses API
all hand the stream lifecycle this: what goes upstream, and the few choices
of the client's that streamsvc itself acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChatRequest"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """A validated chat request.

    Attributes:
        body: what goes to the upstream: the client's fields, unknown ones
            included, without streamsvc's own options.
        model: the requested model (routing key).
        stream: whether the client asked for a stream.
        include_usage: whether the client asked for the usage chunk.
        retries: False when the client turned retries and fallbacks off.
    """

    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    retries: bool = True
