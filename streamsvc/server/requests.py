"""Validation of incoming chat requests: typed results, errors that name the field.

The fields OpenAI defines are checked by :mod:`streamsvc.validation` (the
simulator checks its requests with the same code); this module adds the
request forms (JSON body, the one-shot GET query), streamsvc's own options
and ``Last-Event-ID``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from streamsvc.chat_request import ChatRequest
from streamsvc.validation import bad_field, chat_fields, check_type, decode_json

__all__ = ["parse_chat_body", "parse_chat_query", "parse_last_event_id"]

# streamsvc's own request options; removed before the body goes upstream.
OWN_FIELD = "streamsvc"
_STREAM_ID = re.compile(r"st_[0-9a-f]{24}")
# Numbers in a query: decimal, in ASCII digits. int() and float() alone would
# also take "٣", "１", "1_000", " 3 ", "nan" and "inf".
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_DIGITS = 18  # a 64-bit integer; int() of thousands of digits raises ValueError


def own_options(body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """streamsvc's own options (``{"streamsvc": {"retries": false}}``): whether retries are on,
    and the body without them."""
    own = body.get(OWN_FIELD)
    if own is None:
        return True, body
    check_type(own, dict, OWN_FIELD, "an object")
    unknown = set(own) - {"retries"}
    if unknown:
        raise bad_field("unknown option", f"{OWN_FIELD}.{min(unknown)}")
    retries = own.get("retries", True)
    check_type(retries, bool, f"{OWN_FIELD}.retries", "a boolean")
    return retries, {k: v for k, v in body.items() if k != OWN_FIELD}


def validate_chat(body: Any, *, stream_default: bool = False) -> ChatRequest:
    """Check a decoded request body; returns the request with the upstream body split out."""
    fields = chat_fields(body, stream_default=stream_default)
    retries, body = own_options(body)
    return ChatRequest(
        body=body,
        model=fields.model,
        stream=fields.stream,
        include_usage=fields.include_usage,
        retries=retries,
    )


def decode_body(raw: bytes) -> Any:
    """A request's JSON body, decoded; an empty or bad one is a 400 naming ``body``."""
    if not raw.strip():
        raise bad_field("expected a JSON object, got an empty body", "body")
    return decode_json(raw, "body")


def parse_chat_body(raw: bytes, *, stream_default: bool = False) -> ChatRequest:
    """Decode and check a JSON request body."""
    return validate_chat(decode_body(raw), stream_default=stream_default)


def _json_param(query: Mapping[str, str], name: str) -> Any:
    return decode_json(query[name], name)


def _query_number(query: Mapping[str, str], name: str, integer: bool) -> int | float:
    text = query[name]
    if integer:
        if _INTEGER.fullmatch(text) and len(text) <= _MAX_DIGITS:
            return int(text)
        raise bad_field(f"expected an integer of at most {_MAX_DIGITS} digits,"
                        f" got {text[:40]!r}", name)
    if not _NUMBER.fullmatch(text):
        raise bad_field(f"expected a number, got {text[:40]!r}", name)
    number = float(text)
    if not math.isfinite(number):
        raise bad_field(f"expected a finite number, got {text[:40]!r}", name)
    return number


def parse_chat_query(query: Mapping[str, str], *, default_model: str = "") -> ChatRequest:
    """The one-shot GET form: ``q`` (or ``messages`` as JSON), ``model`` and a few options.

    ``extra`` takes a JSON object of further body fields (for example the
    simulator's ``simulate``).
    """
    body: dict[str, Any] = {}
    if "extra" in query:
        extra = _json_param(query, "extra")
        check_type(extra, dict, "extra", "a JSON object")
        body.update(extra)
    if "messages" in query:
        body["messages"] = _json_param(query, "messages")
    elif "q" in query:
        if not query["q"]:
            raise bad_field("expected the user's message, got an empty string", "q")
        body["messages"] = [{"role": "user", "content": query["q"]}]
    else:
        raise bad_field("expected the user's message in q (or messages as JSON)", "q")
    model = query.get("model") or default_model
    if not model:
        raise bad_field("expected a model name (see GET /v1/models)", "model")
    body["model"] = model
    for name, integer in (("max_tokens", True), ("n", True), ("temperature", False),
                          ("top_p", False)):
        if name in query:
            body[name] = _query_number(query, name, integer)
    body["stream"] = True
    return validate_chat(body, stream_default=True)


def parse_last_event_id(value: str | None, param: str = "Last-Event-ID") -> tuple[str, int] | None:
    """``"<stream_id>:<seq>"`` -> (stream_id, seq); None when absent or empty."""
    if value is None or value == "":
        return None
    stream_id, sep, seq = value.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣".
    if (not sep or not _STREAM_ID.fullmatch(stream_id) or not seq.isascii()
            or not seq.isdigit() or len(seq) > 12):
        raise bad_field(f"expected '<stream id>:<seq>' as sent in an event id, got {value[:80]!r}", param)
    return stream_id, int(seq)


def is_stream_id(value: str) -> bool:
    return _STREAM_ID.fullmatch(value) is not None
