"""``POST /v1/chat/completions`` and ``GET /v1/models`` over real sockets, read by the official SDK.

Every test runs the relay in front of a standalone simulator, so the text a
client assembles can be compared byte for byte with what the upstream was
asked to stream, and the simulator's stats show what the relay sent it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from streamsvc.simulator import SimulatorServer, echo_tokens, generated_tokens
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.upstream.client import MAX_EVENT_BYTES
from tests.conftest import FakeUpstream, RunningServer, StartServer, relay_overrides
from tests.conftest import wait_until as _wait_until

# Leading spaces, CR, LF, CRLF, blank lines, lines that look like SSE fields,
# CJK, emoji and markup: all must come back unchanged.
TORTURE = (
    "  leading spaces\r\ncrlf line\rlone cr\nlf line\n\nblank above\n"
    "data: x\nid: 1\n: c\nevent: done\nretry: 5\n\n\n"
    "東京タワーは高いです 世界 🙂👍🏽 <b>html</b> &amp; \"quotes\" \\back\\slash\t tab  \n"
)

FAST_RETRIES = {"pipeline": {"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 50}}


def _sdk(relay: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="x", max_retries=0)


def _body(text: str = "hello", model: str = "echo", **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


async def _raw_events(response: aiohttp.ClientResponse) -> tuple[bytes, list[ServerSentEvent]]:
    decoder = SSEDecoder()
    raw = bytearray()
    events: list[ServerSentEvent] = []
    async for data in response.content.iter_any():
        raw += data
        events.extend(decoder.feed(data))
    assert not decoder.pending, "the body ended inside an event"
    return bytes(raw), events


def _content(events: list[ServerSentEvent], index: int = 0) -> str:
    out = []
    for event in events:
        if event.data == "[DONE]":
            continue
        chunk = json.loads(event.data)
        for choice in chunk.get("choices", []):
            if choice.get("index", 0) == index:
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


async def _sdk_stream_text(stream: AsyncIterator[Any]) -> tuple[dict[int, str], list[Any]]:
    texts: dict[int, str] = {}
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


# ---------------------------------------------------------------------------
# streamed and non-streamed answers


async def test_sdk_stream_torture_text_is_byte_identical(relay: RunningServer) -> None:
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": TORTURE}], stream=True
        )
        texts, chunks = await _sdk_stream_text(stream)
    assert texts == {0: TORTURE}
    assert texts[0].encode() == TORTURE.encode()
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("text", [" x", "\n", "\r\n", "\r", "a\n\nb", "🙂", " 世界 "])
async def test_sdk_stream_small_edge_texts(relay: RunningServer, text: str) -> None:
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": text}], stream=True
        )
        texts, _ = await _sdk_stream_text(stream)
    assert texts[0] == text


async def test_sdk_non_stream_answer(relay: RunningServer, simulator: SimulatorServer) -> None:
    async with _sdk(relay) as client:
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": TORTURE}]
        )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == TORTURE
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == len(echo_tokens(TORTURE))
    assert simulator.stats.requests == 1
    # The non-streamed answer is the streamed pipeline, collected: the upstream streams it.
    assert simulator.stats.recent[-1]["body"]["stream"] is True


async def test_sdk_stream_n2_each_choice_intact(relay: RunningServer) -> None:
    expected = {
        i: "".join(generated_tokens("sim-small", "tell me", 30, choice=i)) for i in range(2)
    }
    assert expected[0] != expected[1]  # otherwise the test could not tell choices apart
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "tell me"}], stream=True,
            n=2, extra_body={"simulate": {"tokens": 30}},
        )
        texts, chunks = await _sdk_stream_text(stream)
    assert texts == expected
    reasons = {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
    assert reasons == {0: "stop", 1: "stop"}


async def test_sdk_non_stream_n2(relay: RunningServer) -> None:
    async with _sdk(relay) as client:
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": TORTURE}], n=2
        )
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.message.content for c in answer.choices] == [TORTURE, TORTURE]


async def test_usage_chunk_only_when_asked(
    relay: RunningServer, simulator: SimulatorServer
) -> None:
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": " a b c"}], stream=True,
            stream_options={"include_usage": True},
        )
        texts, chunks = await _sdk_stream_text(stream)
        assert texts[0] == " a b c"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 3
        assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
        assert simulator.stats.recent[-1]["body"]["stream_options"] == {"include_usage": True}

        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": " a b c"}], stream=True
        )
        texts, chunks = await _sdk_stream_text(stream)
    assert texts[0] == " a b c"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "a usage-only chunk was forwarded unasked"
    # The relay always asks the upstream for usage (it reports it in its own events).
    assert simulator.stats.recent[-1]["body"]["stream_options"]["include_usage"] is True
    assert simulator.stats.requests == 2


async def test_usage_chunk_absent_when_include_usage_false(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(" x y", stream=True, stream_options={"include_usage": False})
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        _, events = await _raw_events(r)
    chunks = [json.loads(e.data) for e in events if e.data != "[DONE]"]
    assert chunks and all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    assert simulator.stats.recent[-1]["body"]["stream_options"]["include_usage"] is True


async def test_unknown_fields_pass_through_to_upstream(
    relay: RunningServer, simulator: SimulatorServer
) -> None:
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"foo_bar": {"x": 1}, "seed": 7}, user="u-1", temperature=0.5,
        )
        texts, _ = await _sdk_stream_text(stream)
        assert texts[0] == "hi"
        sent = simulator.stats.recent[-1]["body"]
        assert sent["foo_bar"] == {"x": 1}
        assert sent["seed"] == 7
        assert sent["user"] == "u-1"
        assert sent["temperature"] == 0.5
        assert sent["messages"] == [{"role": "user", "content": "hi"}]

        await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}],
            extra_body={"foo_bar": [1, "two"]},
        )
    assert simulator.stats.recent[-1]["body"]["foo_bar"] == [1, "two"]


async def test_streamsvc_options_are_not_sent_upstream(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body("hi", stream=True, streamsvc={"retries": True})
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        await r.read()
    assert "streamsvc" not in simulator.stats.recent[-1]["body"]


# ---------------------------------------------------------------------------
# the wire itself


async def test_raw_wire_has_only_data_frames_and_ends_with_done(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_body(TORTURE, stream=True)
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        raw, events = await _raw_events(r)
    lines = raw.decode().split("\n")
    for line in lines:
        assert not line.startswith(("id:", "retry:", "event:")), line
        assert line == "" or line.startswith(("data: ", ":")), line
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw  # CR only ever travels escaped inside JSON
    assert [e.data for e in events].count("[DONE]") == 1
    assert all(e.event == "message" for e in events)
    assert _content(events) == TORTURE


async def test_request_id_header(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{relay.url}/v1/chat/completions", json=_body(stream=True)) as r:
        generated = r.headers.get("X-Request-ID")
        stream_id = r.headers.get("X-Stream-ID", "")
        await r.read()
    assert generated and len(generated) >= 8
    assert re.fullmatch(r"st_[0-9a-f]{24}", stream_id)

    headers = {"X-Request-ID": "my-req.42_A"}
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_body(stream=True), headers=headers
    ) as r:
        assert r.headers["X-Request-ID"] == "my-req.42_A"
        await r.read()
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_body(), headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers["X-Request-ID"] == "my-req.42_A"
    # Error answers carry it too.
    async with session.post(f"{relay.url}/v1/chat/completions", data=b"{", headers=headers) as r:
        assert r.status == 400
        assert r.headers["X-Request-ID"] == "my-req.42_A"

    # An id that could inject into logs or headers is replaced, not echoed.
    bad = {"X-Request-ID": "bad id;<script>"}
    async with session.post(f"{relay.url}/v1/chat/completions", json=_body(), headers=bad) as r:
        assert r.status == 200
        replaced = r.headers["X-Request-ID"]
    assert replaced != "bad id;<script>" and replaced


async def test_sdk_models_list_default_config(start_server: StartServer) -> None:
    relay = await start_server(overrides={})  # the built-in simulator serves "*"
    async with _sdk(relay) as client:
        page = await client.models.list()
    ids = [m.id for m in page.data]
    assert "echo" in ids
    assert len(ids) == len(set(ids))
    assert all(m.object == "model" for m in page.data)


async def test_sdk_models_list_names_literal_routes(
    start_server: StartServer, simulator: SimulatorServer
) -> None:
    overrides = {
        "upstreams": {"sim": {"base_url": simulator.url}},
        "routes": [
            {"model": "echo", "upstreams": ["sim"]},
            {"model": "sim-small", "upstreams": ["sim"]},
            {"model": "gpt-*", "upstreams": ["sim"]},
        ],
    }
    relay = await start_server(overrides=overrides)
    async with _sdk(relay) as client:
        page = await client.models.list()
        ids = [m.id for m in page.data]
        assert ids == ["echo", "sim-small"]
        # A listed model is one the relay really serves.
        stream = await client.chat.completions.create(
            model=ids[0], messages=[{"role": "user", "content": "ok"}], stream=True
        )
        texts, _ = await _sdk_stream_text(stream)
    assert texts[0] == "ok"


# ---------------------------------------------------------------------------
# errors before the stream


async def test_rate_limit_exhausted_is_429(
    start_server: StartServer, simulator: SimulatorServer
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": "429", "fail_times": 50, "retry_after": 0.01, "key": "rl-stream"}
    async with _sdk(relay) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_body={"simulate": simulate},
            )
    error = caught.value
    assert error.status_code == 429
    assert isinstance(error.body, dict)
    assert error.body["code"] == "rate_limited"
    assert error.body["type"] == "rate_limit_error"
    assert error.body["message"]
    assert "param" in error.body
    assert simulator.stats.requests == relay.config.pipeline.retry_max_attempts


async def test_rate_limit_exhausted_non_stream_is_429(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": "429", "fail_times": 50, "retry_after": 0.01, "key": "rl-plain"}
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_body(simulate=simulate)
    ) as r:
        assert r.status == 429
        assert r.headers["Content-Type"].startswith("application/json")
        error = (await r.json())["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == "rate_limited"
    assert simulator.stats.requests == relay.config.pipeline.retry_max_attempts


@pytest.mark.parametrize("stream", [True, False])
async def test_a_retry_after_longer_than_the_backoff_cap_is_passed_on_not_cut_short(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    stream: bool,
) -> None:
    """Retry-After: 30 is not retried after 50 ms: the client gets 429 and Retry-After: 30."""
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": "429", "retry_after": 30, "key": f"long-wait-{stream}"}
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_body(stream=stream, simulate=simulate)
    ) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "30"
        assert (await r.json())["error"]["code"] == "rate_limited"
    assert simulator.stats.requests == 1
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body(simulate=simulate)) as r:
        text = await r.text()
    assert '"code":"rate_limited"' in text and '"retry_after":30' in text
    assert simulator.stats.requests == 2


@pytest.mark.parametrize("stream", [True, False])
async def test_500_twice_then_success(
    start_server: StartServer, simulator: SimulatorServer, stream: bool
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": "500", "fail_times": 2, "key": f"five-hundred-{stream}"}
    async with _sdk(relay) as client:
        if stream:
            answer = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": TORTURE}], stream=True,
                extra_body={"simulate": simulate},
            )
            texts, _ = await _sdk_stream_text(answer)
            assert texts == {0: TORTURE}
        else:
            result = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": TORTURE}],
                extra_body={"simulate": simulate},
            )
            assert result.choices[0].message.content == TORTURE
    assert simulator.stats.requests == 3


@pytest.mark.parametrize("stream", [True, False])
async def test_retries_off_means_one_request(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    stream: bool,
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": "500", "fail_times": 1, "key": f"no-retry-{stream}"}
    body = _body(stream=stream, simulate=simulate, streamsvc={"retries": False})
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["code"] == "upstream_error"
    assert simulator.stats.requests == 1
    assert "streamsvc" not in simulator.stats.recent[-1]["body"]
    # The same request with retries on succeeds now (the fault was used up).
    del body["streamsvc"]
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        await r.read()
    assert simulator.stats.requests == 2


# ---------------------------------------------------------------------------
# errors after the stream started


def _fault_body(text: str, fault: str, fault_at: int) -> dict[str, Any]:
    return _body(text, stream=True, simulate={"fault": fault, "fault_at": fault_at})


MID_TEXT = " one two three four five six seven eight nine ten"


@pytest.mark.parametrize(
    ("fault", "tokens_before"),
    [("drop", 5), ("error_event", 5), ("malformed", 5), ("no_done", None)],
)
async def test_mid_stream_fault_is_an_error_event(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    fault: str, tokens_before: int | None,
) -> None:
    tokens = echo_tokens(MID_TEXT)
    sent = "".join(tokens if tokens_before is None else tokens[:tokens_before])
    async with session.post(
        f"{relay.url}/v1/chat/completions", json=_fault_body(MID_TEXT, fault, 5)
    ) as r:
        assert r.status == 200
        raw, events = await _raw_events(r)
    assert events, "no event at all"
    assert b"data: [DONE]" not in raw
    last = json.loads(events[-1].data)
    assert set(last) == {"error"}
    assert last["error"]["code"] == "upstream_error"
    assert last["error"]["message"]
    assert last["error"]["type"]
    # The text already sent stays; the error comes after it, once.
    assert _content(events[:-1]) == sent
    assert sum("error" in json.loads(e.data) for e in events) == 1
    # Content had started: no retry may repeat it.
    assert simulator.stats.requests == 1


async def test_mid_stream_fault_makes_the_sdk_raise(relay: RunningServer) -> None:
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": MID_TEXT}], stream=True,
            extra_body={"simulate": {"fault": "drop", "fault_at": 3}},
        )
        got: list[str] = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                got.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(got) == "".join(echo_tokens(MID_TEXT)[:3])


@pytest.mark.parametrize(
    ("fault", "tokens_before"),
    [("drop", 5), ("error_event", 5), ("malformed", 5), ("no_done", None)],
)
async def test_mid_stream_fault_on_chat_stream_is_error_event(
    relay: RunningServer, session: aiohttp.ClientSession, fault: str, tokens_before: int | None,
) -> None:
    tokens = echo_tokens(MID_TEXT)
    sent = "".join(tokens if tokens_before is None else tokens[:tokens_before])
    async with session.post(
        f"{relay.url}/v1/chat/stream", json=_fault_body(MID_TEXT, fault, 5)
    ) as r:
        assert r.status == 200
        _, events = await _raw_events(r)
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)
    assert error["code"] == "upstream_error"
    assert isinstance(error["retryable"], bool)
    # In words, for the person who reads it: never an exception's class name.
    assert error["message"].startswith("upstream 'sim' ")
    assert not re.search(r"[a-z][A-Z]|Error\b", error["message"]), error["message"]
    if fault == "drop":
        assert error["message"] == ("upstream 'sim' stopped mid-stream: the connection closed"
                                    " before the answer was complete")
    assert all(e.event == "message" for e in events[:-1])
    assert "".join(json.loads(e.data).get("content", "") for e in events[:-1]) == sent
    assert not any(e.event == "done" for e in events)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/stream"])
async def test_open_after_done_still_ends_the_stream(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer, path: str,
) -> None:
    body = _body(MID_TEXT, stream=True, simulate={"fault": "open_after_done"})
    async with session.post(f"{relay.url}{path}", json=body) as r:
        assert r.status == 200
        # A guard against a hang, not a speed requirement.
        raw, events = await asyncio.wait_for(_raw_events(r), timeout=10)
    if path == "/v1/chat/completions":
        assert raw.endswith(b"data: [DONE]\n\n")
        assert _content(events) == MID_TEXT
    else:
        assert events[-1].event == "done"
        assert json.loads(events[-1].data)["finish_reason"] == "stop"
        assert "".join(json.loads(e.data).get("content", "") for e in events[:-1]) == MID_TEXT
    # The relay closed the upstream body the simulator left open.
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)
    assert simulator.stats.active == 0


@pytest.mark.parametrize("fault", ["drop", "error_event", "malformed"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/stream"])
async def test_fault_before_first_token_is_retried_without_duplicates(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    fault: str, path: str,
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, **FAST_RETRIES))
    simulate = {"fault": fault, "fault_at": 0, "fail_times": 1, "key": f"early-{fault}-{path}"}
    body = _body(TORTURE, stream=True, simulate=simulate)
    async with session.post(f"{relay.url}{path}", json=body) as r:
        assert r.status == 200
        raw, events = await _raw_events(r)
    if path == "/v1/chat/completions":
        assert raw.endswith(b"data: [DONE]\n\n")
        assert _content(events) == TORTURE
        roles = [c for e in events if e.data != "[DONE]"
                 for c in json.loads(e.data)["choices"] if c["delta"].get("role")]
        assert len(roles) == 1
    else:
        assert events[-1].event == "done"
        assert "".join(json.loads(e.data).get("content", "") for e in events[:-1]) == TORTURE
        assert json.loads(events[-1].data)["attempts"] == 2
    assert simulator.stats.requests == 2


async def test_an_upstream_event_without_end_is_bounded(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """A hostile upstream that never ends its event gets an error, not unbounded memory."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: ")
        block = b"x" * 65536
        for _ in range(MAX_EVENT_BYTES // len(block) + 2):
            await response.write(block)
        return response

    url = await fake_upstream(endless)
    relay = await start_server(overrides=relay_overrides(url))
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body()) as r:
        text = await r.text()
    assert "event: error" in text and "upstream_error" in text
    assert "without ending an event" in text


