"""Heartbeat comments go out while the first token is awaited, on every stream format."""

from __future__ import annotations

import aiohttp
import openai

from streamsvc.simulator import SimulatorServer
from tests.conftest import StartServer, relay_overrides

BODY = {"model": "echo", "messages": [{"role": "user", "content": " slow hello"}]}
SLOW = {"simulate": {"first_token_delay": 0.8}}


async def _read_all(response: aiohttp.ClientResponse) -> tuple[bytes, bytes]:
    """(bytes before the first ``data:`` line, the whole body)."""
    body = b""
    while chunk := await response.content.readany():
        body += chunk
    assert b"data: " in body, "stream ended before any data"
    return body[: body.index(b"data: ")], body


async def test_pings_before_first_token_on_streamsvc_format(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url,
                                                         server={"heartbeat_s": 0.2}))
    async with session.post(f"{relay.url}/v1/chat/stream", json={**BODY, **SLOW}) as response:
        assert response.status == 200
        before, body = await _read_all(response)
    assert before.startswith(b": ping\n\n")  # pings from the headers on
    assert before.count(b": ping\n\n") >= 2
    assert b"\n\nretry: 1000\nid: " in before  # in the first event's block, not alone
    assert b"retry: 1000\n\n" not in before
    assert b"event: done" in body


async def test_pings_before_first_token_on_openai_format_and_sdk_ignores_them(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url,
                                                         server={"heartbeat_s": 0.2}))
    body = {**BODY, **SLOW, "stream": True}
    async with session.post(f"{relay.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        before, body = await _read_all(response)
    assert before.count(b": ping\n\n") >= 2
    assert b"retry:" not in body and b"\nid:" not in body  # they break OpenAI SDKs
    assert body.endswith(b"data: [DONE]\n\n")

    client = openai.AsyncOpenAI(base_url=f"{relay.url}/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="echo", messages=BODY["messages"], stream=True,
            extra_body=SLOW,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text == " slow hello"
