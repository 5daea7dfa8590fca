"""The chat request as the simulator reads it: :func:`parse_chat_request`, pure.

OpenAI's fields are checked by :mod:`streamsvc.validation`, the same code
the relay checks its requests with, so both reject a body alike and name
the same field. The simulator adds its own field, ``simulate`` (see
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
from streamsvc.validation import chat_fields, content_text, integer_field

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
            tokens=_integer(raw, "tokens", DEFAULT_TOKENS),
            fault=_fault(raw.get("fault")),
            fault_at=_integer(raw, "fault_at", 0),
            retry_after=_number(raw, "retry_after", 1.0),
            fail_times=_integer(raw, "fail_times", 0),
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
    continues: str | None = None  # the last message's text when it is the assistant's


def parse_chat_request(body: Any) -> ChatParams:
    """Validate a decoded chat completion body the way the relay does, plus the simulator's own.

    OpenAI's fields go through :func:`streamsvc.validation.chat_fields`, the
    checks ``POST /v1/chat/completions`` of the relay makes; on top of them
    come ``simulate`` and the simulator's bounds on ``n`` and the token counts.

    Raises:
        ClientError: with ``param`` naming the field, e.g. ``simulate.rate``.

    Example:
        >>> body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        >>> parse_chat_request(body).prompt
        'hi'
    """
    fields = chat_fields(body)
    texts: list[str] = []
    prompt = ""
    for message in fields.messages:
        text = content_text(message.get("content"))
        texts.append(text)
        if message["role"] == "user":
            prompt = text
    last = fields.messages[-1]
    continues = content_text(last.get("content")) if last["role"] == "assistant" else None
    # The simulator's own bounds: an answer it can hold in memory.
    n = integer_field(body, "n", minimum=1, maximum=MAX_N)
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        max_tokens = integer_field(body, name, minimum=1, maximum=MAX_TOKENS)
        if max_tokens is not None:
            break
    return ChatParams(
        model=fields.model,
        prompt=prompt,
        prompt_tokens=sum(words_in(text) for text in texts),
        stream=fields.stream,
        n=1 if n is None else n,
        max_tokens=max_tokens,
        include_usage=fields.include_usage,
        simulate=SimulateOptions.from_json(body.get("simulate")),
        continues=continues,
    )


# The checks of the ``simulate`` options keep their own wording, "simulate.rate
# must be a number, got 'fast'": test suites match on it. Unlike OpenAI's
# fields, an option that is null is wrong, not absent.


def _bad(message: str, param: str, got: object) -> ClientError:
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


def _integer(raw: dict[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    param = f"simulate.{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{param} must be an integer", param, value)
    if not 0 <= value <= MAX_TOKENS:
        raise _bad(f"{param} must be an integer from 0 to {MAX_TOKENS}", param, value)
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
