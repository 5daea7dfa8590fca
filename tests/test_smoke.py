"""The relay answers over real sockets in each of its formats."""

from __future__ import annotations

import aiohttp

from streamsvc.sse import SSEDecoder
from tests.conftest import RunningServer
from tests.helpers import text_of


async def test_one_shot_get_streams_echo(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{relay.url}/v1/chat/stream", params={"model": "echo", "q": " Hi there"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        body = await r.read()
    decoder = SSEDecoder()
    events = decoder.feed(body)
    assert decoder.retry == 1000 and body.startswith(b"retry: 1000\nid: ")  # in event 1
    assert text_of(events) == " Hi there"  # the echo, leading space and all
    assert events[-1].event == "done" and not decoder.pending
