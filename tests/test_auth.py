"""Client API keys, EventSource tickets and CORS, over real sockets.

Auth is off unless ``STREAMSVC_API_KEYS`` holds keys; then ``/v1/*`` needs
``Authorization: Bearer``, or a signed ``?ticket=`` where EventSource reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import openai
import pytest

from streamsvc.server.state import AUTH
from streamsvc.server.tickets import MemoryTicketStore
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.helpers import bearer, secured

KEY_A = "sk-client-a-5b1e0c3f9d2a-never-log-me"
KEY_B = "sk-client-b-77aa31c0e4f8-never-log-me"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
SLOW = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
        "simulate": {"rate": 20, "tokens": 400}}


@pytest.fixture(name="secured")
async def secured_relay(start_server: StartServer, simulator: SimulatorServer,
                        monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    return await secured(start_server, simulator, monkeypatch, f"{KEY_A}, {KEY_B}")


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body: dict[str, Any] = (await response.json())["error"]
    return body


# -- auth off ------------------------------------------------------------------------------------


async def test_auth_is_off_by_default_and_start_up_says_so(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("STREAMSVC_API_KEYS", raising=False)
    caplog.set_level(logging.INFO)
    relay = await start_server(overrides=relay_overrides(simulator.url))
    assert [r for r in caplog.records if r.getMessage().startswith("auth: off")]
    async with session.get(relay.url + "/v1/models") as response:
        assert response.status == 200
    async with session.post(relay.url + "/v1/streams", json=BODY) as response:
        created = await response.json()
    assert created["events_url"] == f"/v1/streams/{created['id']}/events"  # no ticket needed
    async with session.get(relay.url + created["events_url"]) as response:
        assert response.status == 200
        assert "event: done" in await response.text()
    async with session.post(relay.url + "/v1/chat/completions", json=BODY) as response:
        assert response.status == 200


async def test_an_empty_key_variable_means_auth_off(
    start_server: StartServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMSVC_API_KEYS", " , ")
    relay = await start_server()
    assert not relay.app[AUTH].enabled
    async with session.get(relay.url + "/v1/models") as response:
        assert response.status == 200


# -- keys ----------------------------------------------------------------------------------------


async def test_v1_needs_a_valid_bearer_key(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.get(secured.url + "/v1/models") as response:
        assert response.status == 401
        error = await error_of(response)
        assert error["code"] == "unauthorized" and error["type"] == "authentication_error"
        assert "missing" in error["message"]
    async with session.get(secured.url + "/v1/models", headers=bearer("sk-wrong-123")) as response:
        assert response.status == 401
        text = await response.text()
        assert "not valid" in text and "sk-wrong-123" not in text
    async with session.get(secured.url + "/v1/models", headers={"Authorization": "Basic x"}
                           ) as response:
        assert response.status == 401
    for key in (KEY_A, KEY_B):
        async with session.get(secured.url + "/v1/models", headers=bearer(key)) as response:
            assert response.status == 200
    async with session.post(secured.url + "/v1/chat/stream", json=BODY) as response:
        assert response.status == 401
    async with session.post(secured.url + "/v1/chat/stream", json=BODY, headers=bearer(KEY_A)
                            ) as response:
        assert response.status == 200 and "event: done" in await response.text()


async def test_health_metrics_page_and_static_stay_open(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/streamsvc.js"):
        async with session.get(secured.url + path) as response:
            assert response.status == 200, path


async def test_the_openai_sdk_sends_its_api_key(secured: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=secured.url + "/v1", api_key=KEY_A, max_retries=0)
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi sdk"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "hi sdk"
    wrong = openai.AsyncOpenAI(base_url=secured.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    await client.close()
    await wrong.close()


# -- tickets -------------------------------------------------------------------------------------


async def create(relay: RunningServer, session: aiohttp.ClientSession, key: str = KEY_A,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with session.post(relay.url + "/v1/streams", json=body or BODY, headers=bearer(key)
                            ) as response:
        assert response.status == 201
        created: dict[str, Any] = await response.json()
    return created


async def test_events_url_carries_a_ticket_for_that_stream(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    created = await create(secured, session)
    url = created["events_url"]
    assert "?ticket=" in url and KEY_A not in url
    async with session.get(secured.url + url) as response:  # no Authorization: EventSource
        assert response.status == 200
        text = await response.text()
    assert "event: done" in text
    last_id = [line[4:] for line in text.splitlines() if line.startswith("id: ")][-1]
    # EventSource reconnects with the same URL: still accepted for its stream.
    async with session.get(secured.url + url, headers={"Last-Event-ID": last_id}) as response:
        assert response.status == 204
    # The Authorization header works too, for the key that created the stream.
    async with session.get(secured.url + f"/v1/streams/{created['id']}/events",
                           headers=bearer(KEY_A)) as response:
        assert response.status == 200


async def test_forged_and_wrong_stream_tickets(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    first = await create(secured, session, body=SLOW)
    second = await create(secured, session, body=SLOW)
    ticket = first["events_url"].split("?ticket=")[1]
    forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    async with session.get(secured.url + f"/v1/streams/{first['id']}/events?ticket={forged}"
                           ) as response:
        assert response.status == 401
        assert (await error_of(response))["message"] == "ticket signature invalid"
    async with session.get(secured.url + f"/v1/streams/{second['id']}/events?ticket={ticket}"
                           ) as response:
        assert response.status == 403
        assert (await error_of(response))["code"] == "forbidden"
    # A ticket is not a key anywhere else.
    async with session.get(secured.url + f"/v1/models?ticket={ticket}") as response:
        assert response.status == 401
    for created in (first, second):
        async with session.delete(secured.url + f"/v1/streams/{created['id']}",
                                  headers=bearer(KEY_A)) as response:
            assert response.status == 200


async def test_an_unused_ticket_expires(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMSVC_API_KEYS", KEY_A)
    relay = await start_server(overrides=relay_overrides(
        simulator.url, auth={"ticket_ttl_s": 0.2}))
    created = await create(relay, session)
    await asyncio.sleep(0.4)
    async with session.get(relay.url + created["events_url"]) as response:
        assert response.status == 401
        assert (await error_of(response))["message"] == "ticket expired"


async def test_one_key_cannot_read_or_stop_another_keys_stream(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    created = await create(secured, session, KEY_A, body=SLOW)
    stream = f"/v1/streams/{created['id']}"
    async with session.get(secured.url + stream + "/events", headers=bearer(KEY_B)) as response:
        assert response.status == 403
    async with session.delete(secured.url + stream, headers=bearer(KEY_B)) as response:
        assert response.status == 403
    async with session.post(secured.url + "/v1/tickets", json={"stream_id": created["id"]},
                            headers=bearer(KEY_B)) as response:
        assert response.status == 403
    async with session.post(secured.url + "/v1/chat/stream", json=BODY, headers=bearer(KEY_B)
                            ) as response:
        text = await response.text()
    other = [line[4:] for line in text.splitlines() if line.startswith("id: ")][-1]
    async with session.get(secured.url + "/v1/chat/stream", headers={
            **bearer(KEY_B), "Last-Event-ID": f"{created['id']}:1"}) as response:
        assert response.status == 403
    assert other.split(":")[0] != created["id"]
    # The owner gets a fresh ticket for its stream, and stops it.
    async with session.post(secured.url + "/v1/tickets", json={"stream_id": created["id"]},
                            headers=bearer(KEY_A)) as response:
        assert response.status == 201
        fresh = await response.json()
    assert fresh["scope"] == "stream" and fresh["url"].startswith(stream + "/events?ticket=")
    async with session.delete(secured.url + stream, headers=bearer(KEY_A)) as response:
        assert response.status == 200
    async with session.get(secured.url + fresh["url"]) as response:
        assert response.status == 200 and "event: done" in await response.text()


async def test_a_chat_ticket_serves_the_one_shot_get_and_its_resume(
    secured: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.post(secured.url + "/v1/tickets", headers=bearer(KEY_A)) as response:
        assert response.status == 201
        minted = await response.json()
    assert minted["scope"] == "chat" and minted["object"] == "ticket"
    url = secured.url + minted["url"] + "&model=echo&q=one%20shot"
    async with session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    ids = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
    assert "event: done" in text and ids
    stream_id = ids[0].split(":")[0]
    # EventSource's reconnect: the same URL with Last-Event-ID resumes the stream it started.
    async with session.get(url, headers={"Last-Event-ID": ids[0]}) as response:
        assert response.status == 200
        assert "event: done" in await response.text()
    # The same URL with no Last-Event-ID replays that stream instead of starting another.
    async with session.get(url) as response:
        assert response.status == 200
        assert stream_id in await response.text()
    # Not good for another stream, nor for an events_url.
    created = await create(secured, session)
    async with session.get(url, headers={"Last-Event-ID": f"{created['id']}:1"}) as response:
        assert response.status == 403
    async with session.get(secured.url + f"/v1/streams/{created['id']}/events?ticket="
                           + minted["ticket"]) as response:
        assert response.status == 403
    stream_ticket = created["events_url"].split("?ticket=")[1]
    async with session.get(secured.url + f"/v1/chat/stream?ticket={stream_ticket}&q=x"
                           "&model=echo") as response:
        assert response.status == 403


async def test_keys_and_tickets_never_reach_logs_bodies_or_urls(
    secured: RunningServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    tickets: list[str] = []

    async def call(method: str, path: str, key: str | None = KEY_A, **kwargs: Any) -> str:
        headers = bearer(key) if key else {}
        async with session.request(method, secured.url + path, headers=headers, **kwargs
                                   ) as response:
            text = await response.text()
            seen.extend([path, str(dict(response.headers)), text])
            return text

    created = json.loads(await call("POST", "/v1/streams", json=BODY))
    tickets.append(created["events_url"].split("?ticket=")[1])
    await call("GET", created["events_url"], key=None)
    minted = json.loads(await call("POST", "/v1/tickets"))
    tickets.append(minted["ticket"])
    await call("GET", minted["url"] + "&model=echo&q=hi", key=None)
    await call("POST", "/v1/chat/completions", json={**BODY, "stream": True})
    await call("POST", "/v1/chat/stream", json=BODY)
    await call("GET", "/v1/models", key="sk-wrong-key-abc")
    await call("GET", "/v1/models", key=None)
    await call("GET", created["events_url"][:-3] + "xyz", key=None)
    await call("DELETE", f"/v1/streams/{created['id']}", key=KEY_B)
    assert "/v1/streams" in caplog.text  # the access log was captured
    for secret in (KEY_A, KEY_B, "sk-wrong-key-abc", "never-log-me", *tickets):
        assert secret not in caplog.text
    for secret in (KEY_A, KEY_B, "sk-wrong-key-abc", "never-log-me"):
        assert not any(secret in text for text in seen)


# -- CORS ----------------------------------------------------------------------------------------


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


async def test_cors_preflight_for_a_configured_origin(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMSVC_API_KEYS", KEY_A)
    relay = await start_server(overrides=relay_overrides(
        simulator.url, auth={"cors_origins": ["https://app.example"]}))
    async with session.options(relay.url + "/v1/chat/completions", headers=PREFLIGHT
                               ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
    async with session.options(relay.url + "/v1/chat/stream", headers={
            **PREFLIGHT, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id"}) as response:
        assert response.status == 200
        assert "last-event-id" in response.headers["Access-Control-Allow-Headers"].lower()
    async with session.post(relay.url + "/v1/chat/completions", json=BODY, headers={
            **bearer(KEY_A), "Origin": "https://app.example"}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    async with session.options(relay.url + "/v1/chat/completions", headers={
            **PREFLIGHT, "Origin": "https://evil.example"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_no_cors_by_default(
    relay: RunningServer, session: aiohttp.ClientSession,
) -> None:
    async with session.options(relay.url + "/v1/chat/completions", headers=PREFLIGHT
                               ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with session.post(relay.url + "/v1/chat/completions", json=BODY,
                            headers={"Origin": "https://app.example"}) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_ticket_bindings_are_forgotten_after_retention_and_ticket_ttl(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMSVC_API_KEYS", KEY_A)
    relay = await start_server(overrides=relay_overrides(
        simulator.url, journal={"retention_s": 0.0}, auth={"ticket_ttl_s": 1.0}))
    tickets = relay.app[AUTH].tickets
    assert isinstance(tickets, MemoryTicketStore)
    created = await create(relay, session)
    async with session.get(relay.url + created["events_url"]) as response:
        assert "event: done" in await response.text()
    assert tickets.tracked() == 1  # the events_url ticket, bound to its stream
    assert await wait_until(lambda: tickets.tracked() == 0, timeout=5)
    async with session.get(relay.url + created["events_url"]) as response:
        assert response.status == 401  # unbound, and past its TTL
