"""streamsvc.chunks: parse once, keep the upstream bytes, merge deltas without loss."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc.chunks import Chunk, SurrogateJoiner, coalesce_batch, merge, text_size

ENVELOPE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(delta: dict[str, Any] | None = None, *, index: int = 0, **choice: Any) -> Chunk:
    return Chunk({**ENVELOPE, "choices": [{"index": index, "delta": delta or {}, **choice}]})


def text(content: str, *, index: int = 0, field: str = "content") -> Chunk:
    return chunk({field: content}, index=index)


def fragment(arguments: str, *, call: int = 0) -> Chunk:
    return chunk({"tool_calls": [{"index": call, "function": {"arguments": arguments}}]})


def tool_head(name: str, *, call: int = 0, arguments: str = "") -> Chunk:
    return chunk({
        "role": "assistant",
        "content": None,
        "tool_calls": [{
            "index": call, "id": f"call_{call}", "type": "function",
            "function": {"name": name, "arguments": arguments},
        }],
    })


def delta_of(c: Chunk) -> dict[str, Any]:
    delta: dict[str, Any] = c.choices[0]["delta"]
    return delta


# -- Chunk -----------------------------------------------------------------------------------


def test_from_json_keeps_raw_bytes_and_to_json_returns_them_untouched() -> None:
    raw = b'{"id":"x","choices":[{"index":0,"delta":{"content":" Hi"}}],  "extra":1}'
    c = Chunk.from_json(raw)
    assert c.raw is raw
    assert c.to_json() is raw  # not re-encoded: the upstream's spacing survives
    assert c.content == " Hi"
    assert c.has_content


def test_from_json_rejects_non_objects() -> None:
    with pytest.raises(msgspec.DecodeError):
        Chunk.from_json(b"[1, 2]")
    with pytest.raises(msgspec.DecodeError):
        Chunk.from_json(b"{not json")


def test_to_json_encodes_a_chunk_built_in_process() -> None:
    c = text("é\n")
    assert msgspec.json.decode(c.to_json()) == c.data


def test_properties_of_framing_chunks() -> None:
    role = chunk({"role": "assistant"})
    assert role.content == "" and not role.has_content
    finish = chunk({}, finish_reason="stop")
    assert not finish.has_content
    usage = Chunk({**ENVELOPE, "choices": [], "usage": {"total_tokens": 3}})
    assert usage.usage == {"total_tokens": 3} and usage.choices == [] and not usage.has_content
    assert chunk({"reasoning_content": "hmm"}).has_content
    assert fragment('{"a').has_content
    assert text("x", index=1).content == ""  # content is choice 0's text


# -- merge: what merges ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["content", "reasoning_content", "reasoning", "refusal"])
def test_merge_concatenates_the_same_text_field(field: str) -> None:
    merged = merge(text(" Hel", field=field), text("lo", field=field))
    assert merged is not None
    assert delta_of(merged) == {field: " Hello"}


def test_merge_keeps_the_first_chunks_envelope() -> None:
    first = Chunk({**ENVELOPE, "system_fingerprint": "fp", "choices": [
        {"index": 0, "delta": {"content": "a"}, "finish_reason": None, "logprobs": None}]})
    second = Chunk({**ENVELOPE, "id": "other", "choices": [
        {"index": 0, "delta": {"content": "b"}, "finish_reason": None}]})
    merged = merge(first, second)
    assert merged is not None
    assert merged.data["id"] == "chatcmpl-1" and merged.data["system_fingerprint"] == "fp"
    assert merged.choices == [
        {"index": 0, "delta": {"content": "ab"}, "finish_reason": None, "logprobs": None}]


def test_merge_role_and_content_head_with_content() -> None:
    merged = merge(chunk({"role": "assistant", "content": "Hi"}), text(" there"))
    assert merged is not None
    assert delta_of(merged) == {"role": "assistant", "content": "Hi there"}


def test_merge_keeps_a_text_kind_when_the_other_field_is_empty() -> None:
    # OpenRouter-style deltas carry both fields, one of them "".
    merged = merge(chunk({"content": "", "reasoning": "a"}),
                   chunk({"content": "", "reasoning": "b"}))
    assert merged is not None
    assert delta_of(merged) == {"content": "", "reasoning": "ab"}


def test_coalescing_keeps_reasoning_content_alternation_as_separate_blocks() -> None:
    # Every delta carries both fields, one empty: reasoning, content, reasoning, content.
    kinds = [("r1", ""), ("r2", ""), ("", "c1"), ("", "c2"), ("r3", ""), ("", "c3")]
    chunks = [chunk({"reasoning": r, "content": c}) for r, c in kinds]
    out = coalesce_batch(chunks, max_chars=100)
    assert [(delta_of(c)["reasoning"], delta_of(c)["content"]) for c in out] == [
        ("r1r2", ""), ("", "c1c2"), ("r3", ""), ("", "c3")]
    # Two kinds in one delta are never merged: their order in time is not known.
    assert merge(chunk({"content": "a", "reasoning_content": "b"}),
                 chunk({"content": "c", "reasoning_content": "d"})) is None


def test_merge_tool_call_argument_fragments_of_the_same_call() -> None:
    merged = merge(tool_head("get_weather"), fragment('{"city": '))
    assert merged is not None
    merged = merge(merged, fragment('"Paris"}'))
    assert merged is not None
    (call,) = delta_of(merged)["tool_calls"]
    assert call == {"index": 0, "id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert delta_of(merged)["role"] == "assistant"


def test_merge_two_bare_fragments_of_the_same_call() -> None:
    merged = merge(fragment('{"a'), fragment('": 1}'))
    assert merged is not None
    assert delta_of(merged)["tool_calls"] == [{"index": 0, "function": {"arguments": '{"a": 1}'}}]


def test_merge_does_not_modify_its_inputs() -> None:
    a, b = tool_head("f", arguments="{"), fragment("}")
    a_data, b_data = msgspec.json.encode(a.data), msgspec.json.encode(b.data)
    assert merge(a, b) is not None
    assert msgspec.json.encode(a.data) == a_data and msgspec.json.encode(b.data) == b_data


# -- merge: what does not ----------------------------------------------------------------------


NOT_MERGEABLE = {
    "other call index": (fragment("{", call=0), fragment("}", call=1)),
    "head of another call": (fragment("{", call=0), tool_head("g", call=1)),
    "tool head after a fragment": (fragment("{"), tool_head("g")),
    "other choice index": (text("a", index=0), text("b", index=1)),
    "content then reasoning": (text("a"), text("b", field="reasoning_content")),
    "content then content+reasoning": (
        text("a"), chunk({"content": "b", "reasoning_content": "c"})),
    "content+reasoning then content": (
        chunk({"content": "b", "reasoning_content": "c"}), text("a")),
    "role only then content": (chunk({"role": "assistant"}), text("a")),
    "content then role+content": (text("a"), chunk({"role": "assistant", "content": "b"})),
    "first has finish_reason": (chunk({"content": "a"}, finish_reason="stop"), text("b")),
    "second has finish_reason": (text("a"), chunk({"content": "b"}, finish_reason="stop")),
    "first has logprobs": (chunk({"content": "a"}, logprobs={"content": []}), text("b")),
    "second has logprobs": (text("a"), chunk({"content": "b"}, logprobs={"content": []})),
    "second has usage": (
        text("a"),
        Chunk({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": "b"}}],
               "usage": {"total_tokens": 1}}),
    ),
    "usage only": (text("a"), Chunk({**ENVELOPE, "choices": [], "usage": {"total_tokens": 1}})),
    "n>1 chunk": (
        text("a"),
        Chunk({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": "b"}},
                                       {"index": 1, "delta": {"content": "c"}}]}),
    ),
    "unknown choice field": (text("a"), chunk({"content": "b"}, extra=1)),
    "unknown delta field": (text("a"), chunk({"content": "b", "audio": {"id": "x"}})),
    "text then fragment": (text("a"), fragment("{")),
    "fragment then text": (fragment("{"), text("a")),
    "fragment naming the function": (
        tool_head("f"), chunk({"tool_calls": [{"index": 0, "function": {"name": "g",
                                                                         "arguments": "x"}}]})),
    "non-string content": (text("a"), chunk({"content": 5})),
}


@pytest.mark.parametrize(("first", "second"), NOT_MERGEABLE.values(), ids=NOT_MERGEABLE.keys())
def test_merge_refuses_what_would_lose_something(first: Chunk, second: Chunk) -> None:
    assert merge(first, second) is None


def test_raw_kept_when_untouched_and_dropped_after_merge() -> None:
    a = Chunk.from_json(b'{"choices":[{"index":0,"delta":{"content":"a"}}]}')
    b = Chunk.from_json(b'{"choices":[{"index":0,"delta":{"content":"b"}}]}')
    stop = Chunk.from_json(b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    out = coalesce_batch([a, b, stop], max_chars=100)
    assert len(out) == 2
    assert out[0].raw is None  # rebuilt: encoded again when written
    assert msgspec.json.decode(out[0].to_json()) == {
        "choices": [{"index": 0, "delta": {"content": "ab"}}]}
    assert out[1] is stop and out[1].raw is not None
    # a lone chunk passes through as the same object, bytes and all
    (only,) = coalesce_batch([a], max_chars=100)
    assert only is a and only.to_json() is a.raw


def test_text_size() -> None:
    assert text_size(text("héllo")) == 5
    assert text_size(chunk({"role": "assistant", "content": "ab"})) == 2
    assert text_size(chunk({"content": "ab", "reasoning_content": "c"})) == 3
    assert text_size(tool_head("f", arguments="{}")) == 2
    assert text_size(fragment("{")) == 1
    assert text_size(chunk({"role": "assistant"})) is None
    assert text_size(chunk({"content": "a"}, finish_reason="stop")) is None


def test_coalesce_batch_stops_at_max_chars() -> None:
    out = coalesce_batch([text("ab"), text("cd"), text("e"), text("fghij"), text("k")], 4)
    assert [c.content for c in out] == ["abcd", "e", "fghij", "k"]


# -- properties --------------------------------------------------------------------------------

# Text with line breaks, CJK, emoji (incl. a ZWJ sequence) and U+2028.
TEXT = st.lists(
    st.one_of(
        st.sampled_from(["\r", "\n", "\r\n", " ", "\u2028", "世", "界", "😀", "👩\u200d💻", "é"]),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=40,
).map("".join)


@st.composite
def split(draw: st.DrawFn, whole: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    bounds = [0, *cuts, len(whole)]
    return [whole[a:b] for a, b in itertools.pairwise(bounds)]


def framing() -> st.SearchStrategy[Chunk]:
    return st.sampled_from(["role", "finish", "usage", "empty"]).map(
        lambda kind: {
            "role": lambda: chunk({"role": "assistant"}),
            "finish": lambda: chunk({}, finish_reason="stop"),
            "usage": lambda: Chunk({**ENVELOPE, "choices": [], "usage": {"total_tokens": 1}}),
            "empty": lambda: chunk({}),
        }[kind]()
    )


@st.composite
def interleaved(draw: st.DrawFn) -> tuple[dict[int, str], list[Chunk]]:
    """Texts of choices 0 and 1, split into content chunks, interleaved with framing chunks."""
    texts = {0: draw(TEXT), 1: draw(TEXT)}
    queues = {i: [text(p, index=i) for p in draw(split(t))] for i, t in texts.items()}
    frames = draw(st.lists(framing(), max_size=6))
    order = draw(st.permutations(
        [0] * len(queues[0]) + [1] * len(queues[1]) + [2] * len(frames)))
    out = [frames.pop() if pick == 2 else queues[pick].pop(0) for pick in order]
    for position, c in enumerate(out):
        c.data["id"] = str(position)
    return texts, out


def choice_text(chunks: list[Chunk], index: int) -> str:
    return "".join(
        (ch.get("delta") or {}).get("content") or ""
        for c in chunks for ch in c.choices if ch.get("index", 0) == index
    )


@settings(max_examples=300, deadline=None)
@given(interleaved(), st.integers(0, 40))
def test_coalesce_batch_is_lossless_and_keeps_order(
    case: tuple[dict[int, str], list[Chunk]], max_chars: int
) -> None:
    texts, chunks = case
    out = coalesce_batch(list(chunks), max_chars)
    for index, whole in texts.items():
        assert choice_text(out, index) == whole
    # Each input carries its position as its id; a merged chunk keeps the id of the
    # first chunk of its run. So the output's ids cut the input into segments: a
    # segment of one chunk is that very object (bytes kept); a longer one is a run of
    # text chunks of one choice whose text the merged chunk concatenates.
    starts = [int(c.data["id"]) for c in out]
    assert starts == sorted(set(starts)) and starts[:1] == ([0] if chunks else [])
    for c, start, end in zip(out, starts, [*starts[1:], len(chunks)], strict=True):
        segment = chunks[start:end]
        if len(segment) == 1:
            assert c is segment[0]
            continue
        assert c.raw is None
        index = c.choices[0]["index"]
        assert all(text_size(s) is not None and s.choices[0]["index"] == index for s in segment)
        assert choice_text(segment, index) == choice_text([c], index)
        size = text_size(c)
        assert size is not None and size <= max_chars  # a merge never passes the bound


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.data(), st.integers(1, 30))
def test_tool_call_arguments_reassemble_identically(
    arguments: str, data: st.DataObject, max_chars: int
) -> None:
    pieces = data.draw(split(arguments))
    chunks = [tool_head("f", arguments=pieces[0]), *(fragment(p) for p in pieces[1:]),
              chunk({}, finish_reason="tool_calls")]
    out = coalesce_batch(chunks, max_chars)
    assembled = "".join(
        call["function"].get("arguments", "")
        for c in out for ch in c.choices for call in ch["delta"].get("tool_calls", [])
    )
    assert assembled == arguments
    assert out[0].choices[0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
    assert out[-1] is chunks[-1]


# -- issue 12, item 7: an emoji split across chunks as lone surrogate escapes ---------------------

def _raw(delta: str, *, index: int = 0, finish: str | None = None, head: str = "") -> bytes:
    """A chunk's JSON bytes with ``delta`` written as-is (escapes and all)."""
    return ('{"id":"c%s","choices":[{"index":%d,"delta":%s,"finish_reason":%s}]}' % (
        head, index, delta, "null" if finish is None else f'"{finish}"')).encode()


