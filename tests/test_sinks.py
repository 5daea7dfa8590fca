"""The sinks a generation writes to: one reader's bounded backlog, the collector, the journal."""

from __future__ import annotations

import asyncio
import json

import pytest

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, StreamError
from streamsvc.journal.memory import MemoryJournal
from streamsvc.reactive.backpressure import Valve
from streamsvc.sse import SSEDecoder
from streamsvc.streams.sinks import WRITE_SLICE, Backlog, Collector, JournalSink
from streamsvc.wire import Ending
from streamsvc.wire.events import EventsEncoder
from streamsvc.wire.openai_chat import OpenAIChatEncoder


def text(content: str, index: int = 0) -> Chunk:
    data = {"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": {"content": content}, "finish_reason": None}]}
    return Chunk(data, json.dumps(data, separators=(",", ":")).encode())


def finish(reason: str = "stop") -> Chunk:
    return Chunk({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


def contents(frames: bytes) -> str:
    out = []
    for event in SSEDecoder().feed(frames):
        if event.data in ("[DONE]", ""):
            continue
        data = json.loads(event.data)
        for choice in data.get("choices", []):
            out.append(choice["delta"].get("content") or "")
        if "content" in data:
            out.append(data["content"])
    return "".join(out)


async def take_all(backlog: Backlog) -> bytes:
    out = b""
    while True:
        data, last = await backlog.take()
        out += data
        if last:
            return out


async def test_backlog_closes_the_valve_at_its_bound_and_opens_it_at_half() -> None:
    valve = Valve()
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=1000, valve=valve)
    while valve.is_open:
        backlog.put(text("x" * 50))
    assert not valve.is_open  # at the bound: the upstream is not read any more
    taken = 0
    while not valve.is_open:
        data, _ = await backlog.take()
        taken += len(data)
    assert taken >= 500  # half was taken before it opened again


async def test_backlog_bounds_what_it_holds_in_encoded_bytes() -> None:
    valve = Valve()
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=1000, valve=valve)
    frame = len(OpenAIChatEncoder(True).chunk(text("x" * 50)))
    for _ in range(1000 // frame):
        backlog.put(text("x" * 50))
    assert valve.is_open
    backlog.put(text("x" * 50))
    assert not valve.is_open


async def test_backlog_that_a_source_overruns_ends_with_slow_consumer() -> None:
    """A source that ignores the valve cannot grow the backlog past twice its bound."""
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=1000, valve=Valve())
    with pytest.raises(StreamError) as caught:
        for _ in range(1000):
            backlog.put(text("x" * 50))
    assert caught.value.code == ErrorCode.SLOW_CONSUMER
    backlog.fail(caught.value)
    frames = await take_all(backlog)
    last = SSEDecoder().feed(frames)[-1]
    assert json.loads(last.data)["error"]["code"] == "slow_consumer"


async def test_backlog_merges_what_waits_together_and_loses_nothing() -> None:
    backlog = Backlog(EventsEncoder("st_0123456789abcdef01234567", 1000), max_bytes=1 << 20,
                      valve=Valve(), coalesce_chars=4096)
    words = [f" w{i}" for i in range(300)]
    for word in words:
        backlog.put(text(word))
    backlog.put(finish())
    backlog.end(Ending(upstream="sim", attempts=1))
    frames = await take_all(backlog)
    events = SSEDecoder().feed(frames)
    assert contents(frames) == "".join(words)
    assert len(events) < 10  # merged, not 300 events
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    seqs = [int(str(e.id).rpartition(":")[2]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_backlog_takes_at_most_a_write_slice_at_a_time() -> None:
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=1 << 20, valve=Valve())
    for _ in range(2000):
        backlog.put(text("y" * 100))
    data, last = await backlog.take()
    assert len(data) <= WRITE_SLICE and not last


async def test_backlog_hands_a_frame_straight_to_an_idle_reader() -> None:
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=1 << 20, valve=Valve())
    written: list[bytes] = []
    backlog.direct = lambda frame: written.append(frame) is None
    backlog.put(text("a"))
    backlog.put(text("b"))
    assert contents(b"".join(written)) == "ab"
    backlog.direct = lambda frame: False  # the socket is full: queued, in order
    backlog.put(text("c"))
    backlog.direct = lambda frame: written.append(frame) is None
    backlog.put(text("d"))  # something waits before it: queued behind it, never first
    backlog.end(Ending())
    assert contents(b"".join(written) + await take_all(backlog)) == "abcd"


