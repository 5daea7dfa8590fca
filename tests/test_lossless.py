"""Property tests: every operator chain, batch merge and event build is lossless.

A random upstream answer (1-3 choices, reasoning, content, tool calls cut into
fragments, interleaved across choices, finish chunks, usage) arrives at random
virtual times on a TestScheduler and goes through a random chain of the public
operators with random settings. Whatever comes out must carry the same text,
in the same order, with the same framing, as what went in.

The comparison flattens chunks into "atoms": one per character of text or
tool-call arguments, one per role, tool-call head, finish reason and usage,
each tagged with its choice. Merging and cutting chunks changes the chunk
boundaries but never the atom sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from reactivex import Observable
from reactivex.testing import ReactiveTest, TestScheduler

from streamsvc.chunks import TEXT_FIELDS, Chunk, ChunkBuffer, coalesce_batch
from streamsvc.errors import ErrorCode, UpstreamError
from streamsvc.operators import (
    coalesce,
    first_token_timeout,
    idle_timeout,
    pace,
    retry_with_backoff,
    throttle,
    total_timeout,
)
from streamsvc.wire import Ending
from streamsvc.wire.events import EventBuilder

on_next = ReactiveTest.on_next
on_error = ReactiveTest.on_error
on_completed = ReactiveTest.on_completed

ENVELOPE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
NEVER = 1_000_000  # a timeout that never fires: far past the end of any run
SUBSCRIBED = 200  # TestScheduler.start subscribes here; cold times count from it
GONE = UpstreamError("the upstream went away", code=ErrorCode.UPSTREAM_ERROR, retryable=False)

# Pieces of text: ASCII, whitespace and line ends (a "\r\n" may be cut in two),
# CJK, emoji (one with a modifier: two code points), markup, JSON escapes.
PIECES = ["a", "bc", " ", "  ", "\r", "\n", "\r\n", "\t", "世", "界", "😀", "👍🏽", "é",
          "<b>", "</b>", '"', "\\"]
texts = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)

Atom = tuple[Any, ...]


class Message(NamedTuple):
    """One recorded notification: its virtual time, kind ("N", "E", "C") and payload."""

    time: float
    kind: str
    value: Any  # the Chunk of an "N", the exception of an "E", None for "C"


# -- the upstream answer ---------------------------------------------------------------------


@dataclass
class Expected:
    """What one choice says, whole."""

    content: str = ""
    reasoning: str = ""
    tools: dict[int, tuple[str, str]] = field(default_factory=dict)  # tool index: (id, args)
    finish: str = "stop"


@dataclass
class Answer:
    chunks: list[Chunk]
    times: list[int]  # arrival of each chunk, ticks after subscription
    choices: dict[int, Expected]
    usage: bool

    @property
    def end(self) -> int:
        return self.times[-1] + 1 if self.times else 1


def cut(draw: st.DrawFn, whole: str) -> list[str]:
    """``whole`` cut at random places (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    bounds = [0, *cuts, len(whole)]
    return [whole[a:b] for a, b in pairwise(bounds)]


@st.composite
def choice_deltas(draw: st.DrawFn, index: int) -> tuple[Expected, list[dict[str, Any]]]:
    """One choice's own sequence of choice objects, finish included, and what it says."""
    expected = Expected()
    role: dict[str, Any] = draw(st.sampled_from([
        {"role": "assistant"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "", "refusal": None},
    ]))
    deltas: list[dict[str, Any]] = [role]
    if draw(st.booleans()):
        expected.reasoning = draw(texts)
        # DeepSeek and vLLM name it "reasoning_content", OpenRouter "reasoning".
        name = draw(st.sampled_from(["reasoning_content", "reasoning"]))
        deltas += [{name: p} for p in cut(draw, expected.reasoning)]
    expected.content = draw(texts)
    deltas += [{"content": p} for p in cut(draw, expected.content)]
    for k in range(draw(st.integers(0, 2))):
        arguments = json.dumps({"q": draw(texts), "k": k}, ensure_ascii=draw(st.booleans()))
        call_id = f"call_{index}_{k}"
        expected.tools[k] = (call_id, arguments)
        head = {"index": k, "id": call_id, "type": "function",
                "function": {"name": "f", "arguments": ""}}
        # OpenAI's first tool-call delta also says "content": null.
        nulls = draw(st.sampled_from([{}, {"content": None}]))
        deltas.append({**nulls, "tool_calls": [head]})
        deltas += [{"tool_calls": [{"index": k, "function": {"arguments": p}}]}
                   for p in cut(draw, arguments)]
    expected.finish = "tool_calls" if expected.tools else draw(st.sampled_from(["stop", "length"]))
    verbose = draw(st.booleans())  # OpenAI sends "logprobs": null, "finish_reason": null
    framing: dict[str, Any] = {"logprobs": None, "finish_reason": None} if verbose else {}
    choices = [{"index": index, "delta": d, **framing} for d in deltas]
    choices.append({"index": index, "delta": {}, **framing, "finish_reason": expected.finish})
    return expected, choices


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    indices = sorted(draw(st.sets(st.integers(0, 2), min_size=1, max_size=3)))
    expected: dict[int, Expected] = {}
    own: dict[int, list[dict[str, Any]]] = {}
    for index in indices:
        expected[index], own[index] = draw(choice_deltas(index))
    # Interleave the choices at random; each keeps its own order.
    order = draw(st.permutations([i for i in indices for _ in own[i]]))
    position = dict.fromkeys(indices, 0)
    datas: list[dict[str, Any]] = []
    for index in order:
        datas.append({**ENVELOPE, "choices": [own[index][position[index]]]})
        position[index] += 1
    usage = draw(st.booleans())
    if usage:
        datas.append({**ENVELOPE, "choices": [], "usage": dict(USAGE)})
    gaps = draw(st.lists(st.integers(0, 25), min_size=len(datas), max_size=len(datas)))
    times, now = [], 0
    for gap in gaps:
        now += gap
        times.append(now + 1)
    chunks = [Chunk.from_json(msgspec.json.encode(d)) for d in datas]  # as parsed upstream
    return Answer(chunks, times, expected, usage)


# -- random operator chains ------------------------------------------------------------------

operator_specs = st.one_of(
    st.tuples(st.just("coalesce"), st.integers(0, 40), st.sampled_from([1, 2, 3, 7, 4096])),
    st.tuples(st.just("throttle"), st.integers(1, 40)),
    st.tuples(st.just("pace"), st.sampled_from([0.5, 1.0, 3.0, 20.0]),
              st.sampled_from([0.0, 0.5, 5.0, 60.0]), st.sampled_from([0.5, 1.0, 4.0, 15.0])),
    st.tuples(st.just("total_timeout")),
    st.tuples(st.just("idle_timeout")),
    st.tuples(st.just("first_token_timeout")),
    st.tuples(st.just("retry")),
)
chains = st.lists(operator_specs, min_size=1, max_size=4)


def build(spec: tuple[Any, ...], scheduler: TestScheduler | None) -> Any:
    kw: dict[str, Any] = {"scheduler": scheduler}
    name = spec[0]
    if name == "coalesce":
        return coalesce(spec[1], spec[2], **kw)
    if name == "throttle":
        return throttle(spec[1], **kw)
    if name == "pace":
        return pace(spec[1], max_lag=spec[2], tick=spec[3], **kw)
    if name == "total_timeout":
        return total_timeout(NEVER, **kw)
    if name == "idle_timeout":
        return idle_timeout(NEVER, **kw)
    if name == "first_token_timeout":
        return first_token_timeout(NEVER, **kw)
    return retry_with_backoff(3, backoff_base=0, **kw)


def horizon(answer: Answer, chain: list[tuple[Any, ...]]) -> float:
    """Ticks after subscribing by which any run of the chain has ended, with room to spare.

    The last arrival, plus for each pace the time its rate needs for all the text
    and a tick per chunk, three times over. A stream still open then has hung (it
    is disposed and fails the "exactly one completion" check), and a hang costs
    little virtual time.
    """
    chars = sum(len(e.content) + len(e.reasoning) + sum(len(a) for _, a in e.tools.values())
                for e in answer.choices.values())
    slack = 50.0
    for spec in chain:
        if spec[0] == "pace":
            slack += 3 * (chars / spec[1] + (len(answer.chunks) + 2) * spec[3])
        elif spec[0] in ("coalesce", "throttle"):
            slack += spec[1]
    return answer.end + slack


def run(
    answer: Answer,
    chain: list[tuple[Any, ...]],
    explicit: bool,
    *,
    error_at: int | None = None,
    error: Exception | None = None,
) -> list[Message]:
    """The answer (cut before chunk ``error_at`` by ``error``) through the chain, recorded."""
    scheduler = TestScheduler()
    if error_at is None:
        messages = [on_next(t, c) for t, c in zip(answer.times, answer.chunks, strict=True)]
        messages.append(on_completed(answer.end))
    else:
        messages = [on_next(t, c) for t, c in zip(answer.times[:error_at],
                                                   answer.chunks[:error_at], strict=True)]
        last = answer.times[error_at - 1] if error_at else 0
        messages.append(on_error(last + (answer.times[error_at] - last) // 2, error or GONE))
    source = scheduler.create_cold_observable(*messages)

    def create() -> Observable[Chunk]:
        operators = [build(spec, scheduler if explicit else None) for spec in chain]
        return source.pipe(*operators)

    results = scheduler.start(create, disposed=SUBSCRIBED + horizon(answer, chain))
    out = []
    for recorded in results.messages:
        notification: Any = recorded.value
        payload = {"N": "value", "E": "exception"}.get(notification.kind)
        out.append(Message(recorded.time, notification.kind,
                           getattr(notification, payload) if payload else None))
    return out


# -- what a list of chunks says --------------------------------------------------------------


def atoms(chunks: list[Chunk]) -> list[Atom]:
    """The chunks flattened: one atom per character and per piece of framing, in order."""
    out: list[Atom] = []
    for chunk in chunks:
        for choice in chunk.choices:
            i = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if delta.get("role"):
                out.append((i, "role", delta["role"]))
            for call in delta.get("tool_calls") or []:
                k = call.get("index", 0)
                function = call.get("function") or {}
                if "id" in call or "name" in function:
                    out.append((i, "tool", k, call.get("id"), call.get("type"),
                                function.get("name")))
                out.extend((i, "arguments", k, ch) for ch in function.get("arguments") or "")
            for name in TEXT_FIELDS:
                value = delta.get(name)
                if isinstance(value, str):
                    out.extend((i, name, ch) for ch in value)
            if choice.get("finish_reason") is not None:
                out.append((i, "finish", choice["finish_reason"]))
        if chunk.usage is not None:
            out.append(("usage", msgspec.json.encode(chunk.usage)))
    return out


def said(chunks: list[Chunk]) -> dict[int, Expected]:
    """Per choice: the concatenated content, reasoning and tool-call arguments, and finish."""
    out: dict[int, Expected] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            got = out.setdefault(choice.get("index", 0), Expected(finish=""))
            delta = choice.get("delta") or {}
            got.content += delta.get("content") or ""
            got.reasoning += (delta.get("reasoning_content") or "") + (delta.get("reasoning") or "")
            for call in delta.get("tool_calls") or []:
                call_id, arguments = got.tools.get(call["index"], ("", ""))
                arguments += (call.get("function") or {}).get("arguments") or ""
                got.tools[call["index"]] = (call_id + (call.get("id") or ""), arguments)
            if choice.get("finish_reason") is not None:
                got.finish += choice["finish_reason"]
    return out


def values(messages: list[Message]) -> list[Chunk]:
    return [m.value for m in messages if m.kind == "N"]


def assert_same_answer(chunks: list[Chunk], answer: Answer) -> None:
    """``chunks`` say exactly what the answer says, in the same order."""
    got = said(chunks)
    assert got.keys() == answer.choices.keys()
    for index, expected in answer.choices.items():
        assert got[index].content == expected.content, index
        assert got[index].reasoning == expected.reasoning, index
        assert got[index].tools == expected.tools, index  # ids once, arguments whole
        assert got[index].finish == expected.finish, index  # exactly one finish
    # Order within each choice and across choices: role, reasoning, content, tool
    # calls, finish; the usage chunk last. Nothing lost, doubled or moved.
    assert atoms(chunks) == atoms(answer.chunks)
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == int(answer.usage)
    if answer.usage:
        assert chunks[-1].usage == USAGE and chunks[-1].choices == []
    for chunk in chunks:
        assert {k: chunk.data[k] for k in ENVELOPE} == ENVELOPE


def assert_prefix(
    chunks: list[Chunk], answer: Answer, sent: int, chain: list[tuple[Any, ...]]
) -> None:
    """``chunks`` say what the first ``sent`` chunks of the answer say: a prefix of it."""
    flat, whole = atoms(chunks), atoms(answer.chunks)
    assert flat == whole[: len(flat)]
    for index, got in said(chunks).items():
        expected = answer.choices[index]
        assert expected.content.startswith(got.content)
        assert expected.reasoning.startswith(got.reasoning)
        for k, (call_id, arguments) in got.tools.items():
            assert call_id in ("", expected.tools[k][0])
            assert expected.tools[k][1].startswith(arguments)
    # Errors flush what operators hold: everything sent before the error arrives,
    # except that retry_with_backoff drops the framing of an attempt that failed
    # before any content (no answer started; the error goes first).
    before = answer.chunks[:sent]
    if any(spec[0] == "retry" for spec in chain) and not any(c.has_content for c in before):
        assert flat == []
    else:
        assert flat == atoms(before)


def snapshot(answer: Answer) -> list[bytes]:
    return [msgspec.json.encode(c.data) for c in answer.chunks]


# -- 1-3: operator chains, slow-writer batches, ChunkBuffer -----------------------------------


@settings(max_examples=150, deadline=None)
@given(answers(), chains, st.booleans(), st.data())
def test_operator_chains_are_lossless_and_keep_order(
    answer: Answer, chain: list[tuple[Any, ...]], explicit: bool, data: st.DataObject
) -> None:
    before = snapshot(answer)
    messages = run(answer, chain, explicit)
    kinds = [m.kind for m in messages]
    times = [m.time for m in messages]
    assert kinds.count("C") == 1 and kinds[-1] == "C" and "E" not in kinds
    assert times == sorted(times)
    chunks = values(messages)
    assert_same_answer(chunks, answer)
    assert snapshot(answer) == before  # upstream chunks are never modified in place

    # A slow writer: the output arrives in random batches, each merged by coalesce_batch.
    max_chars = data.draw(st.sampled_from([1, 2, 5, 16, 4096]), label="batch max_chars")
    sizes = data.draw(st.lists(st.integers(1, 6), max_size=len(chunks)), label="batch sizes")
    batched: list[Chunk] = []
    start = 0
    for size in [*sizes, len(chunks)]:
        batched += coalesce_batch(chunks[start:start + size], max_chars)
        start += size
        if start >= len(chunks):
            break
    assert_same_answer(batched, answer)

    # A ChunkBuffer drained at random moments.
    buffer = ChunkBuffer(data.draw(st.sampled_from([None, 1, 3, 64]), label="buffer max_chars"))
    drains = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)),
                       label="drain after")
    buffered: list[Chunk] = []
    for chunk, drain in zip(chunks, drains, strict=True):
        buffer.append(chunk)
        if drain:
            buffered += buffer.drain()
    buffered += buffer.drain()
    assert len(buffer) == 0
    assert_same_answer(buffered, answer)
    assert snapshot(answer) == before