def _joined(*raws: bytes) -> list[Chunk]:
    joiner = SurrogateJoiner()
    return [joiner.join(Chunk.from_json(raw)) for raw in raws]


def _texts(chunks: list[Chunk], field: str = "content") -> str:
    return "".join(c.choices[0]["delta"].get(field) or "" for c in chunks)


def test_an_emoji_split_into_lone_surrogate_escapes_is_joined_across_chunks() -> None:
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(_raw('{"content":"x\\ud83d"}'))  # what failed the stream
    chunks = _joined(_raw('{"content":"x\\ud83d"}'), _raw('{"content":"\\ude42y"}'),
                     _raw("{}", finish="stop"))
    assert [c.content for c in chunks] == ["x", "\U0001f642y", ""]
    for c in chunks:  # every chunk encodes (a lone surrogate cannot go out as UTF-8)
        assert msgspec.json.decode(c.to_json()) == c.data


def test_split_surrogates_are_joined_per_choice_field_and_tool_call() -> None:
    chunks = _joined(
        _raw('{"reasoning_content":"\\ud83e"}'), _raw('{"content":"\\ud83d"}', index=1),
        _raw('{"reasoning_content":"\\udd14!"}'), _raw('{"content":"\\ude00"}', index=1),
        _raw('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"e\\":\\"\\ud83d"}}]}'),
        _raw('{"tool_calls":[{"index":0,"function":{"arguments":"\\udc4d\\"}"}}]}'),
    )
    assert _texts([chunks[0], chunks[2]], "reasoning_content") == "\U0001f914!"
    assert _texts([chunks[1], chunks[3]]) == "\U0001f600"
    arguments = "".join(c.choices[0]["delta"]["tool_calls"][0]["function"]["arguments"]
                        for c in chunks[4:])
    assert arguments == '{"e":"\U0001f44d"}'


