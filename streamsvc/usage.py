"""Token usage of one answer: the upstream's own count, or an estimate when it sent none.

An upstream reports usage at the end of a stream (``stream_options.include_usage``,
which streamsvc always asks for) or in a non-streamed answer. A stream that
ends before that chunk (the client left, an error, a timeout, an upstream
that never sends usage) still cost tokens; those are estimated:

* prompt tokens: ``ceil(characters / 4)`` per message, summed, so at least 1
  per non-empty message. Counted when the request comes in; only the number
  is kept, never the text.
* completion tokens: ``ceil(characters / 4)`` of the text relayed (content,
  reasoning, refusal and tool call names and arguments, every choice). A
  non-streamed answer is metered the same way: it is the streamed pipeline, collected.

Four characters a token is the usual rule of thumb for English with OpenAI's
tokenizers; it is an estimate for dashboards and alerts, not for invoices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from streamsvc.chunks import TEXT_FIELDS, Chunk

__all__ = [
    "CHARS_PER_TOKEN", "Usage", "UsageMeter", "estimate_prompt_tokens",
    "estimate_tokens", "reported_usage",
]

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text: ``ceil(chars / 4)`` (0 for no text)."""
    return -(-chars // CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Any) -> int:
    """The estimated prompt tokens of a chat request's ``messages``.

    Example:
        >>> estimate_prompt_tokens([{"role": "user", "content": "hello there"}])
        3
    """
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        if isinstance(message, dict):
            total += estimate_tokens(_message_chars(message))
    return total


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens one answer is counted for; ``estimated`` when the upstream gave no count."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool


def reported_usage(usage: Any) -> Usage | None:
    """An upstream ``usage`` object as :class:`Usage`; None when it lacks the two counts."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if _count(prompt) and _count(completion):
        return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=False)
    return None


class UsageMeter:
    """Watches the chunks of one streamed answer as they are relayed.

    It keeps the last ``usage`` the upstream sent and the number of text
    characters seen, so :meth:`result` can estimate when no usage came.
    """

    __slots__ = ("carried", "chars", "extra_prompt", "reported")

    def __init__(self) -> None:
        self.chars = 0
        self.reported: dict[str, Any] | None = None
        self.carried: Usage | None = None
        """What the attempts before a continuation used (``seam``)."""
        self.extra_prompt = 0
        """Prompt tokens a continuation adds: the delivered text it is sent back."""

    def add(self, chunk: Chunk) -> None:
        """A chunk was relayed (journaled, or handed to the client's socket)."""
        text = chunk.text
        if text is not None:  # nearly every chunk: text alone, no usage
            self.chars += len(text)
            return
        data = chunk.data
        choices = data.get("choices")
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.reported = usage  # cumulative where sent on every chunk: the last wins
        if type(choices) is not list:
            return
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    self.chars += _message_chars(delta)

    def seam(self, prompt_tokens: int) -> None:
        """The answer goes on from another attempt (continuation): both attempts count.

        What this attempt used is carried; the next one's prompt is the original
        one plus the text delivered so far, which it is sent back.
        """
        delivered = self.chars
        self.carried = self.result(prompt_tokens)
        self.extra_prompt += estimate_tokens(delivered)
        self.chars = 0
        self.reported = None

    def result(self, prompt_tokens: int) -> Usage:
        """The upstream's usage if it sent one, else the estimate (``prompt_tokens`` estimated);
        with the attempts before a continuation added."""
        usage = reported_usage(self.reported) or Usage(
            prompt_tokens=prompt_tokens + self.extra_prompt,
            completion_tokens=estimate_tokens(self.chars), estimated=True)
        carried = self.carried
        if carried is None:
            return usage
        return Usage(prompt_tokens=carried.prompt_tokens + usage.prompt_tokens,
                     completion_tokens=carried.completion_tokens + usage.completion_tokens,
                     estimated=carried.estimated or usage.estimated)


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0  # not a bool, not negative


def _message_chars(message: dict[str, Any]) -> int:
    """Characters of text in a message or a delta: text fields, text parts, tool calls."""
    chars = 0
    for field in TEXT_FIELDS:
        chars += _text_chars(message.get(field))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                chars += _call_chars(call.get("function"))
    chars += _call_chars(message.get("function_call"))
    return chars


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):  # content parts: only text parts count
        return sum(
            len(part["text"]) for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _call_chars(function: Any) -> int:
    if not isinstance(function, dict):
        return 0
    return sum(len(v) for k in ("name", "arguments") if isinstance(v := function.get(k), str))
