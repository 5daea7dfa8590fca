"""Speaking to an upstream that serves the Responses API (``api = "responses"``).

The relay's pipeline carries chat-completion chunks, so this module
translates both ways, with no I/O: a chat request becomes a ``POST
/responses`` body, and the upstream's streamed events become chunks:

======================================  ============================================
the upstream's event                    chunk
======================================  ============================================
``response.created``                    the envelope (id, model, created) and a
                                        role-only delta
``response.output_text.delta``          ``delta.content``
``response.reasoning_text.delta``,      ``delta.reasoning_content``
``response.reasoning_summary_text.delta``
a ``function_call`` item added          ``delta.tool_calls[i]`` with ``id``, ``name``
``response.function_call_arguments.     ``delta.tool_calls[i].function.arguments``
delta``
``response.completed``                  ``finish_reason`` (``stop``, or ``tool_calls``)
                                        and a usage chunk; the stream ends
``response.incomplete``                 ``finish_reason: "length"`` (or
                                        ``content_filter``) and usage; the end
``response.failed``, ``error``          an ``upstream_error`` with the upstream's message
======================================  ============================================
"""

from __future__ import annotations

from typing import Any

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, UpstreamError

__all__ = ["ResponsesStream", "responses_body"]

_PASSED = ("temperature", "top_p", "parallel_tool_calls", "service_tier", "user", "metadata",
           "simulate")


def responses_body(body: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /responses`` body for a chat request (``stream`` and ``store: false`` set)."""
    out: dict[str, Any] = {"model": body.get("model"), "stream": True, "store": False,
                           "input": _input(body.get("messages") or [])}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        out["max_output_tokens"] = limit
    for name in _PASSED:
        if body.get(name) is not None:
            out[name] = body[name]
    tools = body.get("tools")
    if isinstance(tools, list):
        out["tools"] = [{"type": "function", **tool["function"]} for tool in tools
                        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out["tool_choice"] = {"type": "function", "name": choice["function"].get("name")}
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["text"] = {"format": {"type": "json_object"}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["text"] = {"format": {"type": "json_schema", **(fmt.get("json_schema") or {})}}
    if body.get("reasoning_effort") is not None:
        out["reasoning"] = {"effort": body["reasoning_effort"]}
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _input(messages: list[Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"),
                          "output": _text(message.get("content"))})
            continue
        text = _text(message.get("content"))
        if text or not message.get("tool_calls"):
            items.append({"type": "message", "role": role, "content": text})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            items.append({"type": "function_call", "call_id": call.get("id"),
                          "name": function.get("name"), "arguments": function.get("arguments")})
    return items


class ResponsesStream:
    """The chunks one Responses API stream's events make, in order.

    Args:
        upstream: the upstream's name, for error messages.
    """

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._envelope: dict[str, Any] = {"object": "chat.completion.chunk"}
        self._calls: dict[str, int] = {}  # function_call item id -> tool call index
        self.ended = False

    def event(self, kind: str, data: dict[str, Any]) -> list[Chunk]:
        """The chunks of one event (often one); raises ``UpstreamError`` for a failure."""
        if kind == "response.output_text.delta":
            text = data.get("delta", "")
            chunk = self._delta({"content": text})
            if type(text) is str:
                chunk.text = text  # as the chat decoder marks a text chunk
            return [chunk]
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            return [self._delta({"reasoning_content": data.get("delta", "")})]
        if kind == "response.function_call_arguments.delta":
            index = self._calls.get(str(data.get("item_id")), 0)
            return [self._delta({"tool_calls": [
                {"index": index, "function": {"arguments": data.get("delta", "")}}]})]
        if kind == "response.output_item.added":
            item = data.get("item") or {}
            if item.get("type") == "function_call":
                index = self._calls[str(item.get("id"))] = len(self._calls)
                return [self._delta({"tool_calls": [{
                    "index": index, "id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": ""}}]})]
            return []
        if kind == "response.created":
            response = data.get("response") or {}
            self._envelope.update({"id": response.get("id"), "model": response.get("model"),
                                   "created": response.get("created_at")})
            return [self._delta({"role": "assistant", "content": ""})]
        if kind in ("response.completed", "response.incomplete"):
            self.ended = True
            response = data.get("response") or {}
            reason = "tool_calls" if self._calls else "stop"
            if kind == "response.incomplete":
                details = response.get("incomplete_details") or {}
                reason = "length" if details.get("reason") == "max_output_tokens" else (
                    "content_filter")
            chunks = [Chunk({**self._envelope, "choices": [
                {"index": 0, "delta": {}, "finish_reason": reason}]})]
            usage = response.get("usage")
            if isinstance(usage, dict):
                prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
                if isinstance(prompt, int) and isinstance(completion, int):
                    chunks.append(Chunk({**self._envelope, "choices": [], "usage": {
                        "prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion}}))
            return chunks
        if kind in ("response.failed", "error"):
            error = (data.get("response") or {}).get("error") if kind != "error" else data
            message = error.get("message") if isinstance(error, dict) else None
            raise UpstreamError(
                f"upstream {self._upstream!r} reported an error mid-stream:"
                f" {message or kind}", code=ErrorCode.UPSTREAM_ERROR, retryable=True)
        return []

    def _delta(self, delta: dict[str, Any]) -> Chunk:
        return Chunk({**self._envelope,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
