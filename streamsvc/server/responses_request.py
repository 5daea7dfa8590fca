"""A Responses API request (``POST /v1/responses``), checked and translated to a chat request.

Most upstreams speak only chat completions, so the request becomes one:

==============================  ===============================================================
Responses API field             chat completions
==============================  ===============================================================
``instructions``                a leading ``system`` message (not carried over by
                                ``previous_response_id``, as OpenAI does)
``input`` (a string)            one ``user`` message
``input`` message items         messages in order (roles ``system``, ``developer``, ``user``,
                                ``assistant``); ``input_text`` / ``output_text`` parts become
                                plain text
``function_call`` items         an ``assistant`` message with ``tool_calls``
``function_call_output`` items  a ``tool`` message (``tool_call_id`` = ``call_id``)
``max_output_tokens``           ``max_tokens``
``temperature``, ``top_p``      the same
``tools`` (function tools)      ``tools`` (``{"type": "function", "function": {...}}``)
``tool_choice``                 ``tool_choice`` (a named function as chat names it)
``text.format``                 ``response_format`` (``json_schema``, ``json_object``)
``reasoning.effort``            ``reasoning_effort``
``parallel_tool_calls``,        the same
``service_tier``, ``user``
==============================  ===============================================================

``previous_response_id`` is resolved by the route from the journal. Kept
only in the response object: ``metadata``, ``store``, ``background``.
Accepted and ignored: ``include``, ``truncation``, ``stream_options``,
``prompt_cache_key``, ``safety_identifier``. Anything else, built-in tools
(``web_search``, ``file_search``, ...) and input items of other types are a
400 naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from streamsvc.chat_request import ChatRequest
from streamsvc.server.requests import OWN_FIELD, decode_body, own_options
from streamsvc.validation import bad_field, check_type, integer_field, kind_of, number_field

__all__ = ["ResponsesRequest", "is_response_id", "parse_responses_body"]

_ROLES = ("system", "developer", "user", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
_PASSED = ("temperature", "top_p", "parallel_tool_calls", "service_tier", "user")
_IGNORED = ("include", "truncation", "stream_options", "prompt_cache_key", "safety_identifier")
_KEPT = ("metadata", "store", "background", "previous_response_id", "instructions", "stream",
         "model", "input", "max_output_tokens", "tools", "tool_choice", "text", "reasoning")
# The simulator's own request field and streamsvc's options pass through, as on every endpoint.
_OWN = ("simulate", OWN_FIELD)
_KNOWN = frozenset(_KEPT + _PASSED + _IGNORED + _OWN)
_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{24}")


def is_response_id(value: str) -> bool:
    """Whether ``value`` has the form of the ids streamsvc gives responses."""
    return _RESPONSE_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponsesRequest:
    """A checked Responses API request.

    Attributes:
        chat: the chat request for the upstream (``messages`` without the
            previous response's turns, which the route prepends).
        input_messages: the chat messages of this request's ``input`` (kept, for a
            later ``previous_response_id``).
        instructions: the ``system`` message, if any.
        stream, background, store: as asked.
        previous_response_id: the response to continue, if any.
        echo: the request's fields the response object repeats.
    """

    chat: ChatRequest
    input_messages: list[dict[str, Any]]
    instructions: str | None
    stream: bool
    background: bool
    store: bool
    previous_response_id: str | None
    echo: dict[str, Any] = field(default_factory=dict)

    def with_history(self, history: list[dict[str, Any]]) -> ChatRequest:
        """The chat request with earlier turns (``previous_response_id``) before this input."""
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions
                    else []) + history + self.input_messages
        body = {**self.chat.body, "messages": messages}
        return ChatRequest(body=body, model=self.chat.model, stream=True, include_usage=True,
                           retries=self.chat.retries)


def parse_responses_body(raw: bytes) -> ResponsesRequest:
    """Decode, check and translate a ``POST /v1/responses`` body."""
    body = decode_body(raw)
    if not isinstance(body, dict):
        raise bad_field(f"expected a JSON object, got {kind_of(body)}", "body")
    for name in body:
        if name not in _KNOWN:
            raise bad_field("not supported by streamsvc's Responses API", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field(f"expected a non-empty string, got {kind_of(model)}", "model")
    flags = {}
    for name, default in (("stream", False), ("background", False), ("store", True)):
        value = body.get(name, default)
        value = default if value is None else value
        check_type(value, bool, name, "a boolean")
        flags[name] = value
    instructions = body.get("instructions")
    if instructions is not None:
        check_type(instructions, str, "instructions", "a string")
    previous = body.get("previous_response_id")
    if previous is not None:
        check_type(previous, str, "previous_response_id", "a string")
        if not is_response_id(previous):
            raise bad_field(f"{previous[:80]!r} is not a response id", "previous_response_id")
    metadata = body.get("metadata")
    if metadata is not None:
        check_type(metadata, dict, "metadata", "an object")
        for key, value in metadata.items():
            check_type(value, str, f"metadata.{key}", "a string")

    chat: dict[str, Any] = {"model": model, "stream": True}
    integer_field(body, "max_output_tokens", minimum=1)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p"):
        number_field(body, name, minimum=0)
    for name in _PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    chat.update(_text_format(body.get("text")))
    reasoning = body.get("reasoning")
    if reasoning is not None:
        check_type(reasoning, dict, "reasoning", "an object")
        if reasoning.get("effort") is not None:
            check_type(reasoning["effort"], str, "reasoning.effort", "a string")
            chat["reasoning_effort"] = reasoning["effort"]
    if "simulate" in body:
        chat["simulate"] = body["simulate"]
    retries, _ = own_options(body)
    input_messages = _input(body.get("input"))
    if not input_messages and previous is None:
        raise bad_field("expected a string or a non-empty array of input items", "input")
    chat["messages"] = input_messages
    echo = {
        "model": model,
        "instructions": instructions,
        "metadata": metadata or {},
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": previous,
        "text": body.get("text") or {"format": {"type": "text"}},
        "background": flags["background"],
        "store": flags["store"],
    }
    return ResponsesRequest(
        chat=ChatRequest(body=chat, model=model, stream=True, include_usage=True,
                         retries=retries),
        input_messages=input_messages, instructions=instructions, stream=flags["stream"],
        background=flags["background"], store=flags["store"], previous_response_id=previous,
        echo=echo,
    )


def _input(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    check_type(value, list, "input", "a string or an array of input items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        check_type(item, dict, where, "an input item object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_field(f"expected one of {', '.join(_ROLES)}, got {role!r}"[:200],
                                f"{where}.role")
            messages.append({"role": role,
                             "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                check_type(item.get(name), str, f"{where}.{name}", "a string")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls of one turn: one message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            check_type(item.get("call_id"), str, f"{where}.call_id", "a string")
            output = item.get("output")
            check_type(output, (str, list), f"{where}.output", "a string or content parts")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _content(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier reasoning: chat upstreams take none back
        else:
            raise bad_field(f"input items of type {str(kind)[:40]!r} are not supported (message,"
                            " function_call, function_call_output)", f"{where}.type")
    return messages


def _content(value: Any, param: str) -> str:
    """A message's content as plain text: a string, or text parts joined."""
    if isinstance(value, str):
        return value
    check_type(value, list, param, "a string or an array of content parts")
    texts = []
    for j, part in enumerate(value):
        check_type(part, dict, f"{param}[{j}]", "a content part object")
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise bad_field(f"content parts of type {str(kind)[:40]!r} are not supported"
                            " (input_text, output_text)", f"{param}[{j}].type")
        check_type(part.get("text"), str, f"{param}[{j}].text", "a string")
        texts.append(part["text"])
    return "".join(texts)


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    check_type(value, list, "tools", "an array of tools")
    tools = []
    for i, tool in enumerate(value):
        check_type(tool, dict, f"tools[{i}]", "a tool object")
        if tool.get("type") != "function":
            raise bad_field(f"tools of type {str(tool.get('type'))[:40]!r} are not supported:"
                            " streamsvc relays function tools only", f"tools[{i}].type")
        check_type(tool.get("name"), str, f"tools[{i}].name", "a string")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise bad_field(f"expected auto, none, required or a function, got {value[:40]!r}",
                            "tool_choice")
        return value
    check_type(value, dict, "tool_choice", "a string or an object")
    if value.get("type") != "function" or not isinstance(value.get("name"), str):
        raise bad_field('expected {"type": "function", "name": ...}', "tool_choice")
    return {"type": "function", "function": {"name": value["name"]}}


def _text_format(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    check_type(value, dict, "text", "an object")
    fmt = value.get("format")
    if fmt is None:
        return {}
    check_type(fmt, dict, "text.format", "an object")
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise bad_field(f"expected text, json_object or json_schema, got {kind!r}"[:120],
                    "text.format.type")
