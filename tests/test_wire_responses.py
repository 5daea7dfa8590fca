"""The Responses API's events made from chat-completion chunks (streamsvc.wire.responses)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamsvc.chunks import Chunk
from streamsvc.wire import Ending
from streamsvc.wire.responses import ResponseEvents


def chunk(delta: dict[str, Any], *, finish: str | None = None, usage: Any = None) -> Chunk:
    data: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        data["usage"] = usage
    return Chunk(data)


def text_alone(delta: dict[str, Any]) -> Chunk:
    """The chunk as the upstream decoder makes it: marked as text alone when it is."""
    one = chunk(delta)
    if list(delta) == ["content"]:
        return Chunk.of_text(json.dumps(one.data).encode(), delta["content"])
    return one


def events_of(chunks: list[Chunk]) -> list[tuple[str, Any]]:
    events = ResponseEvents({"id": "resp_1", "object": "response", "model": "m"},
                            prompt_tokens=5)
    out = events.start()
    for one in chunks:
        out += events.chunk(one)
    out += events.done(Ending(upstream="u", attempts=1))
    return [(kind, json.loads(data)) for kind, data in out]


CALL = {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}
SCENARIOS = {
    "text": [{"content": "Hello"}, {"content": ","}, {"content": " world"}],
    "empty pieces": [{"content": ""}, {"content": "a"}, {"content": ""}, {"content": "b"}],
    "reasoning, then text": [{"reasoning_content": "think"}, {"content": "An"}, {"content": "swer"}],
    "text, a call, text": [{"content": "a"}, CALL, {"content": "b"}, {"content": "c"}],
    "non-ASCII": [{"content": "h\u00e9"}, {"content": "\u4f60\u597d"}, {"content": "\U0001f600\n"}],
}


@pytest.mark.parametrize("deltas", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_a_text_piece_gives_the_events_of_the_general_path(
    deltas: list[dict[str, Any]],
) -> None:
    # One text piece of choice 0 takes a short path (the chunk the upstream decoder marks as
    # text alone); the same piece with a field that adds nothing (refusal: null) takes the
    # general one. The events must be the same.
    fast = [text_alone(delta) for delta in deltas]
    assert any(one.text for one in fast)  # the short path is taken
    general = [chunk({**delta, "refusal": None}) for delta in deltas]
    assert events_of(fast) == events_of(general)
    completed = events_of(fast)[-1][1]["response"]
    assert completed["status"] == "completed"
    assert completed["usage"] == events_of(general)[-1][1]["response"]["usage"]


def test_text_deltas_carry_increasing_sequence_numbers_and_the_whole_text_at_the_end() -> None:
    events = events_of([chunk({"content": piece}) for piece in ("To", " be", ",", " or")])
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for kind, data in events if kind == "response.output_text.delta"]
    assert [data["delta"] for data in deltas] == ["To", " be", ",", " or"]
    assert all(data["logprobs"] == [] and data["output_index"] == 0 for data in deltas)
    (done,) = [data for kind, data in events if kind == "response.output_text.done"]
    assert done["text"] == "To be, or"


def test_a_piece_with_a_finish_or_usage_is_not_taken_as_a_plain_piece() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    events = events_of([chunk({"content": "a"}), chunk({"content": "b"}, finish="length"),
                        chunk({"content": "c"}, usage=usage)])
    kind, final = events[-1]
    assert kind == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["usage"]["input_tokens"] == 7
    assert final["response"]["usage"]["output_tokens"] == 3


def test_a_shared_meter_counts_each_chunk_once_and_its_carried_usage_shows() -> None:
    """With the stream's meter (the generation counts into it first), the response's
    usage is that meter's: no chunk counted twice, a continuation's carried usage kept."""
    from streamsvc.usage import UsageMeter

    pieces = [chunk({"content": "x" * 40}), chunk({"content": "y" * 40}, finish="stop")]
    alone = ResponseEvents({"id": "resp_1", "object": "response"}, prompt_tokens=5)
    meter = UsageMeter()
    shared = ResponseEvents({"id": "resp_2", "object": "response"}, prompt_tokens=5,
                            meter=meter)
    meter.add(pieces[0])
    meter.seam(5)  # the answer went on from another attempt after the first piece
    for piece in pieces:
        alone.chunk(piece)
        if piece is not pieces[0]:
            meter.add(piece)
        shared.chunk(piece)
    by_itself = alone.snapshot("completed")["usage"]
    with_meter = shared.snapshot("completed")["usage"]
    assert by_itself["output_tokens"] == with_meter["output_tokens"] == 20  # 80 chars / 4
    assert with_meter["input_tokens"] > by_itself["input_tokens"]  # the continuation's prompt