async def test_backlog_error_before_any_output_is_raised_for_an_http_status() -> None:
    backlog = Backlog(OpenAIChatEncoder(False), max_bytes=1000, valve=Valve())
    backlog.fail(StreamError("no", code=ErrorCode.SHUTTING_DOWN))
    with pytest.raises(StreamError):
        await backlog.wait_first(1)


async def test_backlog_wait_first_returns_at_the_first_output() -> None:
    backlog = Backlog(OpenAIChatEncoder(False), max_bytes=1000, valve=Valve())
    asyncio.get_running_loop().call_later(0.01, backlog.put, text("hi"))
    await backlog.wait_first(5)
    assert backlog.first.done()


async def test_backlog_end_opens_the_valve_and_the_end_gets_past_the_bound() -> None:
    valve = Valve()
    backlog = Backlog(OpenAIChatEncoder(True), max_bytes=300, valve=valve)
    backlog.put(text("z" * 300))
    assert not valve.is_open
    backlog.end(Ending())
    assert valve.is_open
    frames = await take_all(backlog)
    assert frames.endswith(b"data: [DONE]\n\n")


async def test_collector_builds_the_chat_completion() -> None:
    collector = Collector(max_bytes=1 << 20)
    collector.put(Chunk({"id": "x", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
    collector.put(text(" Hello"))
    collector.put(text(" there"))
    collector.put(Chunk({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "f", "arguments": "{\"a\""}}]}}]}))
    collector.put(Chunk({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ": 1}"}}]}}]}))
    collector.put(finish("tool_calls"))
    collector.put(Chunk({"id": "x", "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}))
    collector.end(Ending())
    answer = await collector.result
    assert answer["object"] == "chat.completion" and answer["id"] == "x"
    assert answer["model"] == "m" and answer["created"] == 1
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == " Hello there"
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
    assert choice["finish_reason"] == "tool_calls"
    assert answer["usage"]["total_tokens"] == 7


async def test_collector_past_its_bound_ends_with_journal_full() -> None:
    collector = Collector(max_bytes=1000)
    with pytest.raises(StreamError) as caught:
        for _ in range(100):
            collector.put(text("x" * 50))
    assert caught.value.code == ErrorCode.JOURNAL_FULL


async def test_journal_sink_numbers_events_in_the_journal() -> None:
    journal = MemoryJournal()
    await journal.create("st_1")
    sink = JournalSink(journal, "st_1")
    assert sink.put(text(" a"))
    assert not sink.put(Chunk({"choices": [{"index": 0, "delta": {}}]}))  # nothing to say
    sink.put(finish())
    sink.end(Ending(upstream="sim", attempts=2))
    events = await journal.read("st_1", 0)
    assert [e.kind for e in events] == ["message", "done"]
    done = json.loads(events[-1].data)
    assert done["finish_reason"] == "stop" and done["attempts"] == 2


async def test_memory_journal_bounds_a_stream_in_bytes() -> None:
    journal = MemoryJournal(max_bytes=1000)
    await journal.create("st_1")
    sink = JournalSink(journal, "st_1")
    with pytest.raises(StreamError) as caught:
        for _ in range(100):
            sink.put(text("x" * 50))
    assert caught.value.code == ErrorCode.JOURNAL_FULL
    sink.fail(caught.value)  # the end always gets in
    events = await journal.read("st_1", 0)
    assert events[-1].kind == "error"
    assert journal.size("st_1") is not None and (journal.size("st_1") or 0) < 1200
