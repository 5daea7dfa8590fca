"""Soak: many streams whose clients leave at random points leak nothing.

Hundreds of streams on every endpoint family, each client hanging up after a
random number of events (or reading to the end, or leaving before the first
token). Afterwards the relay has no generation running, no task left over,
no upstream connection open, and the simulator saw every request end.
"""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import aiohttp

from streamsvc.server.state import REGISTRY
from streamsvc.upstream.simulator import SimulatorServer
from tests.conftest import StartServer, relay_overrides, wait_until

STREAMS = 300
PATHS = ("/v1/chat/completions", "/v1/chat/stream", "/v1/streams")


def _body(tokens: int) -> dict[str, Any]:
    return {"model": "sim-small", "messages": [{"role": "user", "content": "soak"}],
            "stream": True, "simulate": {"tokens": tokens, "rate": 200}}


async def _one(session: aiohttp.ClientSession, url: str, path: str, leave_after: int) -> None:
    """One client: reads ``leave_after`` data lines (-1: all of them), then hangs up."""
    if path == "/v1/streams":
        async with session.post(url + path, json=_body(40)) as created:
            events_url = (await created.json())["events_url"]
        request = session.get(url + events_url)
    else:
        request = session.post(url + path, json=_body(40))
    async with request as response:
        seen = 0
        async for line in response.content:
            if line.startswith(b"data:"):
                seen += 1
                if seen == leave_after:
                    response.close()
                    return


async def test_clients_leaving_at_random_points_leak_nothing(
    start_server: StartServer, simulator: SimulatorServer
) -> None:
    # A short grace period: resumable streams whose reader left stop soon.
    relay = await start_server(overrides=relay_overrides(
        simulator.url, journal={"resume_grace_s": 0.2}))
    rng = random.Random(7)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _one(session, relay.url, "/v1/chat/stream", -1)  # warm up
        gc.collect()
        tasks_before = len([t for t in asyncio.all_tasks()
                            if "RequestHandler.start" not in repr(t.get_coro())])
        jobs = [
            _one(session, relay.url, rng.choice(PATHS), rng.choice([-1, 1, 2, 5, 10, 20, 30]))
            for _ in range(STREAMS)
        ]
        await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
    registry = relay.app[REGISTRY]
    assert await wait_until(lambda: len(registry) == 0, timeout=10), f"{len(registry)} running"
    assert await wait_until(lambda: simulator.stats.active == 0, timeout=10)
    stats = simulator.stats
    assert stats.completed + stats.disconnected == stats.requests
    # (Not every stream need reach the simulator: a client that leaves before
    # the upstream request is sent cancels it first.)
    assert stats.requests > STREAMS / 2
    # Every handler, generation and upstream reader is gone: only what ran before
    # is left, besides the tasks of idle keep-alive connections (the relay's
    # upstream pool keeps some open to the simulator; none is streaming).
    def leftover() -> list[str]:
        return [repr(t.get_coro()) for t in asyncio.all_tasks()
                if "RequestHandler.start" not in repr(t.get_coro())]

    assert await wait_until(lambda: len(leftover()) <= tasks_before, timeout=10), leftover()