def test_a_lone_surrogate_with_no_partner_becomes_u_fffd_and_never_fails() -> None:
    chunks = _joined(_raw('{"content":"a\\ude42b"}'),  # a low half with nothing before it
                     _raw('{"content":"c\\ud83d"}'), _raw('{"content":"d"}'),  # high, no low
                     _raw('{"content":"e\\ud83d"}'), _raw("{}", finish="stop"),  # high at the end
                     _raw('{"content":"f"}', head="\\ud800"))  # outside the text
    assert _texts(chunks) == "a\ufffdbc\ufffdde\ufffdf"
    assert chunks[-1].data["id"] == "c\ufffd"
    for c in chunks:
        msgspec.json.decode(c.to_json())


def test_chunks_without_split_surrogates_keep_their_upstream_bytes() -> None:
    raws = [_raw('{"content":"\\u00e9t\\u00e9 \\ud83d\\ude42"}'), _raw('{"content":"plain"}')]
    chunks = _joined(*raws)
    assert [c.raw for c in chunks] == raws
    assert chunks[0].content == "\u00e9t\u00e9 \U0001f642"


# -- the text mark: a shortcut that changes nothing ------------------------------------------

_CHOICE_VALUES = st.one_of(st.none(), st.integers(0, 2), st.text(max_size=3), st.booleans())
_DELTAS = st.one_of(
    st.builds(lambda text: {"content": text}, st.text(max_size=4)),  # what nearly every chunk is
    st.none(),
    st.dictionaries(st.sampled_from(["content", "role", "reasoning_content", "refusal"]),
                    st.one_of(st.text(max_size=4), st.none(), st.integers(0, 1)), max_size=2),
)


