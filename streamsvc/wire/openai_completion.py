"""OpenAI's non-streamed answer: the ``chat.completion`` object, assembled from the chunks.

A non-streamed request runs the same pipeline as a streamed one (retries,
fallbacks, timeouts, metrics); its chunks are collected here into the object
OpenAI would have sent: one message per choice with the text fields
concatenated, tool calls assembled by index, the finish reason and the usage.
The envelope (``id``, ``created``, ``model``, ``system_fingerprint``) is the
upstream's, from its first chunk.
"""

from __future__ import annotations

from typing import Any

from streamsvc.chunks import TEXT_FIELDS, Chunk

__all__ = ["CompletionBuilder"]

_ENVELOPE = ("id", "created", "model", "system_fingerprint", "service_tier")


class _Choice:
    __slots__ = ("calls", "extra", "finish_reason", "logprobs", "role", "texts")

    def __init__(self) -> None:
        self.role = "assistant"
        self.texts: dict[str, list[str]] = {}
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: Any = None
        self.logprobs: list[Any] | None = None
        self.extra: dict[str, Any] = {}

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if value is None:
                    continue
                if key == "role" and isinstance(value, str):
                    self.role = value
                elif key in TEXT_FIELDS and isinstance(value, str):
                    self.texts.setdefault(key, []).append(value)
                elif key == "tool_calls" and isinstance(value, list):
                    for call in value:
                        if isinstance(call, dict):
                            self._add_call(call)
                elif key != "function_call":
                    self.extra[key] = value
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs = (self.logprobs or []) + logprobs["content"]

    def _add_call(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        into = self.calls.setdefault(index if isinstance(index, int) else 0, {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""},
        })
        for key in ("id", "type"):
            if isinstance(call.get(key), str):
                into[key] = call[key]
        function = call.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    into["function"][key] += function[key]

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role}
        text = self.texts.pop("content", None)
        message["content"] = "".join(text) if text is not None else None
        for key, parts in self.texts.items():
            message[key] = "".join(parts)
        message.setdefault("refusal", None)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        message.update(self.extra)
        return message


class CompletionBuilder:
    """Collects one answer's chunks; :meth:`result` is the ``chat.completion``."""

    __slots__ = ("_choices", "_envelope", "_usage")

    def __init__(self) -> None:
        self._envelope: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None

    def add(self, chunk: Chunk) -> None:
        data = chunk.data
        if self._envelope is None:
            self._envelope = {k: data[k] for k in _ENVELOPE if k in data}
        usage = chunk.usage
        if usage is not None:
            self._usage = usage
        for choice in chunk.choices:
            index = choice.get("index", 0)
            self._choices.setdefault(index, _Choice()).add(choice)

    def result(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"object": "chat.completion", **(self._envelope or {})}
        answer["choices"] = [
            {"index": index, "message": choice.message(), "logprobs":
             None if choice.logprobs is None else {"content": choice.logprobs},
             "finish_reason": choice.finish_reason}
            for index, choice in sorted(self._choices.items())
        ]
        answer["usage"] = self._usage
        return answer