async def test_garbage_chunk_shapes_are_upstream_errors(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """Valid JSON of the wrong shape is the upstream's fault: a typed upstream_error."""
    shapes = [b'{"choices": [1]}', b'{"choices": {"a": 1}}', b'{"choices": [{"delta": "x"}]}',
              b'{"choices": [{"index": "0", "delta": {}}]}']

    async def garbage(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + shapes[body["shape"]] + b"\n\n")
        return response

    url = await fake_upstream(garbage)
    relay = await start_server(overrides=relay_overrides(
        url, pipeline={"retry_max_attempts": 1}))
    for shape in range(len(shapes)):
        body = _body(shape=shape)
        async with session.post(f"{relay.url}/v1/chat/stream", json=body) as r:
            text = await r.text()
        assert "event: error" in text and '"code":"upstream_error"' in text, text
        async with session.post(f"{relay.url}/v1/chat/completions",
                                json={**body, "stream": True}) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_error"


# -- issue 12, item 6: failures that look like a normal end ---------------------------------------

def _chunk_frame(index: int = 0, content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "echo",
             "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _scripted(frames: list[bytes]) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        return response

    return handler


ERROR_EVENT_FRAMES = [
    _chunk_frame(content="Hel"), _chunk_frame(content="lo"),
    b'event: error\ndata: {"error": {"message": "model overloaded", "type": "server_error"}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_upstream_error_event_is_a_typed_upstream_error_carrying_its_message(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(overrides=relay_overrides(await fake_upstream(
        _scripted(ERROR_EVENT_FRAMES))))
    for path in ("/v1/chat/stream", "/v1/chat/completions"):
        async with session.post(f"{relay.url}{path}", json=_body(stream=True)) as r:
            raw, events = await _raw_events(r)
        assert b"event: done" not in raw and b"[DONE]" not in raw
        last = json.loads(events[-1].data)
        error = last if path == "/v1/chat/stream" else last["error"]
        assert error["code"] == "upstream_error" and "model overloaded" in error["message"]
        if path == "/v1/chat/stream":
            assert events[-1].event == "error"
            assert "".join(json.loads(e.data).get("content", "") for e in events[:-1]) == "Hello"
        else:
            assert _content(events[:-1]) == "Hello"
    async with _sdk(relay) as client:  # the SDK raises instead of ending normally
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.APIError, match="model overloaded"):
            async for _ in stream:
                pass
    async with session.post(f"{relay.url}/v1/chat/completions", json=_body()) as r:
        assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(("frames", "normal"), [
    ([_chunk_frame(content="Hi"), b"data: [DONE]\n\n"], False),
    ([_chunk_frame(content="Hi")], False),
    ([_chunk_frame(0, "a"), _chunk_frame(1, "b"), _chunk_frame(0, finish="stop"),
      b"data: [DONE]\n\n"], False),
    ([_chunk_frame(content="Hi"), _chunk_frame(finish="stop")], True),
    ([_chunk_frame(content="Hi"), _chunk_frame(finish="length"), b"data: [DONE]\n\n"], True),
], ids=["done-no-finish", "eof-no-finish", "choice-1-unfinished", "eof-after-finish",
        "done-after-finish"])
