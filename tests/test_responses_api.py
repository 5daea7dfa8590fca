"""The OpenAI Responses API (``POST /v1/responses``) over a chat-completions upstream.

Driven by the official openai SDK over real sockets, against the simulator
(and a hand-written upstream for tool calls and reasoning text).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from streamsvc.server.state import METRICS
from streamsvc.simulator import SimulatorServer, echo_tokens, generated_tokens
from streamsvc.sse import SSEDecoder
from tests.conftest import FakeUpstream, RunningServer, StartServer, relay_overrides, wait_until
from tests.test_openai_endpoint import TORTURE


def _sdk(relay: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="x", max_retries=0)


def _story(tokens: int) -> str:
    return "".join(generated_tokens("sim-small", "tell me a story", tokens))


async def _events(stream: Any) -> list[Any]:
    return [event async for event in stream]


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


LIFECYCLE = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added",
]
CLOSING = ["response.output_text.done", "response.content_part.done",
           "response.output_item.done", "response.completed"]


async def test_sdk_stream_gives_typed_events_in_sequence_and_the_exact_text(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        events = await _events(await client.responses.create(
            model="echo", input=TORTURE, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == LIFECYCLE and types[-4:] == CLOSING
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert _text(events) == TORTURE
    created, completed = events[0].response, events[-1].response
    assert completed.id == created.id and completed.id.startswith("resp_")
    assert completed.status == "completed" and completed.output_text == TORTURE
    assert completed.usage is not None
    assert completed.usage.output_tokens == len(echo_tokens(TORTURE))
    assert completed.usage.total_tokens == (completed.usage.input_tokens
                                            + completed.usage.output_tokens)
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {completed.output[0].id}
    assert simulator.stats.requests == 1


async def test_sdk_stream_helper_and_non_streamed_output_text_are_exact(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        async with client.responses.stream(model="echo", input=TORTURE) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
        assert final.output_text == TORTURE and final.status == "completed"
        answer = await client.responses.create(model="echo", input=TORTURE)
    assert answer.object == "response" and answer.status == "completed"
    assert answer.output_text == TORTURE
    assert answer.usage is not None and answer.usage.output_tokens > 0
    assert simulator.stats.requests == 2


async def test_instructions_and_earlier_turns_reach_the_upstream_in_order(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        answer = await client.responses.create(
            model="echo", instructions="Be brief.",
            input=[
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Say "},
                             {"type": "input_text", "text": "this back"}]},
            ],
        )
    assert answer.output_text == "Say this back"
    assert simulator.stats.recent[-1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Say this back"},
    ]


async def test_previous_response_id_continues_the_conversation_from_the_journal(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        first = await client.responses.create(model="echo", input="first turn",
                                              instructions="only for the first")
        second = await client.responses.create(model="echo", input="second turn",
                                               previous_response_id=first.id)
    assert second.output_text == "second turn"
    assert simulator.stats.recent[-1]["body"]["messages"] == [
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": "first turn"},
        {"role": "user", "content": "second turn"},
    ]
    assert second.previous_response_id == first.id


async def test_background_stream_dropped_then_resumed_by_sequence_number(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    tokens = 200
    async with _sdk(relay) as client:
        stream = await client.responses.create(
            model="sim-small", input="tell me a story", stream=True, background=True,
            extra_body={"simulate": {"tokens": tokens, "rate": 200}})
        seen = []
        async for event in stream:
            seen.append(event)
            if len(seen) == 8:
                break
        await stream.close()  # the client leaves: a background response goes on
        response_id = seen[0].response.id
        rest = await _events(await client.responses.retrieve(
            response_id, stream=True, starting_after=seen[-1].sequence_number))
        numbers = [e.sequence_number for e in seen + rest]
        assert numbers == list(range(len(numbers)))  # none twice, none missing
        assert rest[-1].type == "response.completed"
        assert _text(seen + rest) == _story(tokens)
        state = await client.responses.retrieve(response_id)
        assert state.status == "completed" and state.output_text == _story(tokens)
        # From the start again, and from the last event: the journal keeps them all.
        again = await _events(await client.responses.retrieve(response_id, stream=True))
        assert [e.sequence_number for e in again] == list(range(len(numbers)))
    assert simulator.stats.requests == 1 and simulator.stats.disconnected == 0


async def test_background_without_stream_returns_at_once_and_is_retrieved(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        started = await client.responses.create(
            model="sim-small", input="tell me a story", background=True,
            extra_body={"simulate": {"tokens": 40, "rate": 100}})
        assert started.status == "in_progress" and started.background
        for _ in range(100):
            state = await client.responses.retrieve(started.id)
            if state.status != "in_progress":
                break
            await asyncio.sleep(0.05)
    assert state.status == "completed" and state.output_text == _story(40)


async def test_cancel_stops_the_upstream_and_ends_the_response_cancelled(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        started = await client.responses.create(
            model="sim-small", input="tell me a story", background=True,
            extra_body={"simulate": {"tokens": 2000, "rate": 20}})
        assert await wait_until(lambda: simulator.stats.active == 1)
        cancelled = await client.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=2)
        events = await _events(await client.responses.retrieve(started.id, stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"
    assert all(e.type != "response.completed" for e in events)


async def test_a_client_that_leaves_a_foreground_stream_cancels_the_upstream(
    relay: RunningServer, simulator: SimulatorServer,
) -> None:
    async with _sdk(relay) as client:
        stream = await client.responses.create(
            model="sim-small", input="tell me a story", stream=True,
            extra_body={"simulate": {"tokens": 2000, "rate": 50}})
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
    assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=2)


async def test_an_upstream_cut_mid_answer_ends_with_response_failed(
    relay: RunningServer,
) -> None:
    async with _sdk(relay) as client:
        events = await _events(await client.responses.create(
            model="sim-small", input="tell me a story", stream=True,
            extra_body={"simulate": {"tokens": 50, "fault": "drop", "fault_at": 7}}))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.code == "upstream_error"
    assert all(e.type != "response.completed" for e in events)
    assert _text(events) == _story(7)
    # The open item was closed, incomplete: the SDK's helpers need every item closed.
    assert [e.type for e in events[-4:-1]] == CLOSING[:3]
    assert events[-2].item.status == "incomplete"


async def test_max_output_tokens_ends_with_response_incomplete(relay: RunningServer) -> None:
    async with _sdk(relay) as client:
        events = await _events(await client.responses.create(
            model="sim-small", input="tell me a story", stream=True, max_output_tokens=5))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert _text(events) == _story(5)


async def test_an_error_before_any_output_is_an_http_status_when_not_streamed(
    relay: RunningServer,
) -> None:
    async with _sdk(relay) as client:
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(
                model="echo", input="x", extra_body={"simulate": {"fault": "429"},
                                                     "streamsvc": {"retries": False}})


async def _tool_and_reasoning_upstream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    deltas: list[dict[str, Any]] = [
        {"role": "assistant"},
        {"reasoning_content": "Let me"}, {"reasoning_content": " think."},
        {"content": "Calling."},
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]},
    ]
    for delta in deltas:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    last = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    await response.write(b"data: " + msgspec.json.encode(last) + b"\n\ndata: [DONE]\n\n")
    return response


async def test_reasoning_text_and_function_calls_become_their_output_items(
    start_server: StartServer, fake_upstream: FakeUpstream,
) -> None:
    url = await fake_upstream(_tool_and_reasoning_upstream)
    relay = await start_server(overrides=relay_overrides(url))
    async with _sdk(relay) as client:
        async with client.responses.stream(
            model="m", input="weather?", tools=[{
                "type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call"]
    reasoning, message, call = final.output
    assert reasoning.content[0].text == "Let me think."
    assert message.content[0].text == "Calling."
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_a",
                                                          '{"city": "Oslo"}')
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"city": "Oslo"}'
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "echo", "input": [{"type": "image_generation_call", "id": "x"}]}, "input[0].type"),
    ({"model": "echo", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"model": "echo", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "echo", "input": "x", "conversation": "c1"}, "conversation"),
    ({"model": "echo", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "echo"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "echo", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "echo", "input": "x", "previous_response_id": "nope"}, "previous_response_id"),
], ids=["item-type", "part-type", "builtin-tool", "unknown-field", "role", "no-input",
        "no-model", "max-tokens", "previous-id-form"])
async def test_bad_requests_are_400_naming_the_field(
    relay: RunningServer, session: aiohttp.ClientSession, body: dict[str, Any], param: str,
) -> None:
    async with session.post(relay.url + "/v1/responses", json=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_unknown_or_gone_ids_are_404_and_a_bad_starting_after_400(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    gone = "resp_" + "0" * 24
    async with session.post(relay.url + "/v1/responses", json={
            "model": "echo", "input": "x", "previous_response_id": gone}) as response:
        assert response.status == 404
        assert (await response.json())["error"]["param"] == "previous_response_id"
    for path in (f"/v1/responses/{gone}", "/v1/responses/not-an-id",
                 f"/v1/responses/{gone}?stream=true"):
        async with session.get(relay.url + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "not_found"
    async with session.post(relay.url + f"/v1/responses/{gone}/cancel") as response:
        assert response.status == 404
    async with session.post(relay.url + "/v1/responses",
                            json={"model": "echo", "input": "x"}) as response:
        response_id = (await response.json())["id"]
    for bad in ("x", "-1", "1.5", "²", "99999"):
        async with session.get(relay.url + f"/v1/responses/{response_id}",
                               params={"stream": "true", "starting_after": bad}) as response:
            assert response.status == 400, bad
            assert (await response.json())["error"]["param"] == "starting_after"


async def test_store_false_is_not_retrievable(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.post(relay.url + "/v1/responses",
                            json={"model": "echo", "input": "x", "store": False}) as response:
        answer = await response.json()
    assert answer["output"][0]["content"][0]["text"] == "x"
    async with session.get(relay.url + f"/v1/responses/{answer['id']}") as response:
        assert response.status == 404


async def test_wire_format_is_event_and_data_with_the_same_type(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.post(relay.url + "/v1/responses",
                            json={"model": "echo", "input": "a b", "stream": True}) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = SSEDecoder().feed(await response.read())
    assert events and all(json.loads(e.data)["type"] == e.event for e in events)
    assert all(e.id in ("", None) for e in events)  # resumed by sequence_number, not by id
    metrics = relay.app[METRICS].render().decode()
    assert 'streamsvc_streams_started_total{kind="responses"} 1.0' in metrics


@pytest.mark.parametrize(("raw", "param"), [
    (b"[" * 100_000, "body"),
    (b'{"model": "echo", "input": "x", "temperature": 1e999}', "temperature"),
    (b'{"model": "echo", "input": "x", "top_p": NaN}', "body"),
    (b"", "body"),
], ids=["deep", "out-of-range", "nan", "empty"])
async def test_bad_bodies_are_400s_like_on_the_chat_endpoints(
    relay: RunningServer, session: aiohttp.ClientSession, raw: bytes, param: str,
) -> None:
    async with session.post(relay.url + "/v1/responses", data=raw,
                            headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == param
