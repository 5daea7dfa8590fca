"""The chat request as the simulator reads it: :func:`parse_chat_request`, pure.

Besides OpenAI's fields it reads its own, ``simulate`` (see
:mod:`streamsvc.simulator`), and bounds ``n`` and the token counts so that
one request cannot ask for an answer it could not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from streamsvc.errors import ClientError
from streamsvc.simulator.faults import Fault
from streamsvc.simulator.text import DEFAULT_TOKENS, MAX_TOKENS, words_in

__all__ = ["MAX_N", "ChatParams", "SimulateOptions", "parse_chat_request"]

MAX_N = 128

_FAULTS = frozenset(fault.value for fault in Fault)


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulateOptions:
    """The ``simulate`` body field, validated; see :mod:`streamsvc.simulator`."""

    rate: float = 0.0
    first_token_delay: float = 0.0
    tokens: int = DEFAULT_TOKENS
    fault: Fault | None = None
    fault_at: int = 0
    retry_after: float = 1.0
    fail_times: int = 0
    key: str = ""

    @classmethod
    def from_json(cls, raw: object) -> SimulateOptions:
        """Validate the raw field; raises :class:`ClientError` naming the bad key."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise _bad("simulate must be an object", "simulate", raw)
        unknown = sorted(set(raw) - _SIMULATE_KEYS)
        if unknown:
            known = ", ".join(sorted(_SIMULATE_KEYS))
            raise ClientError(
                f"simulate.{unknown[0]} is not a simulator option (known: {known})",
                param=f"simulate.{unknown[0]}",
            )
        key = raw.get("key", "")
        if not isinstance(key, str):
            raise _bad("simulate.key must be a string", "simulate.key", key)
        return cls(
            rate=_number(raw, "rate", 0.0),
            first_token_delay=_number(raw, "first_token_delay", 0.0),
            tokens=_integer(raw, "tokens", DEFAULT_TOKENS, maximum=MAX_TOKENS),
            fault=_fault(raw.get("fault")),
            fault_at=_integer(raw, "fault_at", 0, maximum=MAX_TOKENS),
            retry_after=_number(raw, "retry_after", 1.0),
            fail_times=_integer(raw, "fail_times", 0, maximum=MAX_TOKENS),
            key=key,
        )


_SIMULATE_KEYS = frozenset(
    ("rate", "first_token_delay", "tokens", "fault", "fault_at", "retry_after", "fail_times", "key")
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatParams:
    """What the simulator needs from a chat completion request."""

    model: str
    prompt: str  # the text of the last user message
    prompt_tokens: int
    stream: bool = False
    n: int = 1
    max_tokens: int | None = None
    include_usage: bool = False
    simulate: SimulateOptions = SimulateOptions()


def parse_chat_request(body: object) -> ChatParams:
    """Validate a chat completion body lightly, the way OpenAI would reject it.

    Raises:
        ClientError: with ``param`` naming the field, e.g. ``simulate.rate``.

    Example:
        >>> body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        >>> parse_chat_request(body).prompt
        'hi'
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model", model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages", messages)
    texts: list[str] = []
    prompt = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(
                "each message must be an object with a string role", f"messages[{i}]", message
            )
        text = _content_text(message.get("content"), f"messages[{i}].content")
        texts.append(text)
        if message["role"] == "user":
            prompt = text
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", stream)
    n = _integer(body, "n", 1, minimum=1, maximum=MAX_N, prefix="")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            max_tokens = _integer(body, name, 0, minimum=1, maximum=MAX_TOKENS, prefix="")
            break
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad("stream_options must be an object", "stream_options", stream_options)
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad(
                "stream_options.include_usage must be a boolean",
                "stream_options.include_usage",
                include_usage,
            )
    return ChatParams(
        model=model,
        prompt=prompt,
        prompt_tokens=sum(words_in(text) for text in texts),
        stream=stream,
        n=n,
        max_tokens=max_tokens,
        include_usage=include_usage,
        simulate=SimulateOptions.from_json(body.get("simulate")),
    )


def _content_text(content: object, param: str) -> str:
    # OpenAI allows a string, a list of parts, or null (assistant tool calls).
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    raise _bad("content must be a string, a list of parts or null", param, content)


def _bad(message: str, param: str | None, got: object) -> ClientError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ClientError(f"{message}, got {shown}", param=param)


def _number(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"simulate.{name} must be a number", f"simulate.{name}", value)
    if value < 0:
        raise _bad(f"simulate.{name} must be a number >= 0", f"simulate.{name}", value)
    return float(value)


def _integer(
    raw: dict[str, Any],
    name: str,
    default: int,
    *,
    minimum: int = 0,
    maximum: int,
    prefix: str = "simulate.",
) -> int:
    value = raw.get(name, default)
    if value is None and not prefix:
        value = default
    param = f"{prefix}{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{param} must be an integer", param, value)
    if not minimum <= value <= maximum:
        raise _bad(f"{param} must be an integer from {minimum} to {maximum}", param, value)
    return value


def _fault(value: object) -> Fault | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # "fault": 429 is read as "429"
    if isinstance(value, str) and value in _FAULTS:
        return Fault(value)
    known = ", ".join(f.value for f in Fault)
    raise _bad(f"simulate.fault must be one of {known}", "simulate.fault", value)
