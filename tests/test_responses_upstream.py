"""An upstream that speaks the Responses API (``api = "responses"``).

The upstream here is a second streamsvc (its own ``/v1/responses``, in front
of the simulator): every endpoint of the first is served from it, by the
reverse translation.
"""

from __future__ import annotations

import json

import aiohttp
import openai

from streamsvc.server.state import METRICS
from streamsvc.simulator import SimulatorServer, generated_tokens
from streamsvc.sse import SSEDecoder
from tests.conftest import RunningServer, StartServer
from tests.test_openai_endpoint import TORTURE


async def _front(start_server: StartServer, back: RunningServer) -> RunningServer:
    return await start_server(overrides={
        "upstreams": {"back": {"base_url": back.url + "/v1", "api": "responses"}},
        "routes": [{"model": "*", "upstreams": ["back"]}],
    })


def _responses_started(server: RunningServer) -> str:
    return server.app[METRICS].render().decode()


async def test_every_endpoint_is_served_from_a_responses_upstream(
    start_server: StartServer, relay: RunningServer, simulator: SimulatorServer,
    session: aiohttp.ClientSession,
) -> None:
    front = await _front(start_server, relay)
    async with openai.AsyncOpenAI(base_url=front.url + "/v1", api_key="x",
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="echo", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": "be exact"},
                      {"role": "user", "content": TORTURE}])
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == TORTURE
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": TORTURE}])
        assert answer.choices[0].message.content == TORTURE
        response = await client.responses.create(model="echo", input=TORTURE)
        assert response.output_text == TORTURE
    async with session.post(front.url + "/v1/chat/stream", json={
            "model": "echo", "messages": [{"role": "user", "content": TORTURE}]}) as reply:
        events = SSEDecoder().feed(await reply.read())
    assert "".join(json.loads(e.data).get("content", "") for e in events
                   if e.event == "message") == TORTURE
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    # The back end was asked in the Responses API, instructions and turns in order.
    assert 'streamsvc_streams_started_total{kind="responses"} 4.0' in _responses_started(relay)
    assert simulator.stats.recent[0]["body"]["messages"] == [
        {"role": "system", "content": "be exact"}, {"role": "user", "content": TORTURE}]


async def test_a_responses_upstream_that_fails_mid_answer_is_an_upstream_error(
    start_server: StartServer, relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    front = await _front(start_server, relay)
    async with session.post(front.url + "/v1/chat/stream", json={
            "model": "sim-small", "messages": [{"role": "user", "content": "tell me a story"}],
            "simulate": {"tokens": 40, "fault": "drop", "fault_at": 5}}) as reply:
        events = SSEDecoder().feed(await reply.read())
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "upstream_error"
    text = "".join(json.loads(e.data).get("content", "") for e in events if e.event == "message")
    assert text == "".join(generated_tokens("sim-small", "tell me a story", 5))


async def test_a_responses_upstream_cut_by_max_tokens_finishes_with_length(
    start_server: StartServer, relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    front = await _front(start_server, relay)
    async with session.post(front.url + "/v1/chat/completions", json={
            "model": "sim-small", "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "tell me a story"}]}) as reply:
        body = (await reply.read()).decode()
    frames = [json.loads(line[6:]) for line in body.splitlines()
              if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in frames if c["choices"]][-1] == "length"