# -- 4: the upstream fails mid-stream ---------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(answers(), chains, st.booleans(), st.data())
def test_an_error_mid_stream_ends_a_lossless_prefix(
    answer: Answer, chain: list[tuple[Any, ...]], explicit: bool, data: st.DataObject
) -> None:
    sent = data.draw(st.integers(0, len(answer.chunks) - 1), label="chunks before the error")
    messages = run(answer, chain, explicit, error_at=sent, error=GONE)
    kinds = [m.kind for m in messages]
    times = [m.time for m in messages]
    assert kinds.count("E") == 1 and kinds[-1] == "E" and "C" not in kinds
    assert messages[-1].value is GONE
    assert times == sorted(times)
    assert_prefix(values(messages), answer, sent, chain)


# -- 5: events -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(answers(), chains, st.booleans())
def test_events_reassemble_the_answer_and_done_is_last(
    answer: Answer, chain: list[tuple[Any, ...]], explicit: bool
) -> None:
    messages = run(answer, chain, explicit)
    builder = EventBuilder()
    events: list[tuple[str, dict[str, Any]]] = []
    for message in messages:  # in arrival order, as the stream relays them
        if message.kind == "N":
            events += [("message", msgspec.json.decode(d))
                       for d in builder.deltas(message.value)]
        elif message.kind == "C":
            events.append(("done", msgspec.json.decode(builder.done(Ending()))))
    assert [kind for kind, _ in events].count("done") == 1 and events[-1][0] == "done"

    content: dict[int, str] = {}
    reasoning: dict[int, str] = {}
    roles: dict[int, list[str]] = {}
    tools: dict[int, dict[int, list[Any]]] = {}
    for _, event in events[:-1]:
        assert event.get("index", 0) != 0 or "index" not in event  # index only when not 0
        assert set(event) - {"index"}, event  # no empty deltas
        index = event.get("index", 0)
        content[index] = content.get(index, "") + event.get("content", "")
        reasoning[index] = reasoning.get(index, "") + event.get("reasoning", "")
        if "role" in event:
            roles.setdefault(index, []).append(event["role"])
        for call in event.get("tool_calls", []):
            ids, arguments = tools.setdefault(index, {}).setdefault(call["index"], [[], ""])
            function = call.get("function") or {}
            if "id" in call:
                ids.append((call["id"], function.get("name")))
            tools[index][call["index"]][1] = arguments + (function.get("arguments") or "")
    for index, expected in answer.choices.items():
        assert content.get(index, "") == expected.content, index
        assert reasoning.get(index, "") == expected.reasoning, index
        assert roles.get(index) == ["assistant"], index
        assert {k: (v[0], v[1]) for k, v in tools.get(index, {}).items()} == {
            k: ([(call_id, "f")], arguments)
            for k, (call_id, arguments) in expected.tools.items()
        }, index
    assert content.keys() <= answer.choices.keys()

    done = events[-1][1]
    reasons = {i: e.finish for i, e in answer.choices.items()}
    assert done["usage"] == (USAGE if answer.usage else None)
    if 0 in reasons:
        assert done["finish_reason"] == reasons[0]
    else:
        assert done["finish_reason"] in reasons.values()
    if len(reasons) > 1:
        assert done["finish_reasons"] == {str(i): r for i, r in sorted(reasons.items())}


# -- 6: throttle spaces its emissions ---------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(answers(), chains, st.integers(1, 40), st.booleans(), st.data())
def test_throttle_emits_at_most_once_per_interval(
    answer: Answer, chain: list[tuple[Any, ...]], interval: int, fail: bool,
    data: st.DataObject,
) -> None:
    sent = data.draw(st.integers(0, len(answer.chunks) - 1)) if fail else None
    messages = run(answer, [*chain, ("throttle", interval)], True, error_at=sent)
    end = messages[-1]
    assert end.kind == ("E" if fail else "C")
    # Emissions at the end's own time are the flush the completion or error causes.
    times = sorted({m.time for m in messages if m.kind == "N" and m.time != end.time})
    for earlier, later in pairwise(times):
        assert later - earlier >= interval - 1e-6, (earlier, later, interval)
    if fail:
        assert sent is not None
        assert_prefix(values(messages), answer, sent, chain)
    else:
        assert_same_answer(values(messages), answer)
