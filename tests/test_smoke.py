"""The relay answers over real sockets in each of its formats."""

from __future__ import annotations

import aiohttp

from tests.conftest import RunningServer


async def test_one_shot_get_streams_echo(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{relay.url}/v1/chat/stream", params={"model": "echo", "q": " Hi there"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.text()
    assert text.startswith("retry: 1000\nid: ")  # in the first event's block
    assert "event: done" in text
