"""Usage per API key on /metrics: the upstream's count, or an estimate when a stream is cut.

Every answer an upstream accepted is counted once, for the key id that asked
(``anonymous`` with auth off), whichever endpoint it came through. Also the
journal lag histogram and the estimate itself (``streamsvc.usage``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from streamsvc.chunks import Chunk
from streamsvc.server.state import AUTH, METRICS
from streamsvc.simulator import SimulatorServer
from streamsvc.usage import Usage, UsageMeter, estimate_prompt_tokens
from tests.conftest import FakeUpstream, RunningServer, StartServer, relay_overrides
from tests.helpers import bearer, secured

KEY_A = "sk-usage-a-1f2e3d4c5b6a-never-log-me"
KEY_B = "sk-usage-b-9a8b7c6d5e4f-never-log-me"
PROMPT = "please say these words back to me"
ECHO = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}]}
LONG_TOKENS = 400
# 400 tokens at 40 a second: ten seconds for the whole answer, so a client that
# leaves after the first events leaves early.
LONG = {"model": "sim-small", "messages": [{"role": "user", "content": "tell me a story"}],
        "simulate": {"rate": 40, "tokens": LONG_TOKENS}}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def samples(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def tokens(found: Samples, key: str, kind: str, *, estimated: bool = False) -> float:
    name = "streamsvc_usage_estimated_tokens_total" if estimated else "streamsvc_usage_tokens_total"
    return found.get((name, (("key", key), ("kind", kind))), 0.0)


def answers(found: Samples, key: str, source: str | None = None) -> float:
    return sum(v for (name, labels), v in found.items()
               if name == "streamsvc_usage_answers_total" and ("key", key) in labels
               and (source is None or ("source", source) in labels))


async def wait_for_answers(session: aiohttp.ClientSession, url: str, key: str,
                           count: int) -> Samples:
    """The samples once ``count`` answers of ``key`` are counted (a hang guard of 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = await samples(session, url)
        if answers(found, key) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


def done_usage(text: str) -> dict[str, Any]:
    """The usage in a stream's ``done`` event (the upstream's, or null)."""
    block = next(b for b in text.split("\n\n") if "event: done" in b.splitlines())
    data = next(line for line in block.splitlines() if line.startswith("data: "))
    usage: dict[str, Any] = json.loads(data[6:])["usage"]
    return usage


@pytest.fixture(name="secured")
async def secured_relay(start_server: StartServer, simulator: SimulatorServer,
                        monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    return await secured(start_server, simulator, monkeypatch, f"{KEY_A},{KEY_B}",
                         journal={"resume_grace_s": 0.2})


# -- the upstream's own count --------------------------------------------------------------------


async def test_upstream_usage_is_counted_per_key(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    auth = secured.app[AUTH]
    key_a, key_b = auth.key_id(KEY_A), auth.key_id(KEY_B)
    async with session.post(secured.url + "/v1/chat/stream", json=ECHO, headers=bearer(KEY_A)
                            ) as response:
        usage = done_usage(await response.text())
    async with session.post(secured.url + "/v1/streams", json=ECHO, headers=bearer(KEY_B)
                            ) as response:
        created = await response.json()
    async with session.get(secured.url + created["events_url"]) as response:
        assert done_usage(await response.text()) == usage  # the same prompt, the same answer
    for body in ({**ECHO, "stream": True}, {**ECHO, "stream": True,
                                            "stream_options": {"include_usage": True}}):
        async with session.post(secured.url + "/v1/chat/completions", json=body,
                                headers=bearer(KEY_B)) as response:
            assert (await response.text()).endswith("data: [DONE]\n\n")

    found = await wait_for_answers(session, secured.url, key_b, 3)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert tokens(found, key_a, "prompt") == usage["prompt_tokens"]
    assert tokens(found, key_a, "completion") == usage["completion_tokens"]
    assert tokens(found, key_b, "prompt") == 3 * usage["prompt_tokens"]
    assert tokens(found, key_b, "completion") == 3 * usage["completion_tokens"]
    assert answers(found, key_a, "upstream") == 1 and answers(found, key_b, "upstream") == 3
    assert answers(found, key_a, "estimated") == answers(found, key_b, "estimated") == 0
    assert tokens(found, key_a, "prompt", estimated=True) == 0
    # Key ids only: never a key, never the prompt.
    text = (await session.get(secured.url + "/metrics")).content
    exposed = (await text.read()).decode()
    assert KEY_A not in exposed and KEY_B not in exposed and PROMPT not in exposed
    assert "anonymous" not in exposed


async def test_usage_without_auth_is_anonymous(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.get(relay.url + "/v1/chat/stream", params={"q": PROMPT, "model": "echo"}
                           ) as response:
        usage = done_usage(await response.text())
    found = await wait_for_answers(session, relay.url, "anonymous", 1)
    assert tokens(found, "anonymous", "prompt") == usage["prompt_tokens"]
    assert tokens(found, "anonymous", "completion") == usage["completion_tokens"]
    assert answers(found, "anonymous", "upstream") == 1


async def test_non_streamed_answer_is_counted(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    key_a = secured.app[AUTH].key_id(KEY_A)
    async with session.post(secured.url + "/v1/chat/completions", json=ECHO,
                            headers=bearer(KEY_A)) as response:
        assert response.status == 200
        usage = (await response.json())["usage"]
    found = await samples(session, secured.url)  # counted before the answer went out
    assert tokens(found, key_a, "prompt") == usage["prompt_tokens"] > 0
    assert tokens(found, key_a, "completion") == usage["completion_tokens"] > 0
    assert answers(found, key_a, "upstream") == 1


async def test_a_non_streamed_request_left_early_counts_the_prompt(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    """The upstream had the prompt and had begun the answer when the client gave up.

    A non-streamed answer is the streamed pipeline collected: what the upstream
    had generated by then counts (estimated), less than the whole answer.
    """
    key_a = secured.app[AUTH].key_id(KEY_A)
    with pytest.raises(TimeoutError):
        async with session.post(secured.url + "/v1/chat/completions", json=LONG,
                                headers=bearer(KEY_A),
                                timeout=aiohttp.ClientTimeout(total=0.3)) as response:
            await response.read()
    found = await wait_for_answers(session, secured.url, key_a, 1)
    assert answers(found, key_a, "estimated") == 1
    assert tokens(found, key_a, "prompt") == estimate_prompt_tokens(LONG["messages"])
    assert 0 < tokens(found, key_a, "completion") < LONG_TOKENS


# -- estimates -----------------------------------------------------------------------------------


async def _leave_after_some_events(response: aiohttp.ClientResponse) -> None:
    """Read until a few content events came, then hang up."""
    seen = b""
    while seen.count(b'"content"') < 3:
        seen += await response.content.readany()
    response.close()


@pytest.mark.parametrize("endpoint", ["openai", "chat_stream", "streams", "get_chat_stream"])
async def test_a_client_that_leaves_early_gets_an_estimated_partial_usage(
    secured: RunningServer, session: aiohttp.ClientSession, endpoint: str,
) -> None:
    key_a = secured.app[AUTH].key_id(KEY_A)
    url = secured.url
    if endpoint == "openai":
        response = await session.post(url + "/v1/chat/completions", headers=bearer(KEY_A),
                                      json={**LONG, "stream": True})
    elif endpoint == "chat_stream":
        response = await session.post(url + "/v1/chat/stream", json=LONG, headers=bearer(KEY_A))
    elif endpoint == "streams":
        async with session.post(url + "/v1/streams", json=LONG, headers=bearer(KEY_A)) as made:
            events_url = (await made.json())["events_url"]
        response = await session.get(url + events_url)
    else:
        async with session.post(url + "/v1/tickets", headers=bearer(KEY_A)) as made:
            ticket = (await made.json())["ticket"]
        response = await session.get(url + "/v1/chat/stream", params={
            "ticket": ticket, "q": "tell me a story", "model": "sim-small",
            "extra": json.dumps({"simulate": LONG["simulate"]})})
    assert response.status == 200
    await _leave_after_some_events(response)

    # A resumable stream goes on for resume_grace_s (0.2 s here), then is cancelled.
    found = await wait_for_answers(session, url, key_a, 1)
    assert answers(found, key_a) == answers(found, key_a, "estimated") == 1
    completion = tokens(found, key_a, "completion")
    assert 0 < completion < LONG_TOKENS  # the full answer's upstream count is 400
    assert tokens(found, key_a, "completion", estimated=True) == completion
    prompt = estimate_prompt_tokens(LONG["messages"])
    assert tokens(found, key_a, "prompt") == tokens(found, key_a, "prompt", estimated=True) == prompt


async def test_an_upstream_that_sends_no_usage_is_estimated(
    start_server: StartServer, fake_upstream: FakeUpstream, session: aiohttp.ClientSession,
) -> None:
    pieces = ["Hello", " world", ", and good", " night!"]  # 27 characters: 7 tokens

    async def no_usage(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream_options"] == {"include_usage": True}  # streamsvc asked for it
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await response.write(b"data: " + Chunk(chunk).to_json() + b"\n\n")
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}  # no usage
        await response.write(b"data: " + Chunk(end).to_json() + b"\n\ndata: [DONE]\n\n")
        return response

    upstream = await fake_upstream(no_usage)
    relay = await start_server(overrides=relay_overrides(upstream))
    async with session.post(relay.url + "/v1/chat/stream", json=ECHO) as response:
        assert done_usage(await response.text()) is None
    async with session.post(relay.url + "/v1/chat/completions",
                            json={**ECHO, "stream": True}) as response:
        assert (await response.text()).endswith("data: [DONE]\n\n")
    found = await wait_for_answers(session, relay.url, "anonymous", 2)
    assert answers(found, "anonymous", "estimated") == 2
    assert tokens(found, "anonymous", "completion") == 2 * 7
    assert tokens(found, "anonymous", "prompt") == 2 * estimate_prompt_tokens(ECHO["messages"])


async def test_a_refused_request_counts_no_usage(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    body = {**ECHO, "simulate": {"fault": "429"}, "streamsvc": {"retries": False}}
    async with session.post(relay.url + "/v1/chat/stream", json=body) as response:
        assert "event: error" in await response.text()
    async with session.post(relay.url + "/v1/chat/completions", json={**body, "stream": True}
                            ) as response:
        assert response.status == 429
    found = await samples(session, relay.url)
    assert answers(found, "anonymous") == 0


# -- once ----------------------------------------------------------------------------------------


async def test_each_answer_is_counted_once(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    """Readers come and go, the stream is read again and deleted: still one answer."""
    key_a = secured.app[AUTH].key_id(KEY_A)
    async with session.post(secured.url + "/v1/streams", json=ECHO, headers=bearer(KEY_A)
                            ) as response:
        created = await response.json()
    url = secured.url + created["events_url"]
    async with session.get(url) as response:
        text = await response.text()
    usage = done_usage(text)
    first_id = next(line[4:] for line in text.splitlines() if line.startswith("id: "))
    async with session.get(url, headers={"Last-Event-ID": first_id}) as response:
        assert "event: done" in await response.text()  # a replay, not a new answer
    async with session.delete(secured.url + f"/v1/streams/{created['id']}",
                              headers=bearer(KEY_A)) as response:
        assert (await response.json())["status"] == "ended"
    await asyncio.sleep(0.1)
    found = await samples(session, secured.url)
    assert answers(found, key_a) == 1
    assert tokens(found, key_a, "completion") == usage["completion_tokens"]
    assert tokens(found, key_a, "prompt") == usage["prompt_tokens"]


async def test_a_cancelled_stream_is_counted_once(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    key_a = secured.app[AUTH].key_id(KEY_A)
    async with session.post(secured.url + "/v1/streams", json=LONG, headers=bearer(KEY_A)
                            ) as response:
        created = await response.json()
    response = await session.get(secured.url + created["events_url"])
    await _leave_after_some_events(response)
    async with session.delete(secured.url + f"/v1/streams/{created['id']}",
                              headers=bearer(KEY_A)) as response:
        assert response.status == 200
    found = await wait_for_answers(session, secured.url, key_a, 1)
    await asyncio.sleep(0.4)  # past the grace period: nothing more is counted
    later = await samples(session, secured.url)

    def usage(found: Samples) -> Samples:
        return {k: v for k, v in found.items() if k[0].startswith("streamsvc_usage")}

    assert usage(later) == usage(found)
    assert answers(later, key_a) == answers(later, key_a, "estimated") == 1


# -- journal lag ---------------------------------------------------------------------------------


async def test_journal_lag_is_exposed_on_metrics(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    relay.app[METRICS].journal_lag(0.003)
    relay.app[METRICS].journal_lag(0.2)
    found = await samples(session, relay.url)
    name = "streamsvc_journal_lag_seconds"
    assert found[(name + "_count", ())] == 2
    assert found[(name + "_sum", ())] == pytest.approx(0.203)
    assert found[(name + "_bucket", (("le", "0.005"),))] == 1


# -- the estimate --------------------------------------------------------------------------------


def test_prompt_estimate_is_four_characters_a_token_at_least_one_per_message() -> None:
    assert estimate_prompt_tokens([{"role": "user", "content": "hi"}]) == 1
    assert estimate_prompt_tokens([{"role": "system", "content": "x" * 9},
                                   {"role": "user", "content": [
                                       {"type": "text", "text": "abcd"},
                                       {"type": "image_url", "image_url": {"url": "data:x"}}]},
                                   {"role": "assistant", "content": None},
                                   {"role": "user", "content": ""}]) == 3 + 1
    assert estimate_prompt_tokens("not messages") == 0


def test_completion_estimate_counts_every_kind_of_text() -> None:
    meter = UsageMeter()
    meter.add(Chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
    meter.add(Chunk({"choices": [{"index": 0, "delta": {"content": "abcdef"}}]}))
    meter.add(Chunk({"choices": [
        {"index": 0, "delta": {"reasoning_content": "ab"}},
        {"index": 1, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "get", "arguments": '{"a":1}'}}]}},
    ]}))
    assert meter.chars == 6 + 2 + 3 + 7
    assert meter.result(5) == Usage(prompt_tokens=5, completion_tokens=5, estimated=True)
    meter.add(Chunk({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 22}}))
    assert meter.result(5) == Usage(prompt_tokens=11, completion_tokens=22, estimated=False)
