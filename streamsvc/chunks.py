"""Chunk: one OpenAI ``chat.completion.chunk``, parsed once, and the lossless merge of deltas.

A chunk keeps the upstream's JSON bytes (``raw``) next to the parsed dict so a
relay that changes nothing writes the upstream bytes as they came; any
operator that builds a new chunk (a merge) drops ``raw`` and the chunk is
encoded again when written.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = [
    "TEXT_FIELDS", "Chunk", "ChunkBuffer", "Seam", "SurrogateJoiner", "coalesce_batch", "merge",
    "split_text", "text_size",
]

# Delta fields that carry text and concatenate losslessly. Upstreams name the
# reasoning text "reasoning_content" (DeepSeek, vLLM) or "reasoning" (OpenRouter).
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")

_encode = msgspec.json.encode


class Chunk:
    """One streamed chat completion chunk.

    Attributes:
        data: the parsed ``chat.completion.chunk`` object.
        raw: the upstream's JSON bytes for ``data``, or None once ``data`` was rebuilt.
        text: set by the upstream decoder when the chunk is nothing but text for
            choice 0 (one choice, index 0, a delta of ``content`` alone, no finish
            reason, no usage): nearly every chunk. Then that text, "" included, so
            that the steps after it (the usage meter, the event formats) read the
            chunk once instead of walking ``data`` each. None: read ``data``.

    A chunk is a value: to change one, make a new ``Chunk`` from a changed copy of
    ``data``. A change made to ``data`` in place leaves ``raw`` and ``text`` as they
    were, and the formats write those.
    """

    __slots__ = ("_data", "raw", "text")

    def __init__(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        self._data: dict[str, Any] | None = data
        self.raw = raw
        self.text: str | None = None

    @classmethod
    def of_text(cls, raw: bytes, text: str) -> Chunk:
        """A text chunk (see ``text``) whose ``raw`` is parsed only if a step asks for ``data``:
        relayed as it came, nearly every chunk is never parsed into a dict at all."""
        chunk = cls.__new__(cls)
        chunk._data = None
        chunk.raw = raw
        chunk.text = text
        return chunk

    @property
    def data(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            assert self.raw is not None  # of_text's bytes, which the decoder has read once
            data = self._data = msgspec.json.decode(self.raw)
        return data

    @classmethod
    def from_json(cls, raw: bytes) -> Chunk:
        """Parse upstream bytes once; raises ``msgspec.DecodeError`` on bad JSON.

        A string may hold a lone UTF-16 surrogate escape (``"\\ud83d"``): some
        upstreams split an emoji into two chunks that way, and JavaScript joins
        the halves. msgspec refuses it; such a chunk is read with the standard
        library, keeps its lone surrogates, and has ``raw = None`` until a
        :class:`SurrogateJoiner` has made its text whole.
        """
        kept: bytes | None = raw
        try:
            data = msgspec.json.decode(raw)
        except RecursionError:  # nested past the stack: an upstream fault, not a bug of ours
            raise msgspec.DecodeError("JSON is nested too deep") from None
        except msgspec.DecodeError:
            if b"\\u" not in raw:
                raise
            try:
                data = json.loads(raw)  # keeps "\ud83d" as the one code point U+D83D
            except (ValueError, RecursionError):
                raise msgspec.DecodeError("JSON is malformed") from None
            kept = None
        if not isinstance(data, dict):
            raise msgspec.DecodeError(f"expected a JSON object, got {type(data).__name__}")
        return cls(data, kept)

    def to_json(self) -> bytes:
        """The chunk's JSON: the upstream's bytes when nothing changed them."""
        if self.raw is None:
            self.raw = _encode(self.data)
        return self.raw

    @property
    def choices(self) -> list[dict[str, Any]]:
        choices = self.data.get("choices")
        return choices if isinstance(choices, list) else []

    @property
    def usage(self) -> dict[str, Any] | None:
        usage = self.data.get("usage")
        return usage if isinstance(usage, dict) else None

    @property
    def content(self) -> str:
        """The text this chunk adds to choice 0 ("" when it adds none)."""
        if self.text is not None:
            return self.text
        for choice in self.choices:
            if choice.get("index", 0) == 0:
                text = (choice.get("delta") or {}).get("content")
                return text if isinstance(text, str) else ""
        return ""

    @property
    def has_content(self) -> bool:
        """True when the chunk carries text or a tool call, not only framing.

        Framing is a role-only delta, an empty delta, a finish reason or usage:
        a retry may still replace an attempt that sent only framing.
        """
        if self.text is not None:
            return bool(self.text)
        for choice in self.choices:
            delta = choice.get("delta")
            if not delta:
                continue
            for field in TEXT_FIELDS:
                if delta.get(field):
                    return True
            if delta.get("tool_calls") or delta.get("function_call"):
                return True
        return False

    def __repr__(self) -> str:
        return f"Chunk({self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chunk) and self.data == other.data

    __hash__ = None  # type: ignore[assignment]


class Seam(Chunk):
    """Not an upstream chunk: the answer goes on from another attempt after a failure.

    Continuation (``pipeline.continue_on_failure``) puts one between the text
    of the attempt that failed and the continuation's. It carries no choices;
    ``info`` says ``from`` (the upstream that failed), ``to``, the error
    ``code``, ``delivered_chars`` (text before the seam) and
    ``overlap_removed``. The streamsvc format shows it as ``event: failover``;
    the OpenAI formats leave it out.
    """

    __slots__ = ("info",)

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__({"choices": []})
        self.info = info

    def __repr__(self) -> str:
        return f"Seam({self.info!r})"


def _is_high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


def _whole(text: str) -> str:
    """``text`` with each surrogate pair made one character and each lone one U+FFFD."""
    try:
        text.encode("utf-8")  # fails exactly when a surrogate code point is in it
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _whole_strings(node: Any) -> Any:
    """Every string in a decoded JSON value made whole (lone surrogates: U+FFFD)."""
    if isinstance(node, str):
        return _whole(node)
    if isinstance(node, list):
        return [_whole_strings(item) for item in node]
    if isinstance(node, dict):
        return {_whole(key): _whole_strings(value) for key, value in node.items()}
    return node


class SurrogateJoiner:
    """Joins the halves of a character that an upstream split across two chunks.

    One per upstream stream, fed its chunks in order. When a text field of a
    choice (or a tool call's argument text) ends with a lone high surrogate,
    that half is held back and put in front of the same field's next text,
    where its low half starts: ``"\\ud83d"`` then ``"\\ude42"`` become ``""``
    then ``"🙂"``, so the text is what a JavaScript client reading the upstream
    shows. A half that has no partner becomes U+FFFD, as it does there; one
    still held when its choice finishes is sent as U+FFFD in that last chunk.
    Costs nothing on a chunk that msgspec read (``raw`` set) while nothing is held.
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: dict[tuple[int, str | int], str] = {}
        """The halves held back, by (choice, field): while empty, a chunk msgspec read
        needs no join."""

    def join(self, chunk: Chunk) -> Chunk:
        if chunk.raw is not None and not self.held:
            return chunk
        changed = chunk.raw is None
        for choice in chunk.choices:
            delta = choice.get("delta")
            index = choice.get("index", 0)
            if not isinstance(delta, dict) or not isinstance(index, int):
                continue
            for field in TEXT_FIELDS:
                text = delta.get(field)
                if isinstance(text, str):
                    joined = self._text((index, field), text)
                    changed = changed or joined != text
                    delta[field] = joined
                elif choice.get("finish_reason") is not None and (index, field) in self.held:
                    del self.held[(index, field)]
                    delta[field] = "\ufffd"
                    changed = True
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    key = (index, call.get("index", 0))
                    joined = self._text(key, function["arguments"])
                    changed = changed or joined != function["arguments"]
                    function["arguments"] = joined
        if not changed:
            return chunk
        data = chunk.data
        try:
            raw = _encode(data)
        except UnicodeEncodeError:  # a lone surrogate outside the text (an id, a name)
            try:
                data = _whole_strings(data)
            except RecursionError:
                raise msgspec.DecodeError("JSON is nested too deep") from None
            raw = _encode(data)
        return Chunk(data, raw)

    def _text(self, key: tuple[int, str | int], text: str) -> str:
        held = self.held.pop(key, None)
        if held is not None:
            text = held + text
        if text and _is_high_surrogate(text[-1]):
            self.held[key] = text[-1]
            text = text[:-1]
        return _whole(text) if held is not None or not text.isascii() else text


def _only_choice(chunk: Chunk) -> dict[str, Any] | None:
    """The single choice of a chunk that has no usage, no finish and no logprobs."""
    data = chunk.data
    if data.get("usage") is not None:
        return None
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return None
    if choice.get("logprobs") is not None or not isinstance(choice.get("delta"), dict):
        return None
    if set(choice) - {"index", "delta", "finish_reason", "logprobs"}:
        return None
    return choice


def _text_keys(delta: dict[str, Any]) -> frozenset[str] | None:
    """The text fields of a delta that holds only text (None otherwise)."""
    keys = []
    for key, value in delta.items():
        if key in TEXT_FIELDS and isinstance(value, str):
            keys.append(key)
        elif value is not None:
            return None
    return frozenset(keys) if keys else None


def _tool_fragment(delta: dict[str, Any]) -> tuple[int, str] | None:
    """(tool index, argument text) when the delta is only an argument fragment of one call."""
    if set(delta) - {"tool_calls"} and any(delta[k] is not None for k in delta if k != "tool_calls"):
        return None
    calls = delta.get("tool_calls")
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
        return None
    call = calls[0]
    function = call.get("function")
    if set(call) - {"index", "function"} or not isinstance(function, dict):
        return None
    if set(function) != {"arguments"} or not isinstance(function["arguments"], str):
        return None
    index = call.get("index", 0)
    return (index, function["arguments"]) if isinstance(index, int) else None


def _tool_head(delta: dict[str, Any]) -> int | None:
    """The tool index when the delta holds exactly one tool call (head or fragment)."""
    calls = delta.get("tool_calls")
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
        return None
    if any(delta[k] is not None for k in delta if k not in ("tool_calls", "role")):
        return None
    function = calls[0].get("function")
    if function is not None and not isinstance(function, dict):
        return None
    index = calls[0].get("index", 0)
    return index if isinstance(index, int) else None


def merge(first: Chunk, second: Chunk) -> Chunk | None:
    """Merge ``second`` into ``first`` when that loses nothing; None when it would.

    Two chunks merge when each has one choice of the same index with no finish
    reason, no usage and no logprobs, and ``second`` only continues what
    ``first`` holds: the same text fields with text in at most one of them (the
    kind of text does not change: content stays content, reasoning reasoning),
    or more argument text for the same tool call. The merged chunk keeps
    ``first``'s envelope (id, model, ...).

    >>> a = Chunk({"choices": [{"index": 0, "delta": {"content": " Hel"}}]})
    >>> b = Chunk({"choices": [{"index": 0, "delta": {"content": "lo"}}]})
    >>> merge(a, b).content
    ' Hello'
    """
    head = _only_choice(first)
    tail = _only_choice(second)
    if head is None or tail is None or head.get("index", 0) != tail.get("index", 0):
        return None
    head_delta: dict[str, Any] = head["delta"]
    tail_delta: dict[str, Any] = tail["delta"]

    delta: dict[str, Any]
    tail_keys = _text_keys(tail_delta)
    if tail_keys is not None:
        head_text = {k: v for k, v in head_delta.items() if k != "role"}
        if _text_keys(head_text) != tail_keys:
            return None
        # Only while the kind of text stays the same: reasoning, content, reasoning,
        # content is four blocks to a client, never one of each (fields may be "").
        kinds = {k for k in tail_keys if head_delta[k] or tail_delta[k]}
        if len(kinds) > 1:
            return None
        delta = dict(head_delta)
        for key in tail_keys:
            delta[key] = head_delta[key] + tail_delta[key]
    else:
        fragment = _tool_fragment(tail_delta)
        if fragment is None or _tool_head(head_delta) != fragment[0]:
            return None
        call = dict(head_delta["tool_calls"][0])
        function = dict(call.get("function") or {})
        function["arguments"] = (function.get("arguments") or "") + fragment[1]
        call["function"] = function
        delta = dict(head_delta)
        delta["tool_calls"] = [call]

    choice = dict(head)
    choice["delta"] = delta
    data = dict(first.data)
    data["choices"] = [choice]
    merged = Chunk(data)
    if first.text is not None and second.text is not None:
        merged.text = first.text + second.text  # still text alone for choice 0
    return merged


def text_size(chunk: Chunk) -> int | None:
    """Characters of text a mergeable chunk carries; None when it cannot take part in a merge."""
    choice = _only_choice(chunk)
    if choice is None:
        return None
    delta: dict[str, Any] = choice["delta"]
    if _text_keys({k: v for k, v in delta.items() if k != "role"}) is not None:
        return sum(len(v) for k, v in delta.items() if k in TEXT_FIELDS and isinstance(v, str))
    if _tool_head(delta) is not None:
        function = delta["tool_calls"][0].get("function") or {}
        arguments = function.get("arguments")
        return len(arguments) if isinstance(arguments, str) else 0
    return None


class ChunkBuffer:
    """Chunks waiting to be emitted, each merged into the one before it when that loses nothing.

    Args:
        max_chars: the most text characters one merged chunk carries (None: no bound).
    """

    __slots__ = ("_max_chars", "_tail_chars", "chunks")

    def __init__(self, max_chars: int | None = None) -> None:
        self.chunks: list[Chunk] = []
        """What is held, in order (read-only: :meth:`append` and :meth:`drain` change it)."""
        self._max_chars = max_chars
        self._tail_chars: int | None = None  # text of the last chunk; None: it cannot merge

    def __len__(self) -> int:
        return len(self.chunks)

    def append(self, chunk: Chunk) -> None:
        size = text_size(chunk)
        tail = self._tail_chars
        if size is not None and tail is not None and (
            self._max_chars is None or tail + size <= self._max_chars
        ):
            merged = merge(self.chunks[-1], chunk)
            if merged is not None:
                self.chunks[-1] = merged
                self._tail_chars = tail + size
                return
        self.chunks.append(chunk)
        self._tail_chars = size

    def drain(self) -> list[Chunk]:
        """Everything held, in order; the buffer is empty afterwards."""
        chunks, self.chunks = self.chunks, []
        self._tail_chars = None
        return chunks


def coalesce_batch(chunks: list[Chunk], max_chars: int) -> list[Chunk]:
    """Merge adjacent mergeable chunks of a batch that is already here (no timer needed)."""
    if len(chunks) < 2:
        return chunks
    buffer = ChunkBuffer(max_chars)
    for chunk in chunks:
        buffer.append(chunk)
    return buffer.drain()


def split_text(chunk: Chunk, n: int) -> tuple[Chunk, Chunk] | None:
    """Cut a chunk that carries one text field after ``n`` characters: (head, rest).

    The head keeps the delta's other fields (a role); the rest carries only
    the remaining text. None when the chunk is not a plain text delta or is
    no longer than ``n``. Concatenating the two texts gives the original.
    """
    choice = _only_choice(chunk)
    if choice is None or n < 1:
        return None
    delta: dict[str, Any] = choice["delta"]
    keys = _text_keys({k: v for k, v in delta.items() if k != "role"})
    if keys is None or len(keys) != 1:
        return None
    (key,) = keys
    text: str = delta[key]
    if len(text) <= n:
        return None
    return _with_delta(chunk, choice, {**delta, key: text[:n]}), _with_delta(
        chunk, choice, {key: text[n:]}
    )


def _with_delta(chunk: Chunk, choice: dict[str, Any], delta: dict[str, Any]) -> Chunk:
    data = dict(chunk.data)
    data["choices"] = [{**choice, "delta": delta}]
    return Chunk(data)