@st.composite
def _chunk_bodies(draw: st.DrawFn) -> dict[str, Any]:
    choices = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        choice: dict[str, Any] = {"index": draw(st.integers(0, 1))}
        delta = draw(_DELTAS)
        if delta is not None:
            choice["delta"] = delta
        if draw(st.booleans()):
            choice["finish_reason"] = draw(st.sampled_from([None, "stop", "length"]))
        if draw(st.booleans()):
            choice["logprobs"] = draw(_CHOICE_VALUES)
        choices.append(choice)
    body: dict[str, Any] = {**ENVELOPE, "choices": choices}
    if draw(st.booleans()):
        usage = draw(st.sampled_from([None, {"prompt_tokens": 1, "completion_tokens": 2,
                                             "total_tokens": 3}]))
        # Last (as OpenAI sends it) or first: the OpenAI format drops a null one either way.
        body = {**body, "usage": usage} if draw(st.booleans()) else {"usage": usage, **body}
    return body


_ROLE = {**ENVELOPE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}


def _decoded(body: dict[str, Any], *, after: dict[str, Any] | None = None) -> Chunk:
    """``body`` as the upstream decoder emits it; ``after``: a chunk fed just before it."""
    from streamsvc.upstream.decoding import ChunkDecoder

    out: list[Chunk] = []
    decoder = ChunkDecoder("u", out.append)
    for one in ([after] if after is not None else []) + [body]:
        decoder.feed(b"data: " + msgspec.json.encode(one) + b"\n\n")
    assert len(out) == (2 if after is not None else 1)
    return out[-1]


