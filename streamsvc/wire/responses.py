"""The OpenAI Responses API's streamed events, made from chat-completion chunks.

Pure: it is told the chunks of one answer and how it ended, and gives back
the events OpenAI's API reference defines, each a ``(type, JSON data)`` pair
(a journal entry) whose data carries the same ``type`` and a
``sequence_number`` one more than the event before (from 0). Every output item is opened
(``response.output_item.added``, then its content part) before its deltas and
closed (its ``.done`` events) before the next item or the end, because the
SDKs' stream helpers fail without them:

==================================  ==================================================
chat-completion chunk               Responses API event
==================================  ==================================================
(the start)                         ``response.created``, ``response.in_progress``
``delta.content``                   a ``message`` item: ``response.output_text.delta``
``delta.reasoning_content``,        a ``reasoning`` item: ``response.reasoning_text.delta``
``delta.reasoning``
``delta.tool_calls[i]``             a ``function_call`` item:
                                    ``response.function_call_arguments.delta``
``finish_reason: "length"``         the end is ``response.incomplete``
                                    (``incomplete_details.reason: "max_output_tokens"``)
(the end)                           ``response.completed`` with the whole ``output``
                                    and ``usage``
(an error, a cancel)                ``response.failed`` (``status: "failed"`` or
                                    ``"cancelled"``, with ``error``)
==================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from streamsvc.chunks import Chunk
from streamsvc.errors import StreamsvcError
from streamsvc.usage import UsageMeter
from streamsvc.wire import Ending, Entries

__all__ = ["FINAL_TYPES", "ResponseEntries", "ResponseEvents", "usage_object"]

FINAL_TYPES = ("response.completed", "response.failed", "response.incomplete")

_encode = msgspec.json.encode
_DELTA_TYPES = {"message": "response.output_text.delta",
                "reasoning": "response.reasoning_text.delta"}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A Responses API ``usage`` object."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Item:
    """One output item being streamed: a message, a reasoning item or a function call."""

    __slots__ = ("call_id", "delta", "delta_type", "id", "index",
                 "kind", "name", "parts", "status")

    def __init__(self, kind: str, item_id: str, index: int) -> None:
        self.kind = kind  # "message" | "reasoning" | "function_call"
        self.id = item_id
        self.index = index
        self.parts: list[str] = []
        self.call_id = ""
        self.name = ""
        self.status = "in_progress"  # until closed: "completed" or "incomplete"
        # A text delta is most of a response's events: its JSON around the two values
        # that change is one template per item, filled with sequence_number and delta.
        self.delta_type = _DELTA_TYPES.get(kind, "")
        self.delta = (b'{"type":"%b","sequence_number":%%d,"item_id":%b,"output_index":%d'
                      b',"content_index":0,"delta":%%b%b}'
                      % (self.delta_type.encode(), _encode(item_id).replace(b"%", b"%%"), index,
                         b',"logprobs":[]' if kind == "message" else b""))

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def part(self) -> dict[str, Any]:
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def item(self) -> dict[str, Any]:
        status = self.status
        if self.kind == "function_call":
            return {"id": self.id, "type": "function_call", "status": status,
                    "call_id": self.call_id, "name": self.name, "arguments": self.text}
        if self.kind == "reasoning":
            return {"id": self.id, "type": "reasoning", "status": status, "summary": [],
                    "content": [self.part()] if status != "in_progress" else []}
        return {"id": self.id, "type": "message", "status": status, "role": "assistant",
                "content": [self.part()] if status != "in_progress" else []}


class ResponseEvents:
    """The events of one response, in order; nothing here does I/O.

    Args:
        response: the response object's fixed fields (``id``, ``created_at``,
            ``model``, ``instructions``, ``tools``, ``metadata``, ...), as the
            request set them; ``status``, ``output``, ``usage`` and ``error``
            are filled in here.
        prompt_tokens: the prompt's estimated tokens, for when the upstream sends no usage.
        meter: the stream's usage meter, which its generation counts each chunk into
            before this sees it (one count per chunk, continuations included); without
            one, this counts the chunks it is given itself.
    """

    def __init__(self, response: dict[str, Any], *, prompt_tokens: int,
                 meter: UsageMeter | None = None) -> None:
        self._response = response
        self._prompt_tokens = prompt_tokens
        self._seq = -1
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool-call index -> its item
        self._counts = meter is None
        self._meter = UsageMeter() if meter is None else meter
        self._length = False
        self.ended = False

    @property
    def id(self) -> str:
        return str(self._response["id"])

    @property
    def has_output(self) -> bool:
        """Whether any output item was begun."""
        return bool(self._items)

    def start(self) -> Entries:
        """``response.created`` and ``response.in_progress``."""
        snapshot = self.snapshot("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def chunk(self, chunk: Chunk) -> Entries:
        """The events one chunk makes (often one ``output_text.delta``)."""
        if self._counts:
            self._meter.add(chunk)
        text = chunk.text
        if text is not None:  # nearly every chunk: one text piece of choice 0
            if not text:
                return []
            item = self._open
            if item is not None and item.kind == "message":  # _delta, inline: a call a token
                item.parts.append(text)
                self._seq = seq = self._seq + 1
                return [(item.delta_type, item.delta % (seq, _encode(text)))]
            return self._text("message", text)
        events: Entries = []
        for choice in chunk.choices:
            if choice.get("index", 0) != 0:
                continue  # the Responses API has one answer (no n)
            if choice.get("finish_reason") == "length":
                self._length = True
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events += self._text("reasoning", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                events += self._text("message", content)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        events += self._call(call)
        return events

    def done(self, ending: Ending) -> Entries:
        """The events of a normal end: every open item closed, then the final event."""
        if ending.finish_reason == "cancelled":
            return self.failed("cancelled", "the response was cancelled", status="cancelled")
        events = self._close()
        if self._length:
            final = self.snapshot("incomplete")
            final["incomplete_details"] = {"reason": "max_output_tokens"}
            events.append(self._event("response.incomplete", response=final))
        else:
            events.append(self._event("response.completed", response=self.snapshot("completed")))
        self.ended = True
        return events

    def error(self, error: StreamsvcError) -> Entries:
        """The events of an end by ``error``: open items closed incomplete, ``response.failed``."""
        return self.failed(str(error.code), error.message)

    def failed(self, code: str, message: str, *, status: str = "failed") -> Entries:
        events = self._close("incomplete")
        final = self.snapshot(status)
        final["error"] = {"code": code, "message": message}
        events.append(self._event("response.failed", response=final))
        self.ended = True
        return events

    def snapshot(self, status: str) -> dict[str, Any]:
        """The response object now, with ``status``."""
        response = dict(self._response)
        response["status"] = status
        response["output"] = [item.item() for item in self._items]
        if status in ("completed", "incomplete", "failed", "cancelled"):
            usage = self._meter.result(self._prompt_tokens)
            response["usage"] = usage_object(usage.prompt_tokens, usage.completion_tokens)
        return response

    def _event(self, kind: str, **data: Any) -> tuple[str, bytes]:
        self._seq += 1
        return kind, _encode({"type": kind, "sequence_number": self._seq, **data})

    def _delta(self, item: _Item, text: str) -> tuple[str, bytes]:
        self._seq += 1
        return item.delta_type, item.delta % (self._seq, _encode(text))

    def _text(self, kind: str, text: str) -> Entries:
        events: Entries = []
        item = self._open
        if item is None or item.kind != kind:
            events += self._close()
            item = self._add(kind, ("msg_" if kind == "message" else "rs_"))
            events.append(self._event("response.output_item.added", output_index=item.index,
                                      item=item.item()))
            part = item.part()
            events.append(self._event("response.content_part.added", item_id=item.id,
                                      output_index=item.index, content_index=0, part=part))
        item.parts.append(text)
        events.append(self._delta(item, text))
        return events

    def _call(self, call: dict[str, Any]) -> Entries:
        events: Entries = []
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        item = self._calls.get(index)
        function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
        if item is None:
            events += self._close()
            item = self._add("function_call", "fc_")
            self._calls[index] = item
            item.call_id = call["id"] if isinstance(call.get("id"), str) else f"call_{item.id}"
            item.name = function["name"] if isinstance(function.get("name"), str) else ""
            events.append(self._event("response.output_item.added", output_index=item.index,
                                      item=item.item()))
        elif item is not self._open:
            return events  # a call continued after another item began: chat never does this
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.parts.append(arguments)
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item.id, output_index=item.index, delta=arguments))
        return events

    def _add(self, kind: str, prefix: str) -> _Item:
        index = len(self._items)
        item = _Item(kind, f"{prefix}{self.id.removeprefix('resp_')}_{index}", index)
        self._items.append(item)
        self._open = item
        return item

    def _close(self, status: str = "completed") -> Entries:
        """The ``.done`` events of the open item, if any."""
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        events: Entries = []
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            events.append(self._event("response.function_call_arguments.done", **at,
                                      name=item.name, arguments=item.text))
        else:
            part = item.part()
            if item.kind == "reasoning":
                events.append(self._event("response.reasoning_text.done", **at, content_index=0,
                                          text=item.text))
            else:
                events.append(self._event("response.output_text.done", **at, content_index=0,
                                          text=item.text, logprobs=[]))
            events.append(self._event("response.content_part.done", **at, content_index=0,
                                      part=part))
        events.append(self._event("response.output_item.done", output_index=item.index,
                                  item=item.item()))
        return events


class ResponseEntries:
    """A response's events as journal entries (an :class:`~streamsvc.wire.EntryEncoder`):
    the kind is the event's type, the data its JSON."""

    __slots__ = ("chunk", "events", "failure")

    def __init__(self, events: ResponseEvents) -> None:
        self.events = events
        self.failure: StreamsvcError | None = None
        """The error the response ended with, if it did."""
        self.chunk: Callable[[Chunk], Entries] = events.chunk
        """The entries of one chunk: the events' own method, with no call of ours per token."""

    def start(self) -> Entries:
        return self.events.start()

    def done(self, ending: Ending) -> Entries:
        return self.events.done(ending)

    def error(self, error: StreamsvcError) -> Entries:
        self.failure = error
        return self.events.error(error)
