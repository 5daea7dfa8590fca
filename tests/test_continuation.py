"""Mid-stream continuation: an answer whose upstream fails after content is finished by the
next attempt, with nothing repeated (``pipeline.continue_on_failure``).

The simulator continues: a request whose last message is an assistant message
that its answer begins with streams the rest. ``fail_times: 1`` (per
``key``) makes the fault strike the first request for a prompt only.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from streamsvc.config import load_config
from streamsvc.errors import ConfigError
from streamsvc.reactive.operators._continue import MIN_OVERLAP, overlap
from streamsvc.simulator import SimulatorServer, echo_tokens, generated_tokens
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.usage import estimate_tokens
from tests.conftest import FakeUpstream, RunningServer, StartServer, relay_overrides
from tests.test_openai_endpoint import TORTURE
from tests.test_usage import tokens, wait_for_answers

FAST = {"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 20}


def _cut(key: str, at: int = 7, times: int = 1) -> dict[str, Any]:
    return {"fault": "drop", "fault_at": at, "fail_times": times, "key": key}


def _body(key: str, text: str = TORTURE, **simulate: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}],
            "simulate": {**_cut(key), **simulate}}


async def _relay(start_server: StartServer, simulator: SimulatorServer, *,
                 on: bool = True, **pipeline: Any) -> RunningServer:
    return await start_server(overrides=relay_overrides(
        simulator.url, pipeline={**FAST, "continue_on_failure": on, **pipeline}))


async def _events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
                  ) -> list[ServerSentEvent]:
    async with session.post(url + "/v1/chat/stream", json=body) as response:
        return SSEDecoder().feed(await response.read())


def _text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data).get("content", "") for e in events if e.event == "message")


async def test_a_cut_after_seven_tokens_is_continued_byte_for_byte_on_chat_stream(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator)
    events = await _events(session, relay.url, _body("stream"))
    assert _text(events) == TORTURE
    seams = [json.loads(e.data) for e in events if e.event == "failover"]
    before = "".join(echo_tokens(TORTURE)[:7])
    assert seams == [{"from": "sim", "to": "sim", "code": "upstream_error",
                      "delivered_chars": len(before), "overlap_removed": 0}]
    seam_at = [e.event for e in events].index("failover")
    assert _text(events[:seam_at]) == before
    # The continuation's framing (its role-only first delta) is not repeated after the seam.
    assert all("role" not in json.loads(e.data) for e in events[seam_at + 1:])
    assert events[-1].event == "done" and json.loads(events[-1].data)["finish_reason"] == "stop"
    assert simulator.stats.requests == 2
    second = simulator.stats.recent[-1]["body"]["messages"]
    assert second[:-1] == [{"role": "user", "content": TORTURE}]
    assert second[-1] == {"role": "assistant", "content": before}


async def test_the_openai_sdk_sees_one_unbroken_answer(
    start_server: StartServer, simulator: SimulatorServer,
) -> None:
    relay = await _relay(start_server, simulator)
    async with openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="x",
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="echo", stream=True, messages=[{"role": "user", "content": TORTURE}],
            extra_body={"simulate": _cut("sdk")})
        chunks = [chunk async for chunk in stream]  # the loop ends normally
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TORTURE
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert simulator.stats.requests == 2


async def test_a_resumable_stream_is_continued_and_shows_the_seam(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator)
    async with session.post(relay.url + "/v1/streams", json=_body("resumable")) as response:
        created = await response.json()
    async with session.get(relay.url + created["events_url"]) as response:
        events = SSEDecoder().feed(await response.read())
    assert _text(events) == TORTURE
    assert [e.event for e in events].count("failover") == 1
    seqs = [int(str(e.id).rpartition(":")[2]) for e in events if e.id]
    assert seqs == list(range(1, len(seqs) + 1))  # the seam is a numbered event too
    assert simulator.stats.requests == 2


async def test_with_continuation_off_the_same_cut_ends_with_the_typed_error(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, on=False)
    events = await _events(session, relay.url, _body("off"))
    assert _text(events) == "".join(echo_tokens(TORTURE)[:7])
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "upstream_error"
    assert simulator.stats.requests == 1


async def test_a_route_can_turn_continuation_off(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await start_server(overrides={
        "upstreams": {"sim": {"base_url": simulator.url}},
        "routes": [{"model": "echo", "upstreams": ["sim"], "continue_on_failure": False},
                   {"model": "*", "upstreams": ["sim"]}],
        "pipeline": {**FAST, "continue_on_failure": True},
    })
    events = await _events(session, relay.url, _body("route"))
    assert events[-1].event == "error" and simulator.stats.requests == 1


async def test_a_continuation_that_fails_counts_as_the_next_attempt(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    text = "".join(generated_tokens("sim-small", "story", 60))
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "story"}],
            "simulate": {"tokens": 60, **_cut("twice", at=7, times=2)}}
    relay = await _relay(start_server, simulator)  # retry_max_attempts = 3
    events = await _events(session, relay.url, body)
    assert _text(events) == text
    assert [e.event for e in events].count("failover") == 2
    assert simulator.stats.requests == 3

    relay = await _relay(start_server, simulator, retry_max_attempts=2)
    body["simulate"]["key"] = "twice-again"
    events = await _events(session, relay.url, body)
    assert events[-1].event == "error"  # attempts ran out: the last failure's error
    assert json.loads(events[-1].data)["code"] == "upstream_error"
    assert text.startswith(_text(events)) and _text(events) != text


async def test_the_continuation_body_adapts_the_request_per_upstream(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await start_server(overrides={
        "upstreams": {"sim": {"base_url": simulator.url, "continuation_body": {
            "continue_final_message": True, "add_generation_prompt": False}}},
        "routes": [{"model": "*", "upstreams": ["sim"]}],
        "pipeline": {**FAST, "continue_on_failure": True},
    })
    events = await _events(session, relay.url, _body("vllm"))
    assert _text(events) == TORTURE
    first, second = [r["body"] for r in list(simulator.stats.recent)[-2:]]
    assert "continue_final_message" not in first
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False


async def test_usage_counts_both_attempts(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator)
    await _events(session, relay.url, _body("usage"))
    found = await wait_for_answers(session, relay.url, "anonymous", 1)
    before = "".join(echo_tokens(TORTURE)[:7])
    # The first attempt sent no usage (it was cut): estimated; the second reported its own.
    rest = len(echo_tokens(TORTURE)) - 7
    assert tokens(found, "anonymous", "completion") == estimate_tokens(len(before)) + rest
    assert tokens(found, "anonymous", "completion", estimated=True) > 0


async def _tools_then_cut(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for delta in ({"content": "Let me check."},
                  {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                   "function": {"name": "f", "arguments": "{"}}]}):
        chunk = {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    assert request.transport is not None
    request.transport.abort()
    return response


async def test_an_answer_with_tool_calls_is_not_continued(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession,
) -> None:
    url = await fake_upstream(_tools_then_cut)
    relay = await start_server(overrides=relay_overrides(
        url, pipeline={**FAST, "continue_on_failure": True}))
    events = await _events(session, relay.url, {
        "model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert events[-1].event == "error" and "failover" not in [e.event for e in events]


async def _repeating(request: web.Request) -> web.StreamResponse:
    """Cut after its first two deltas; asked to continue, it repeats the end, then goes on."""
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    continuing = body["messages"][-1]["role"] == "assistant"
    deltas = ([" the end of part one.", " Part two", " follows."] if continuing
              else ["Here is", " the end of part one."])
    for text in deltas:
        chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": text},
                                         "finish_reason": None}]}
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    if not continuing:
        assert request.transport is not None
        request.transport.abort()
        return response
    last = {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await response.write(b"data: " + msgspec.json.encode(last) + b"\n\ndata: [DONE]\n\n")
    return response


async def test_a_continuation_that_repeats_the_tail_has_the_overlap_removed(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession,
) -> None:
    url = await fake_upstream(_repeating)
    relay = await start_server(overrides=relay_overrides(
        url, pipeline={**FAST, "continue_on_failure": True}))
    events = await _events(session, relay.url, {
        "model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert _text(events) == "Here is the end of part one. Part two follows."
    (seam,) = [json.loads(e.data) for e in events if e.event == "failover"]
    assert seam["overlap_removed"] == len(" the end of part one.")


@pytest.mark.parametrize(("delivered", "text", "expected"), [
    ("The sky is blue today.", " blue today. And then", (True, len(" blue today."))),
    ("The sky is blue today.", " And then", (True, 0)),
    ("The sky is blue today.", " today", (False, 0)),  # could still be a repeat
    ("The sky is blue today.", "y.", (True, 0)),  # a repeat shorter than MIN_OVERLAP stays
    ("", "anything", (True, 0)),
    ("abcabcabcabc", "abcabcabcabc!", (True, 12)),  # the longest repeat is removed
], ids=["repeat", "none", "undecided", "short", "empty", "longest"])
def test_the_overlap_rule(delivered: str, text: str, expected: tuple[bool, int]) -> None:
    assert overlap(delivered, text) == expected
    assert MIN_OVERLAP == 8


def test_a_continuation_body_that_is_not_a_table_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={
            "upstreams": {"a": {"base_url": "http://127.0.0.1:1/v1",
                                "continuation_body": "yes"}},
            "routes": [{"model": "*", "upstreams": ["a"]}]})
    assert caught.value.key == "upstreams.a.continuation_body"