def _everything_made_of(one: Chunk) -> tuple[Any, ...]:
    from streamsvc.usage import UsageMeter
    from streamsvc.wire.events import EventBuilder, EventEntries
    from streamsvc.wire.openai_chat import OpenAIChatEncoder
    from streamsvc.wire.responses import ResponseEvents

    meter = UsageMeter()
    meter.add(one)
    responses = ResponseEvents({"id": "resp_1", "model": "m"}, prompt_tokens=1)
    return (one.content, one.has_content, meter.chars, EventBuilder().deltas(one),
            EventEntries().chunk(one),
            responses.chunk(one), OpenAIChatEncoder(include_usage=True).chunk(one),
            OpenAIChatEncoder(include_usage=False).chunk(one))


@settings(max_examples=500, deadline=None)
@given(_chunk_bodies(), st.booleans())
def test_the_text_mark_changes_no_output(body: dict[str, Any], after_framing: bool) -> None:
    """The decoder marks a chunk that is only text for choice 0 (``Chunk.text``) and leaves
    its JSON unparsed (``Chunk.of_text``), so that the steps after it read it once; every
    one of them must make what it makes from the chunk's ``data`` alone. After a chunk that
    is not text (``after_framing``) the decoder reads the next as a dict, and marks it too."""
    decoded = _decoded(body, after=_ROLE if after_framing else None)
    made = _everything_made_of(decoded)  # first: before anything parsed the chunk's data
    plain = Chunk(decoded.data, decoded.raw)
    assert plain.text is None
    assert made == _everything_made_of(plain)
    (choice,) = body["choices"] if len(body["choices"]) == 1 else (None,)
    only_text = (
        choice is not None and not choice["index"] and choice.get("finish_reason") is None
        and isinstance(choice.get("delta"), dict) and list(choice["delta"]) == ["content"]
        and isinstance(choice["delta"]["content"], str) and body.get("usage") is None
    )
    assert (decoded.text is not None) == only_text
    if only_text:
        assert decoded.text == choice["delta"]["content"]


