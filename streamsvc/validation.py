"""Checks of an OpenAI chat completion body, shared by the relay and the simulator.

Pure functions on the decoded JSON, no I/O and no app state, so that both
``streamsvc.server.requests`` and ``streamsvc.simulator`` can call them. Each
check raises :class:`ClientError` (``bad_request``) with ``param`` set to the
field's path, and a message that starts with that path and says what was
expected and what came::

    messages[1].content: expected a string or an array of parts, got a number

The kind of a wrong value is named, never the value itself: a message or an
error log line must not repeat the prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from streamsvc.errors import ClientError, ErrorCode

__all__ = [
    "MAX_JSON_DEPTH",
    "ChatFields",
    "bad_field",
    "chat_fields",
    "check_type",
    "content_text",
    "decode_json",
    "integer_field",
    "kind_of",
    "number_field",
]

# The deepest nesting of arrays and objects a request may hold. A chat body
# needs a few levels (tool schemas a few dozen); a deeper one is refused
# before anything walks it, so no later step can run out of stack.
MAX_JSON_DEPTH = 128

# Roles whose content may not be null (an assistant message with tool calls may).
_CONTENT_REQUIRED = frozenset({"user", "system", "developer"})
_KINDS: dict[type, str] = {
    bool: "a boolean", int: "a number", float: "a number", str: "a string",
    list: "an array", dict: "an object",
}


def bad_field(message: str, param: str) -> ClientError:
    """The error for one field: ``"{param}: {message}"``, with ``param`` named."""
    return ClientError(f"{param}: {message}", code=ErrorCode.BAD_REQUEST, param=param)


def kind_of(value: Any) -> str:
    """What a JSON value is, as an error message says it: ``"a string"``, ``"null"``."""
    if value is None:
        return "null"
    return _KINDS.get(type(value), type(value).__name__)


def check_type(value: Any, kinds: type | tuple[type, ...], param: str, what: str) -> None:
    """Raise unless ``value`` is one of ``kinds``; a boolean is never taken for a number."""
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise bad_field(f"expected {what}, got a boolean", param)
    if not isinstance(value, kinds):
        raise bad_field(f"expected {what}, got {kind_of(value)}", param)


def decode_json(raw: bytes | str, param: str) -> Any:
    """Decode JSON from a client: any failure is a ``bad_request`` naming ``param``.

    Nesting deeper than :data:`MAX_JSON_DEPTH` is refused, and a number too
    large for a float (``1e999``) is named by its path, like any wrong field.

    Example:
        >>> decode_json(b'{"n": 1}', "body")
        {'n': 1}
    """
    try:
        value = msgspec.json.decode(raw)
    except RecursionError:
        raise bad_field(_TOO_DEEP, param) from None
    except msgspec.DecodeError as exc:
        # msgspec names no key in its path ("$[...]"): find the number again.
        where = _out_of_range(raw, param) if "out of range" in str(exc) else None
        if where is not None:
            raise bad_field("expected a finite number, got one out of range", where) from exc
        raise bad_field(f"invalid JSON: {exc}", param) from exc
    if isinstance(raw, str):
        raw = raw.encode()
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # else it cannot be that deep
        _check_depth(value, param)
    return value


_TOO_DEEP = f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep, got deeper"


def _check_depth(value: Any, param: str) -> None:
    # A loop over a stack, not a recursion: the value may be ~1,000 levels deep.
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_field(_TOO_DEEP, param)
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values()
                         if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))


def _out_of_range(raw: bytes | str, param: str) -> str | None:
    """The path of the first number that is not finite once decoded (``temperature``)."""
    try:
        value = json.loads(raw)  # the stdlib reads 1e999 as inf, where msgspec refuses it
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, str]] = [(value, "" if param == "body" else param)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return path or param
        if isinstance(node, dict):
            stack.extend((child, f"{path}.{key}" if path else str(key))
                         for key, child in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(node))))
    return None


def _validate_messages(value: Any) -> list[dict[str, Any]]:
    check_type(value, list, "messages", "a non-empty array of messages")
    messages: list[dict[str, Any]] = value
    if not messages:
        raise bad_field("expected a non-empty array of messages, got an empty array", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        check_type(message, dict, where, "a message object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad_field(f"expected a non-empty string, got {kind_of(role)}", f"{where}.role")
        content = message.get("content")
        if content is not None:
            check_type(content, (str, list), f"{where}.content", "a string or an array of parts")
        elif role in _CONTENT_REQUIRED:
            raise bad_field("expected a string or an array of parts, got null", f"{where}.content")
    return messages


def content_text(content: str | list[Any] | None) -> str:
    """The text of a checked message's content: the string, or its text parts joined.

    Example:
        >>> content_text([{"type": "text", "text": "a"}, {"type": "image_url"}, "b"])
        'a'
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )


def _number(
    body: Mapping[str, Any],
    name: str,
    kinds: tuple[type, ...],
    what: str,
    minimum: float,
    maximum: float | None,
) -> Any:
    value = body.get(name)
    if value is None:  # absent and null both mean "the default"
        return None
    check_type(value, kinds, name, what)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_field(f"expected a finite number, got {value}", name)
    if value < minimum:
        raise bad_field(f"expected at least {minimum:g}, got {value}", name)
    if maximum is not None and value > maximum:
        raise bad_field(f"expected at most {maximum:g}, got {value}", name)
    return value


def integer_field(
    body: Mapping[str, Any], name: str, *, minimum: int, maximum: int | None = None
) -> int | None:
    """``body[name]`` as an integer in range; None when absent or null."""
    value: int | None = _number(body, name, (int,), "an integer", minimum, maximum)
    return value


def number_field(
    body: Mapping[str, Any], name: str, *, minimum: float, maximum: float | None = None
) -> float | None:
    """``body[name]`` as a number in range; None when absent or null."""
    value = _number(body, name, (int, float), "a number", minimum, maximum)
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatFields:
    """The fields every reader of a chat body needs, checked.

    Attributes:
        model: the requested model, a non-empty string.
        messages: the message objects, each with a role and a string, parts or null content.
        stream: whether a stream was asked for.
        include_usage: ``stream_options.include_usage``.
    """

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool


def chat_fields(body: Any, *, stream_default: bool = False) -> ChatFields:
    """Check the fields OpenAI defines that streamsvc and the simulator read or pass on.

    ``model``, ``messages``, ``stream``, ``n``, ``max_tokens``,
    ``max_completion_tokens``, ``temperature``, ``top_p`` and ``stream_options``;
    other fields are left alone.

    Example:
        >>> chat_fields({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).stream
        False
    """
    if not isinstance(body, dict):
        raise bad_field(f"expected a JSON object, got {kind_of(body)}", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field(f"expected a non-empty string, got {kind_of(model)}", "model")
    messages = _validate_messages(body.get("messages"))
    stream = body.get("stream", stream_default)
    if stream is None:
        stream = stream_default
    check_type(stream, bool, "stream", "a boolean")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        integer_field(body, name, minimum=1)
    for name in ("temperature", "top_p"):
        number_field(body, name, minimum=0)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        check_type(options, dict, "stream_options", "an object")
        include_usage = options.get("include_usage", False)
        check_type(include_usage, bool, "stream_options.include_usage", "a boolean")
    return ChatFields(model=model, messages=messages, stream=stream, include_usage=include_usage)
