"""The built-in simulator, end to end over real sockets.

Clients are raw ``aiohttp`` (to see the exact bytes and statuses) and the
official ``openai`` SDK (to prove the wire is what OpenAI clients expect).
Timing assertions are lower bounds only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import AsyncOpenAI

from streamsvc.simulator import (
    MAX_TOKEN_CHARS,
    ChunkEncoder,
    SimulatorServer,
    echo_tokens,
    generated_tokens,
    serve_simulator,
)
from streamsvc.sse import SSEDecoder

TORTURE_TEXTS = {
    "leading-spaces": "   three leading spaces,  two inside,   and trailing   ",
    "line-endings": "LF\nCR\rCRLF\r\nend",
    "blank-lines": "para one\n\n\npara two\r\n\r\n\r\nlast\n\n",
    "sse-lookalikes": "data: x\ndata: [DONE]\nevent: error\nid: 7\n: comment\nretry: 1\n\n",
    "cjk-emoji": "東京タワーは高いです。世界🙂👍🏽 👨‍👩‍👧 naïve café",
    "separators": "nbsp\u00a0line sep\u2028para sep\u2029tab\tend",
    "whitespace-only": " \r\n\t \n",
}
TORTURE = "".join(TORTURE_TEXTS.values())


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(port=0) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


def chat(text: str = "hello there", model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def stream_chat(text: str = "hello there", model: str = "echo", **extra: Any) -> dict[str, Any]:
    return chat(text, model, stream=True, **extra)


def root(sim: SimulatorServer) -> str:
    return sim.url.removesuffix("/v1")


def events(body: bytes) -> list[bytes]:
    """The data payloads of a simulator body (its JSON never holds a raw newline)."""
    frames = body.split(b"\n\n")
    assert frames[-1] == b"", f"the body does not end with a blank line: {body[-40:]!r}"
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: "), frame
        payloads.append(frame.removeprefix(b"data: "))
    return payloads


def chunks(body: bytes) -> list[dict[str, Any]]:
    return [msgspec.json.decode(p) for p in events(body) if p != b"[DONE]"]


def text_of(decoded: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in decoded
        for choice in chunk["choices"]
        if choice["index"] == index
    )


async def post(
    session: aiohttp.ClientSession, sim: SimulatorServer, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.post(f"{sim.url}/chat/completions", json=body) as resp:
        return resp, await resp.read()


async def sim_stats(session: aiohttp.ClientSession, sim: SimulatorServer) -> dict[str, int]:
    async with session.get(f"{root(sim)}/_sim/stats") as resp:
        stats: dict[str, int] = await resp.json()
        return stats


async def wait_for_stats(
    session: aiohttp.ClientSession, sim: SimulatorServer, **expected: int
) -> dict[str, int]:
    deadline = time.monotonic() + 2.0
    while True:
        stats = await sim_stats(session, sim)
        if all(stats[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# text (pure)


@given(st.text())
def test_echo_tokens_concatenate_to_the_text(text: str) -> None:
    tokens = echo_tokens(text)
    assert "".join(tokens) == text
    assert all(0 < len(token) <= MAX_TOKEN_CHARS for token in tokens)


def test_echo_tokens_carry_their_leading_white_space() -> None:
    assert echo_tokens("Hi  there\r\n\r\nyou ") == ["Hi", "  there", "\r\n\r\nyou", " "]


def test_generated_tokens_are_deterministic_and_sized() -> None:
    first = generated_tokens("sim-small", "hello", 500)
    assert first == generated_tokens("sim-small", "hello", 500)
    assert first != generated_tokens("sim-small", "hello!", 500)
    assert first != generated_tokens("sim-large", "hello", 500)
    assert len(first) == 500
    text = "".join(first)
    assert "\n\n" in text and "," in text and not text.isascii()


def test_chunk_encoder_splices_valid_json() -> None:
    enc = ChunkEncoder(completion_id="chatcmpl-sim-9", created=5, model='m"x', include_usage=True)
    token = ' "quoted" \\ \n\r\u2028 🙂'
    payload = enc.content(3, token)
    assert payload.startswith(b"data: ") and payload.endswith(b"\n\n")
    assert msgspec.json.decode(payload[6:]) == {
        "id": "chatcmpl-sim-9",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": 'm"x',
        "system_fingerprint": "fp_sim",
        "choices": [
            {"index": 3, "delta": {"content": token}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    }
    usage = msgspec.json.decode(enc.usage(2, 3)[6:])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


# ---------------------------------------------------------------------------
# shape of the answers


async def test_models_list_shape(
    client: AsyncOpenAI, session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == ["echo", "sim-small", "sim-large"]
    async with session.get(f"{sim.url}/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert body["data"][0] == {
        "id": "echo",
        "object": "model",
        "created": 0,
        "owned_by": "streamsvc-simulator",
    }


@pytest.mark.parametrize("text", [TORTURE, *TORTURE_TEXTS.values()], ids=["all", *TORTURE_TEXTS])
async def test_echo_torture_text_round_trips_through_the_sdk(
    client: AsyncOpenAI, text: str
) -> None:
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], stream=True
    )
    parts = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts).encode() == text.encode()
    assert finish == "stop"


async def test_echo_joins_text_parts_of_the_last_user_message(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = {
        "model": "echo",
        "stream": True,
        "messages": [
            {"role": "user", "content": "not this one"},
            {"role": "assistant", "content": "nor this"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first part, "},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                    {"type": "text", "text": "second\npart"},
                ],
            },
        ],
    }
    _, raw = await post(session, sim, body)
    assert text_of(chunks(raw)) == "first part, second\npart"


async def test_stream_wire_format_is_openai_s(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    resp, raw = await post(session, sim, stream_chat("one two three"))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    payloads = events(raw)
    assert payloads[-1] == b"[DONE]"
    decoded = [msgspec.json.decode(p) for p in payloads[:-1]]
    assert [c["choices"][0]["delta"] for c in decoded] == [
        {"role": "assistant", "content": ""},
        {"content": "one"},
        {"content": " two"},
        {"content": " three"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in decoded] == [None] * 4 + ["stop"]
    for chunk in decoded:
        assert chunk["id"] == decoded[0]["id"] and chunk["id"].startswith("chatcmpl-sim-")
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["created"], int)
        assert chunk["model"] == "echo"
        assert chunk["system_fingerprint"] == "fp_sim"
        assert chunk["choices"][0]["index"] == 0 and chunk["choices"][0]["logprobs"] is None
        assert "usage" not in chunk


async def test_n2_interleaves_both_choices_to_completion(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    _, raw = await post(session, sim, stream_chat("alpha beta gamma", n=2))
    decoded = chunks(raw)
    assert [c["choices"][0]["index"] for c in decoded[:4]] == [0, 1, 0, 1]
    for index in (0, 1):
        assert text_of(decoded, index) == "alpha beta gamma"
        finishes = [
            ch["finish_reason"]
            for c in decoded
            for ch in c["choices"]
            if ch["index"] == index and ch["finish_reason"]
        ]
        assert finishes == ["stop"]


async def test_n2_non_echo_choices_are_complete_through_the_sdk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        stream=True,
        extra_body={"simulate": {"tokens": 7}},
    )
    counts = {0: 0, 1: 0}
    finish = {}
    async for chunk in stream:
        for choice in chunk.choices:
            counts[choice.index] += bool(choice.delta.content)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert counts == {0: 7, 1: 7}
    assert finish == {0: "stop", 1: "stop"}


async def test_include_usage_adds_a_usage_chunk_and_null_usage_elsewhere(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("a b c d", n=2, stream_options={"include_usage": True})
    _, raw = await post(session, sim, body)
    decoded = chunks(raw)
    *others, last = decoded
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    assert all("usage" in c and c["usage"] is None for c in others)
    assert events(raw)[-1] == b"[DONE]"


async def test_include_usage_through_the_sdk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="sim-large",
        messages=[{"role": "user", "content": "count me"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"simulate": {"tokens": 12}},
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    assert usages[0].completion_tokens == 12 and usages[0].prompt_tokens == 2


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_with_finish_reason_length(
    session: aiohttp.ClientSession, sim: SimulatorServer, field: str
) -> None:
    _, raw = await post(session, sim, {**stream_chat("one two three four five"), field: 2})
    decoded = chunks(raw)
    assert text_of(decoded) == "one two"
    assert decoded[-1]["choices"][0]["finish_reason"] == "length"


async def test_non_streaming_completion_shape(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi  you\r\n🙂"}], n=2
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-sim-")
    assert completion.system_fingerprint == "fp_sim"
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content == "hi  you\r\n🙂"
        assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6


async def test_non_streaming_max_tokens(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_non_echo_text_is_deterministic(client: AsyncOpenAI) -> None:
    async def answer(prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    first = await answer("tell me a story")
    assert first == await answer("tell me a story")
    assert first != await answer("tell me another story")
    assert len(first.split()) >= 20


# ---------------------------------------------------------------------------
# faults, as a client sees them


async def test_fault_429_has_retry_after_and_an_openai_error_body(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    resp, raw = await post(session, sim, stream_chat(simulate={"fault": "429", "retry_after": 3}))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3"
    error = msgspec.json.decode(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_fault_500_raises_in_the_sdk(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={"simulate": {"fault": "500"}},
        )


async def test_fault_drop_ends_the_body_abruptly(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("one two three four five", simulate={"fault": "drop", "fault_at": 2})
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(f"{sim.url}/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    assert b'"one"' in received and b"three" not in received
    assert b"[DONE]" not in received


async def test_fault_hang_stops_sending_until_the_client_times_out(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("one two three", simulate={"fault": "hang", "fault_at": 1})
    received = b""
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(f"{sim.url}/chat/completions", json=body) as resp:
            async with asyncio.timeout(0.5):
                async for data in resp.content.iter_any():
                    received += data
    assert b'"one"' in received and b"two" not in received
    stats = await wait_for_stats(session, sim, disconnected=1)
    assert stats["disconnected"] == 1


async def test_fault_malformed_sends_broken_json_then_continues(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("one two three", simulate={"fault": "malformed", "fault_at": 1})
    resp, raw = await post(session, sim, body)
    assert resp.status == 200
    payloads = events(raw)
    assert b'{"choices": [' in payloads
    assert payloads[-1] == b"[DONE]"
    good = [msgspec.json.decode(p) for p in payloads if p not in (b'{"choices": [', b"[DONE]")]
    assert text_of(good) == "one two three"


async def test_fault_error_event_is_sent_and_no_done(
    session: aiohttp.ClientSession, sim: SimulatorServer, client: AsyncOpenAI
) -> None:
    body = stream_chat("one two three", simulate={"fault": "error_event", "fault_at": 2})
    resp, raw = await post(session, sim, body)
    assert resp.status == 200
    payloads = events(raw)
    assert b"[DONE]" not in payloads
    assert msgspec.json.decode(payloads[-1]) == {
        "error": {
            "message": "simulated upstream error",
            "type": "server_error",
            "code": "simulated",
        }
    }
    assert text_of(chunks(raw)[:-1]) == "one two"

    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "x y"}],
        stream=True,
        extra_body={"simulate": {"fault": "error_event", "fault_at": 1}},
    )
    with pytest.raises(openai.APIError, match="simulated upstream error"):
        async for _ in stream:
            pass


@pytest.mark.parametrize(("fault", "done"), [("no_done", False), ("no_finish", True)])
async def test_fault_no_done_or_no_finish_ends_without_finish_reason(
    session: aiohttp.ClientSession, sim: SimulatorServer, fault: str, done: bool,
) -> None:
    """no_done: no finish chunk and no [DONE]; no_finish: [DONE] but no finish chunk."""
    resp, raw = await post(
        session, sim, stream_chat("one two three", simulate={"fault": fault})
    )
    assert resp.status == 200
    payloads = events(raw)
    assert (payloads[-1] == b"[DONE]") is done
    decoded = chunks(raw)
    assert text_of(decoded) == "one two three"
    assert all(ch["finish_reason"] is None for c in decoded for ch in c["choices"])


async def test_fault_open_after_done_keeps_the_body_open(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("one two", simulate={"fault": "open_after_done"})
    async with session.post(f"{sim.url}/chat/completions", json=body) as resp:
        received = b""
        while not received.endswith(b"data: [DONE]\n\n"):
            received += await resp.content.readany()
        assert text_of(chunks(received)) == "one two"
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.3):
                await resp.content.read()
    stats = await wait_for_stats(session, sim, disconnected=1, active=0)
    assert stats["disconnected"] == 1


@pytest.mark.parametrize("fault", ["429", "500"])
async def test_fail_times_fails_first_n_requests_of_a_key_then_succeeds(
    session: aiohttp.ClientSession, sim: SimulatorServer, fault: str
) -> None:
    simulate = {"fault": fault, "fail_times": 2, "key": f"retry-{fault}", "retry_after": 0}
    statuses = [
        (await post(session, sim, stream_chat("ok", simulate=simulate)))[0].status for _ in range(3)
    ]
    assert statuses == [int(fault), int(fault), 200]
    other = {**simulate, "key": "another"}
    resp, _ = await post(session, sim, stream_chat("ok", simulate=other))
    assert resp.status == int(fault)


async def test_fail_times_counters_are_cleared_by_reset(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    simulate = {"fault": "500", "fail_times": 1, "key": "k"}
    assert (await post(session, sim, chat(simulate=simulate)))[0].status == 500
    assert (await post(session, sim, chat(simulate=simulate)))[0].status == 200
    await session.post(f"{root(sim)}/_sim/reset")
    assert (await post(session, sim, chat(simulate=simulate)))[0].status == 500


# ---------------------------------------------------------------------------
# stats and requests


async def test_client_hang_up_counts_as_disconnected(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("x", model="sim-small", simulate={"tokens": 10_000, "rate": 50})
    resp = await session.post(f"{sim.url}/chat/completions", json=body)
    await resp.content.readany()
    assert (await sim_stats(session, sim))["active"] == 1
    resp.close()
    stats = await wait_for_stats(session, sim, disconnected=1, active=0)
    assert stats == {"requests": 1, "active": 0, "completed": 0, "disconnected": 1}
    assert sim.stats.disconnected == 1


async def test_stats_recent_requests_and_reset(
    client: AsyncOpenAI, session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "remember me"}],
        extra_body={"simulate": {"tokens": 3}},
    )
    assert await sim_stats(session, sim) == {
        "requests": 1,
        "active": 0,
        "completed": 1,
        "disconnected": 0,
    }
    async with session.get(f"{root(sim)}/_sim/requests") as resp:
        recent = await resp.json()
    assert len(recent) == 1
    assert recent[0]["path"] == "/v1/chat/completions"
    assert recent[0]["headers"]["Authorization"] == "Bearer x"
    assert recent[0]["body"]["messages"][0]["content"] == "remember me"
    assert recent[0]["body"]["simulate"] == {"tokens": 3}
    async with session.post(f"{root(sim)}/_sim/reset") as resp:
        assert resp.status == 200
    assert await sim_stats(session, sim) == {
        "requests": 0,
        "active": 0,
        "completed": 0,
        "disconnected": 0,
    }
    assert len(sim.stats.recent) == 0


async def test_recent_requests_keep_the_last_50(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    for i in range(55):
        await post(session, sim, chat(f"message {i}"))
    assert len(sim.stats.recent) == 50
    assert sim.stats.recent[0]["body"]["messages"][0]["content"] == "message 5"
    assert sim.stats.requests == 55


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"simulate": {"rate": "fast"}}, "simulate.rate"),
        ({"simulate": {"rate": -1}}, "simulate.rate"),
        ({"simulate": {"first_token_delay": None}}, "simulate.first_token_delay"),
        ({"simulate": {"tokens": 1.5}}, "simulate.tokens"),
        ({"simulate": {"fault": "explode"}}, "simulate.fault"),
        ({"simulate": {"fault_at": -1}}, "simulate.fault_at"),
        ({"simulate": {"retry_after": True}}, "simulate.retry_after"),
        ({"simulate": {"fail_times": "2"}}, "simulate.fail_times"),
        ({"simulate": {"key": 5}}, "simulate.key"),
        ({"simulate": {"speed": 5}}, "simulate.speed"),
        ({"simulate": "fast"}, "simulate"),
        ({"model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"stream": "yes"}, "stream"),
        ({"n": 0}, "n"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_bad_field_is_a_400_naming_it(
    session: aiohttp.ClientSession, sim: SimulatorServer, extra: dict[str, Any], param: str
) -> None:
    resp, raw = await post(session, sim, {**chat(), **extra})
    assert resp.status == 400
    error = msgspec.json.decode(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]


async def test_invalid_json_body_is_a_400(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    async with session.post(
        f"{sim.url}/chat/completions",
        data=b'{"model": ',
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_bad_simulate_field_raises_bad_request_in_the_sdk(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="simulate.rate must be a number"):
        await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"simulate": {"rate": "fast"}},
        )


# ---------------------------------------------------------------------------
# timing (lower bounds only)


async def test_rate_spaces_the_tokens(session: aiohttp.ClientSession, sim: SimulatorServer) -> None:
    started = time.monotonic()
    _, raw = await post(session, sim, stream_chat(" ".join(["w"] * 10), simulate={"rate": 100}))
    elapsed = time.monotonic() - started
    assert text_of(chunks(raw)) == " ".join(["w"] * 10)
    assert elapsed >= 0.08


async def test_headers_go_out_before_the_first_token_delay(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("late", simulate={"first_token_delay": 0.3})
    started = time.monotonic()
    async with asyncio.timeout(10):
        resp = await session.post(f"{sim.url}/chat/completions", json=body)
    try:
        assert resp.status == 200
        raw = await resp.read()
    finally:
        resp.release()
    assert time.monotonic() - started >= 0.25
    assert text_of(chunks(raw)) == "late"


async def test_headers_arrive_while_the_first_token_is_far_away(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("never", simulate={"first_token_delay": 60})
    async with asyncio.timeout(10):
        resp = await session.post(f"{sim.url}/chat/completions", json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    resp.close()
    stats = await wait_for_stats(session, sim, disconnected=1, active=0)
    assert stats["disconnected"] == 1 and stats["active"] == 0


async def test_many_concurrent_rated_streams_all_complete(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("x", model="sim-small", simulate={"rate": 20, "tokens": 10})

    async def one() -> str:
        return text_of(chunks((await post(session, sim, body))[1]))

    texts = await asyncio.gather(*(one() for _ in range(200)))
    assert len(set(texts)) == 1
    assert sim.stats.completed == 200 and sim.stats.active == 0


# ---------------------------------------------------------------------------
# lifecycle


async def test_server_url_needs_a_running_server() -> None:
    server = SimulatorServer()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    async with server:
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        with pytest.raises(RuntimeError, match="starts only once"):
            await server.start()
    with pytest.raises(RuntimeError, match="closed"):
        _ = server.port


async def test_closing_ends_hanging_streams(session: aiohttp.ClientSession) -> None:
    server = SimulatorServer()
    await server.start()
    body = stream_chat("a b", simulate={"fault": "hang", "fault_at": 1})
    resp = await session.post(f"{server.url}/chat/completions", json=body)
    await resp.content.readany()
    async with asyncio.timeout(10):
        await server.close()
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert server.stats.active == 0


async def test_serve_simulator_prints_its_url_and_stops_when_cancelled(
    capsys: pytest.CaptureFixture[str], session: aiohttp.ClientSession
) -> None:
    task = asyncio.create_task(serve_simulator("127.0.0.1", 0))
    line = ""
    async with asyncio.timeout(10):
        while not line:
            await asyncio.sleep(0.01)
            line = capsys.readouterr().out
    assert line.startswith("streamsvc simulator listening on http://127.0.0.1:")
    url = line.split()[-1]
    assert url.endswith("/v1")
    async with session.get(f"{url}/models") as resp:
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- the faults the fault campaign needs (issue 12) -----------------------------------------------

async def test_fault_sse_error_sends_a_typed_error_event_then_done(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    resp, raw = await post(session, sim,
                           stream_chat("one two three", simulate={"fault": "sse_error",
                                                                  "fault_at": 2}))
    assert resp.status == 200
    decoded = SSEDecoder().feed(raw)
    assert [e.event for e in decoded[-2:]] == ["error", "message"]
    assert json.loads(decoded[-2].data)["error"]["message"] == "simulated upstream error"
    assert decoded[-1].data == "[DONE]"
    assert text_of([json.loads(e.data) for e in decoded[:-2]]) == "one two"


async def test_fault_slow_headers_holds_the_headers_back(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    body = stream_chat("one", simulate={"fault": "slow_headers", "first_token_delay": 0.4})
    started = time.monotonic()
    async with session.post(f"{sim.url}/chat/completions", json=body) as resp:
        headers_after = time.monotonic() - started
        raw = await resp.read()
    assert headers_after >= 0.35
    assert text_of(chunks(raw)) == "one" and events(raw)[-1] == b"[DONE]"


async def test_fault_split_surrogates_sends_each_astral_character_as_two_escaped_halves(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    prompt = "a 🙂 b 👍🏽 c 東京"
    _, raw = await post(session, sim,
                        stream_chat(prompt, simulate={"fault": "split_surrogates"}))
    assert b'\\ud83d"' in raw and b'"\\ude42' in raw  # a piece ends on the high half
    with pytest.raises(msgspec.DecodeError):
        chunks(raw)  # msgspec refuses the halves, as it did in the relay
    halves = [json.loads(p) for p in events(raw) if p != b"[DONE]"]
    text = "".join(c["delta"].get("content") or "" for h in halves for c in h["choices"])
    assert text.encode("utf-16-le", "surrogatepass").decode("utf-16-le") == prompt


async def test_sim_keys_counts_requests_after_content_per_key(
    session: aiohttp.ClientSession, sim: SimulatorServer
) -> None:
    broken = {"fault": "malformed", "fault_at": 0, "key": "k-before"}  # no content reached
    for simulate in ({"key": "k-twice"}, {"key": "k-twice"}, broken, broken):
        await post(session, sim, stream_chat("one two", simulate=simulate))
    async with session.get(f"{root(sim)}/_sim/keys") as resp:
        keys = await resp.json()
    assert keys["k-twice"] == {"requests": 2, "content": 2, "after_content": 1}
    assert keys["k-before"] == {"requests": 2, "content": 0, "after_content": 0}
    async with session.get(f"{root(sim)}/_sim/keys", params={"key": "k-none"}) as resp:
        assert await resp.json() == {"k-none": {"requests": 0, "after_content": 0, "content": 0}}