# -- the template: a stream's text chunks read as the one string their bytes differ by ------


@st.composite
def _text_bodies(draw: st.DrawFn, model: str) -> dict[str, Any]:
    """A text chunk of one stream's envelope: what a template is learned from and matches."""
    choice: dict[str, Any] = {"index": 0, "delta": {"content": draw(st.text(max_size=5))}}
    if draw(st.booleans()):
        choice = {**choice, "logprobs": None, "finish_reason": None}
    body: dict[str, Any] = {**ENVELOPE, "model": model, "choices": [choice]}
    if draw(st.booleans()):
        body["usage"] = None
    if draw(st.booleans()):  # a field that changes in every chunk (OpenAI's "obfuscation")
        body["pad"] = draw(st.text(max_size=3))
    return body


def _feed(bodies: list[tuple[dict[str, Any], bool]], *, template: bool) -> list[Chunk]:
    import json

    from streamsvc.upstream.decoding import ChunkDecoder

    out: list[Chunk] = []
    decoder = ChunkDecoder("u", out.append)
    if not template:
        decoder._learn = 0
    for body, ascii in bodies:  # ascii: escaped otherwise than msgspec escapes (\u00e9)
        raw = (json.dumps(body, separators=(",", ":")).encode() if ascii
               else msgspec.json.encode(body))
        decoder.feed(b"data: " + raw + b"\n\n")
    return out


@settings(max_examples=300, deadline=None)
@given(st.data(), st.text(max_size=3))
def test_the_template_reads_every_chunk_as_the_usual_path_does(data: Any, model: str) -> None:
    """Text chunks of one envelope, framing and tool-call chunks between them, non-ASCII
    escaped by some and not others, a model name that may equal a text: each chunk the
    decoder emits is the one it emits without the template, to every format."""
    kinds = st.one_of(_text_bodies(model), _text_bodies(model), _chunk_bodies())
    bodies = data.draw(st.lists(st.tuples(kinds, st.booleans()), min_size=1, max_size=12))
    fast, usual = _feed(bodies, template=True), _feed(bodies, template=False)
    assert [(c.text, c.raw) for c in fast] == [(c.text, c.raw) for c in usual]
    assert [_everything_made_of(c) for c in fast] == [_everything_made_of(c) for c in usual]
    assert [c.data for c in fast] == [c.data for c in usual]


def test_the_templates_text_is_never_a_string_that_only_looks_like_it() -> None:
    """The class of bug a template could have: learning the wrong string's place. Here the
    model's name is the text as msgspec writes it, the text itself is escaped otherwise,
    and the model changes from chunk to chunk: what matches the bytes around the model's
    name must not be read as text. The probe refuses that place; the text's own is used."""
    from streamsvc.upstream.decoding import ChunkDecoder

    out: list[Chunk] = []
    decoder = ChunkDecoder("u", out.append)
    for model in ("\u00e9t\u00e9", "x", "y"):
        decoder.feed(b'data: {"id":"c","model":' + msgspec.json.encode(model)
                     + b',"choices":[{"index":0,"delta":{"content":"\\u00e9t\\u00e9"}}]}\n\n')
    assert [c.text for c in out] == ["\u00e9t\u00e9"] * 3
    assert [c.data["model"] for c in out] == ["\u00e9t\u00e9", "x", "y"]
    # And where the text is written the same way as a string before it, the template is
    # the text's place (the last), which the next chunks' texts then fill.
    texts = ["m", "other", "m", "more"]
    bodies = [({**ENVELOPE, "model": "m", "choices": [{"index": 0, "delta": {"content": t}}]},
               False) for t in texts]
    assert [c.text for c in _feed(bodies, template=True)] == texts