async def test_a_stream_that_ends_with_no_finish_reason_is_never_done(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession,
    frames: list[bytes], normal: bool,
) -> None:
    relay = await start_server(overrides=relay_overrides(await fake_upstream(_scripted(frames))))
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body()) as r:
        _, events = await _raw_events(r)
    final = json.loads(events[-1].data)
    if normal:
        assert events[-1].event == "done" and final["finish_reason"] in ("stop", "length")
    else:
        assert events[-1].event == "error" and final["code"] == "upstream_error", final
        assert "without a finish reason" in final["message"]
    async with session.post(f"{relay.url}/v1/streams", json=_body()) as r:
        events_url = (await r.json())["events_url"]
    async with session.get(relay.url + events_url) as r:
        _, events = await _raw_events(r)
    assert events[-1].event == ("done" if normal else "error")
    async with session.post(f"{relay.url}/v1/chat/completions", json=_body(stream=True)) as r:
        raw, _ = await _raw_events(r)
    assert raw.endswith(b"data: [DONE]\n\n") is normal


async def test_an_emoji_split_across_chunks_as_lone_surrogates_reaches_every_client_whole(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    def frame(delta: str, finish: str = "null") -> bytes:
        return (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"echo",'
                b'"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n'
                % (delta.encode(), finish.encode()))

    frames = [frame('{"role":"assistant","content":"ok "}'), frame('{"content":"\\ud83d"}'),
              frame('{"content":"\\ude42 done"}'), frame("{}", '"stop"'), b"data: [DONE]\n\n"]
    relay = await start_server(overrides=relay_overrides(await fake_upstream(_scripted(frames))))
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body()) as r:
        _, events = await _raw_events(r)
    assert events[-1].event == "done", events[-1]
    assert "".join(json.loads(e.data).get("content", "") for e in events[:-1]) == "ok 🙂 done"
    async with _sdk(relay) as client:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], stream=True)
        texts, _ = await _sdk_stream_text(stream)
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}])
    assert texts[0] == "ok 🙂 done"
    assert answer.choices[0].message.content == "ok 🙂 done"
