"""The ``[pipeline]`` operators end to end: timeouts, fallback, throttle and pace over HTTP.

The relay runs in front of the standalone simulator (and, for a stalled
primary, a hand-written upstream); clients read real sockets. What is
checked is what a client can see: the text, the final event, the headers,
and whether the upstream request was cancelled.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from streamsvc.server.state import METRICS
from streamsvc.simulator import SimulatorServer, echo_tokens
from tests.conftest import FakeUpstream, RunningServer, StartServer, relay_overrides, wait_until
from tests.helpers import Read, expected, read_events, story
from tests.test_openai_endpoint import _content, _raw_events

FAST_RETRIES = {"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 50}


def _body(text: str = "hello there, how are you?", model: str = "echo",
          **simulate: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if simulate:
        body["simulate"] = simulate
    return body


async def _relay(start_server: StartServer, simulator: SimulatorServer,
                 **pipeline: Any) -> RunningServer:
    return await start_server(overrides=relay_overrides(simulator.url, pipeline=pipeline))


async def _chat_stream(session: aiohttp.ClientSession, relay: RunningServer,
                       body: dict[str, Any]) -> Read:
    async with session.post(relay.url + "/v1/chat/stream", json=body) as response:
        return await read_events(response)


class StalledUpstream:
    """An upstream that answers 200 and a role chunk, then no content until the relay leaves."""

    def __init__(self) -> None:
        self.requests = 0
        self.cancelled = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        role = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "echo",
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(role).encode() + b"\n\n")
        # Comments keep the connection busy (as some upstreams do while thinking).
        # The relay hanging up cancels this handler (aiohttp_server runs it with
        # handler_cancellation), or fails the next write when that comes first.
        for _ in range(600):
            try:
                await asyncio.sleep(0.05)
                await response.write(b": thinking\n\n")
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            except ConnectionError:
                self.cancelled += 1
                break
        return response


@pytest.fixture
async def stalled(fake_upstream: FakeUpstream) -> tuple[StalledUpstream, str]:
    upstream = StalledUpstream()
    return upstream, await fake_upstream(upstream.handler)


async def _with_fallback(start_server: StartServer, stalled_url: str, simulator: SimulatorServer,
                         **pipeline: Any) -> RunningServer:
    return await start_server(overrides={
        "upstreams": {"stalled": {"base_url": stalled_url}, "sim": {"base_url": simulator.url}},
        "routes": [{"model": "*", "upstreams": ["stalled", "sim"]}],
        "pipeline": {"first_token_timeout_s": 0.3, **FAST_RETRIES, **pipeline},
    })


# -- first-token timeout and fallback -----------------------------------------------------------


async def test_first_token_timeout_falls_back_to_the_next_upstream(
    start_server: StartServer, simulator: SimulatorServer,
    stalled: tuple[StalledUpstream, str], session: aiohttp.ClientSession,
) -> None:
    upstream, url = stalled
    relay = await _with_fallback(start_server, url, simulator)
    read = await _chat_stream(session, relay, _body())
    assert read.text == "".join(echo_tokens("hello there, how are you?"))
    done = read.final()
    assert read.events[-1].event == "done"
    assert done["upstream"] == "sim" and done["attempts"] == 2
    # The stalled primary got one request (a timeout is not retried on it), cancelled.
    assert upstream.requests == 1
    assert await wait_until(lambda: upstream.cancelled == 1)
    # The role chunk the stalled upstream sent is not repeated by the fallback's own.
    roles = [e for e in read.events if "role" in json.loads(e.data)]
    assert len(roles) == 1


async def test_openai_headers_name_the_upstream_that_answered_and_the_attempts(
    start_server: StartServer, simulator: SimulatorServer,
    stalled: tuple[StalledUpstream, str], session: aiohttp.ClientSession,
) -> None:
    _, url = stalled
    relay = await _with_fallback(start_server, url, simulator)
    body = {**_body(), "stream": True}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["X-Streamsvc-Upstream"] == "sim"
        assert response.headers["X-Streamsvc-Attempts"] == "2"
        _, events = await _raw_events(response)
    assert _content(events) == "".join(echo_tokens("hello there, how are you?"))


async def test_first_token_timeout_on_the_last_upstream_is_504_before_the_headers(
    start_server: StartServer, stalled: tuple[StalledUpstream, str],
    session: aiohttp.ClientSession,
) -> None:
    upstream, url = stalled
    relay = await start_server(overrides={
        **relay_overrides(url), "pipeline": {"first_token_timeout_s": 0.2},
    })
    body = {**_body(), "stream": True}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 504
        error = (await response.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "first_token_timeout" in error["message"]
    assert await wait_until(lambda: upstream.cancelled == 1)


async def test_with_retries_off_a_first_token_timeout_still_gets_its_status(
    start_server: StartServer, stalled: tuple[StalledUpstream, str],
    session: aiohttp.ClientSession,
) -> None:
    # The stalled upstream's role chunk must not send the 200 headers on its own.
    _, url = stalled
    relay = await start_server(overrides={
        **relay_overrides(url), "pipeline": {"first_token_timeout_s": 0.2},
    })
    body = {**_body(), "stream": True, "streamsvc": {"retries": False}}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_first_token_timeout_is_an_error_event_on_the_streamsvc_format(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, first_token_timeout_s=0.2)
    read = await _chat_stream(session, relay, story(5, first_token_delay=5))
    assert read.events[-1].event == "error"
    assert read.final()["code"] == "upstream_timeout"
    assert read.text == ""
    assert await wait_until(lambda: simulator.stats.active == 0)


async def test_retries_off_means_no_fallback_on_first_token_timeout(
    start_server: StartServer, simulator: SimulatorServer,
    stalled: tuple[StalledUpstream, str], session: aiohttp.ClientSession,
) -> None:
    upstream, url = stalled
    relay = await _with_fallback(start_server, url, simulator)
    body = {**_body(), "streamsvc": {"retries": False}}
    read = await _chat_stream(session, relay, body)
    assert read.final()["code"] == "upstream_timeout"
    assert simulator.stats.requests == 0 and upstream.requests == 1


# -- idle and total timeouts --------------------------------------------------------------------


async def test_idle_timeout_ends_a_hung_stream_after_its_text(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, idle_timeout_s=0.3)
    read = await _chat_stream(session, relay, story(20, fault="hang", fault_at=4))
    assert read.text == expected(4)
    assert read.events[-1].event == "error"
    assert read.final()["code"] == "idle_timeout"
    assert await wait_until(lambda: simulator.stats.active == 0), "upstream not cancelled"


async def test_total_timeout_ends_a_slow_stream_with_what_was_sent(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, total_timeout_s=0.5)
    read = await _chat_stream(session, relay, story(200, rate=20))
    whole = expected(200)
    assert read.final()["code"] == "upstream_timeout"
    assert "total_timeout" in read.final()["message"]
    assert read.text and whole.startswith(read.text) and read.text != whole
    assert await wait_until(lambda: simulator.stats.active == 0), "upstream not cancelled"


async def test_total_timeout_bounds_a_non_streaming_answer(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, total_timeout_s=0.3)
    async with session.post(relay.url + "/v1/chat/completions",
                            json=story(5, first_token_delay=5)) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_a_non_streamed_answer_runs_the_streamed_pipeline(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    """The non-streamed answer is the same Observable collected: the first-token and idle
    timeouts apply to it too (before the one stream lifecycle only total_timeout did)."""
    relay = await _relay(start_server, simulator, first_token_timeout_s=0.3)
    async with session.post(relay.url + "/v1/chat/completions",
                            json=story(5, first_token_delay=5)) as response:
        assert response.status == 504
        error = (await response.json())["error"]
        assert error["code"] == "upstream_timeout" and "first_token_timeout" in error["message"]
    assert await wait_until(lambda: simulator.stats.active == 0), "upstream not cancelled"
    relay = await _relay(start_server, simulator, idle_timeout_s=0.3)
    async with session.post(relay.url + "/v1/chat/completions",
                            json=story(20, fault="hang", fault_at=3)) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "idle_timeout"
    metrics = relay.app[METRICS].render().decode()
    assert 'streamsvc_streams_started_total{kind="complete"} 1.0' in metrics
    assert "streamsvc_time_to_first_token_seconds_count 1.0" in metrics


# -- retry info ---------------------------------------------------------------------------------


async def test_retry_is_reported_in_done_and_in_headers(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, **FAST_RETRIES)
    read = await _chat_stream(session, relay, story(5, fault="500", fail_times=1, key="a"))
    assert read.text == expected(5)
    assert read.final()["attempts"] == 2 and read.final()["upstream"] == "sim"

    body = {**story(5, fault="500", fail_times=1, key="b"), "stream": True}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["X-Streamsvc-Attempts"] == "2"
        assert response.headers["X-Streamsvc-Upstream"] == "sim"
        await response.read()
    body = {**story(5, fault="500", fail_times=1, key="c"), "stream": False}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["X-Streamsvc-Attempts"] == "2"
        assert response.headers["X-Streamsvc-Upstream"] == "sim"


# -- throttle and pace --------------------------------------------------------------------------


async def test_throttle_merges_a_fast_stream_into_few_events_losing_nothing(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    relay = await _relay(start_server, simulator, throttle_ms=250)
    read = await _chat_stream(session, relay, story(60, rate=100))  # 0.6 s of tokens
    assert read.text == expected(60)
    deltas = [e for e in read.events if e.event == "message"]
    # 60 tokens in about 0.6 s, at most one event per 250 ms: a handful, not 60.
    assert 2 <= len(deltas) <= 8, len(deltas)


async def test_pace_releases_one_burst_as_many_small_events_losing_nothing(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3  # 135 characters at once
    relay = await _relay(start_server, simulator, pace_chars_per_s=400, pace_max_lag_ms=0)
    read = await _chat_stream(session, relay, _body(text))
    assert read.text == "".join(echo_tokens(text))
    deltas = [json.loads(e.data).get("content", "") for e in read.events if e.event == "message"]
    # 400 chars/s in ticks of 50 ms: pieces of about 20 characters.
    assert len(deltas) >= 6, deltas
    assert max(len(d) for d in deltas) <= 30, deltas


async def test_pace_on_the_openai_endpoint_keeps_the_sdk_format(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    text = "Hello, world! " * 5
    relay = await _relay(start_server, simulator, pace_chars_per_s=500, pace_max_lag_ms=0)
    body = {**_body(text), "stream": True}
    async with session.post(relay.url + "/v1/chat/completions", json=body) as response:
        raw, events = await _raw_events(response)
    assert _content(events) == "".join(echo_tokens(text))
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len([e for e in events if e.data != "[DONE]"]) >= 4


async def test_upstream_read_timeout_ends_a_silent_stream_without_pipeline_timeouts(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
) -> None:
    # The socket-level net (upstreams.NAME.read_timeout_s) with the pipeline's own
    # timeouts off: one timer per period, not aiohttp's re-armed timer per read.
    relay = await start_server(overrides={
        "upstreams": {"sim": {"base_url": simulator.url, "read_timeout_s": 0.3}},
        "routes": [{"model": "*", "upstreams": ["sim"]}],
        "pipeline": {"first_token_timeout_s": 0, "idle_timeout_s": 0, "retry_max_attempts": 1},
    })
    read = await _chat_stream(session, relay, story(20, rate=100, fault="hang", fault_at=5))
    assert read.text == expected(5)
    assert read.final()["code"] == "idle_timeout"
    assert "sent nothing for 0.3 s" in read.final()["message"]
    assert await wait_until(lambda: simulator.stats.active == 0), "upstream not cancelled"


async def test_coalescing_never_merges_reasoning_and_content_into_one_block(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """Reasoning, content, reasoning, content (each delta carrying both fields, one empty, as
    OpenRouter sends them) reaches the client as four blocks, however much is merged."""
    kinds = [("r1", ""), ("r2", ""), ("", "c1"), ("", "c2"), ("r3", ""), ("", "c3")]

    async def alternating(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        frames = [{"choices": [{"index": 0, "delta": {"reasoning": r, "content": c}}]}
                  for r, c in kinds]
        frames.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        await response.write(b"".join(b"data: " + json.dumps(f).encode() + b"\n\n"
                                      for f in frames) + b"data: [DONE]\n\n")  # all at once
        return response

    relay = await start_server(overrides=relay_overrides(
        await fake_upstream(alternating), pipeline={"coalesce_max_delay_ms": 300}))
    async with session.post(relay.url + "/v1/chat/completions",
                            json={**_body(), "stream": True}) as response:
        _, events = await _raw_events(response)
    blocks: list[tuple[str, str]] = []
    for event in events[:-1]:
        (choice,) = json.loads(event.data)["choices"]
        for field in ("reasoning", "content"):
            if piece := choice["delta"].get(field):
                if blocks and blocks[-1][0] == field:
                    blocks[-1] = (field, blocks[-1][1] + piece)
                else:
                    blocks.append((field, piece))
    assert blocks == [("reasoning", "r1r2"), ("content", "c1c2"), ("reasoning", "r3"),
                      ("content", "c3")]
    assert len(events) < len(kinds) + 2  # merging did happen, within each block