def test_a_stream_of_text_chunks_is_read_by_its_template(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's chunks (OpenAI's shape): after the role chunk and the text chunk
    the template is learned from, no chunk's shape is read again until the finish."""
    from streamsvc.simulator.encoding import ChunkEncoder
    from streamsvc.upstream import decoding

    reads: list[bytes] = []
    shape = decoding._decode_shape

    def counted(data: bytes) -> Any:
        reads.append(data)
        return shape(data)

    monkeypatch.setattr(decoding, "_decode_shape", counted)
    encoder = ChunkEncoder(completion_id="chatcmpl-1", created=1, model="m", include_usage=True)
    texts = [" Hello", ",", ' "quoted"', " \\back", " \u00e9t\u00e9 \U0001f642", "", " end"] * 10
    out: list[Chunk] = []
    decoder = decoding.ChunkDecoder("u", out.append)
    decoder.feed(encoder.role(0) + b"".join(encoder.content(0, t) for t in texts)
                 + encoder.finish(0, "stop") + encoder.usage(1, len(texts)) + b"data: [DONE]\n\n")
    assert [c.text for c in out[1:-2]] == texts and decoder.done
    assert [c.raw for c in out[1:-2]] == [encoder.content(0, t)[6:-2] for t in texts]
    # The role, the second text and its probe, the finish (then the usage is read as a dict).
    assert len(reads) == 4, reads


def test_a_merge_of_two_text_chunks_is_marked_as_text_and_reads_the_same() -> None:
    first, second = (_decoded({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": piece}}]})
                     for piece in ("Hel", "lo"))
    merged = merge(first, second)
    assert merged is not None and merged.text == "Hello"
    assert _everything_made_of(merged) == _everything_made_of(Chunk(merged.data))


def test_a_stream_of_text_after_framing_and_tool_calls_is_marked_again_once_text_returns() -> None:
    """After a chunk that is not text the decoder reads chunks as dicts (no second read of
    a tool call's pieces), and goes back to the shape check at the next text chunk."""
    from streamsvc.upstream.decoding import ChunkDecoder

    bodies = [_ROLE, *(tool_head("f", arguments="{").data, fragment('"a"').data,
                       text("Hel").data, text("lo").data)]
    out: list[Chunk] = []
    decoder = ChunkDecoder("u", out.append)
    for body in bodies:
        decoder.feed(b"data: " + msgspec.json.encode({**ENVELOPE, **body}) + b"\n\n")
    assert [one.text for one in out] == [None, None, None, "Hel", "lo"]
    assert out[3]._data is not None  # the first text after tool calls: read as a dict
    assert out[4]._data is None  # then text is read by shape again, left unparsed


def test_a_chunk_changed_as_a_new_chunk_from_a_copy_is_written_changed_by_every_format() -> None:
    """The way operators.md gives for an operator that changes a chunk: a new ``Chunk`` from
    a changed copy of ``data``. Every format then writes the change, though the decoder's
    chunk was text alone, relayed from its upstream bytes."""
    import copy

    decoded = _decoded({**ENVELOPE, "choices": [{"index": 0, "delta": {"content": "secret"}}]})
    assert decoded.text == "secret"
    data = copy.deepcopy(decoded.data)
    data["choices"][0]["delta"]["content"] = "[redacted]"
    changed = Chunk(data)
    made = _everything_made_of(changed)
    assert made == _everything_made_of(Chunk(msgspec.json.decode(msgspec.json.encode(data))))
    assert not any(b"secret" in part for part in made[-2:])
    assert all(b"[redacted]" in part for part in made[-2:])
    assert made[0] == "[redacted]"
    assert decoded.text == "secret" and b"secret" in decoded.raw  # the copy left it alone
