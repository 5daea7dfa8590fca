"""Validation of incoming chat requests: typed results, errors that name the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from streamsvc.errors import ClientError, ErrorCode

__all__ = ["ChatRequest", "parse_chat_body", "parse_chat_query", "parse_last_event_id"]

# streamsvc's own request options; removed before the body goes upstream.
OWN_FIELD = "streamsvc"
_STREAM_ID = re.compile(r"st_[0-9a-f]{24}")


def _bad(message: str, param: str) -> ClientError:
    return ClientError(f"{param}: {message}", code=ErrorCode.BAD_REQUEST, param=param)


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


def _check_type(value: Any, kinds: type | tuple[type, ...], param: str, what: str) -> None:
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _bad(f"expected {what}, got a boolean", param)
    if not isinstance(value, kinds):
        raise _bad(f"expected {what}, got {_kind(value)}", param)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)


def _validate_messages(messages: Any) -> None:
    _check_type(messages, list, "messages", "a non-empty array of messages")
    if not messages:
        raise _bad("expected a non-empty array of messages, got an empty array", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _check_type(message, dict, where, "a message object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"expected a non-empty string, got {_kind(role)}", f"{where}.role")
        content = message.get("content")
        if content is not None:
            _check_type(content, (str, list), f"{where}.content", "a string or an array of parts")
        elif role in ("user", "system", "developer"):
            raise _bad("expected a string or an array of parts, got null", f"{where}.content")


def _validate_number(body: Mapping[str, Any], name: str, *, integer: bool, minimum: float) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    _check_type(value, kinds, name, "an integer" if integer else "a number")
    if value < minimum:
        raise _bad(f"expected at least {minimum:g}, got {value}", name)


def validate_chat(body: Any, *, stream_default: bool = False) -> ChatRequest:
    """Check a decoded request body; returns the request with the upstream body split out."""
    if not isinstance(body, dict):
        raise _bad(f"expected a JSON object, got {_kind(body)}", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"expected a non-empty string, got {_kind(model)}", "model")
    _validate_messages(body.get("messages"))
    stream = body.get("stream", stream_default)
    if stream is None:
        stream = stream_default
    _check_type(stream, bool, "stream", "a boolean")
    _validate_number(body, "n", integer=True, minimum=1)
    _validate_number(body, "max_tokens", integer=True, minimum=1)
    _validate_number(body, "max_completion_tokens", integer=True, minimum=1)
    _validate_number(body, "temperature", integer=False, minimum=0)
    _validate_number(body, "top_p", integer=False, minimum=0)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        _check_type(options, dict, "stream_options", "an object")
        usage = options.get("include_usage", False)
        _check_type(usage, bool, "stream_options.include_usage", "a boolean")
        include_usage = usage
    retries = True
    own = body.get(OWN_FIELD)
    if own is not None:
        _check_type(own, dict, OWN_FIELD, "an object")
        unknown = set(own) - {"retries"}
        if unknown:
            raise _bad("unknown option", f"{OWN_FIELD}.{min(unknown)}")
        retries = own.get("retries", True)
        _check_type(retries, bool, f"{OWN_FIELD}.retries", "a boolean")
        body = {k: v for k, v in body.items() if k != OWN_FIELD}
    return ChatRequest(
        body=body, model=model, stream=stream, include_usage=include_usage, retries=retries
    )


def parse_chat_body(raw: bytes, *, stream_default: bool = False) -> ChatRequest:
    """Decode and check a JSON request body."""
    if not raw.strip():
        raise _bad("expected a JSON object, got an empty body", "body")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad(f"invalid JSON: {exc}", "body") from exc
    return validate_chat(body, stream_default=stream_default)


def _json_param(query: Mapping[str, str], name: str) -> Any:
    try:
        return msgspec.json.decode(query[name])
    except msgspec.DecodeError as exc:
        raise _bad(f"invalid JSON: {exc}", name) from exc


def parse_chat_query(query: Mapping[str, str], *, default_model: str = "") -> ChatRequest:
    """The one-shot GET form: ``q`` (or ``messages`` as JSON), ``model`` and a few options.

    ``extra`` takes a JSON object of further body fields (for example the
    simulator's ``simulate``).
    """
    body: dict[str, Any] = {}
    if "extra" in query:
        extra = _json_param(query, "extra")
        _check_type(extra, dict, "extra", "a JSON object")
        body.update(extra)
    if "messages" in query:
        body["messages"] = _json_param(query, "messages")
    elif "q" in query:
        if not query["q"]:
            raise _bad("expected the user's message, got an empty string", "q")
        body["messages"] = [{"role": "user", "content": query["q"]}]
    else:
        raise _bad("expected the user's message in q (or messages as JSON)", "q")
    model = query.get("model") or default_model
    if not model:
        raise _bad("expected a model name (see GET /v1/models)", "model")
    body["model"] = model
    for name, integer in (("max_tokens", True), ("n", True), ("temperature", False),
                          ("top_p", False)):
        if name in query:
            try:
                body[name] = int(query[name]) if integer else float(query[name])
            except ValueError as exc:
                kind = "an integer" if integer else "a number"
                raise _bad(f"expected {kind}, got {query[name]!r}", name) from exc
    body["stream"] = True
    return validate_chat(body, stream_default=True)


def parse_last_event_id(value: str | None, param: str = "Last-Event-ID") -> tuple[str, int] | None:
    """``"<stream_id>:<seq>"`` -> (stream_id, seq); None when absent or empty."""
    if value is None or value == "":
        return None
    stream_id, sep, seq = value.rpartition(":")
    if not sep or not _STREAM_ID.fullmatch(stream_id) or not seq.isdigit() or len(seq) > 12:
        raise _bad(f"expected '<stream id>:<seq>' as sent in an event id, got {value[:80]!r}", param)
    return stream_id, int(seq)


def is_stream_id(value: str) -> bool:
    return _STREAM_ID.fullmatch(value) is not None
