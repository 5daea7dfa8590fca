"""Soak: many streams whose clients leave at random points leak nothing.

Hundreds of streams on every endpoint family, each client hanging up after a
random number of events (or reading to the end, or leaving before the first
token). Afterwards the relay has no generation running, no task left over,
no upstream connection open, and the simulator saw every request end.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
from typing import Any

import aiohttp

from streamsvc.server.state import REGISTRY
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.redis_server import RedisServer

STREAMS = 300
POOL = 8  # journal.redis_max_connections of each instance in the Redis soak
PATHS = ("/v1/chat/completions", "/v1/chat/stream", "/v1/streams")


def _body(tokens: int) -> dict[str, Any]:
    return {"model": "sim-small", "messages": [{"role": "user", "content": "soak"}],
            "stream": True, "simulate": {"tokens": tokens, "rate": 200}}


async def _one(session: aiohttp.ClientSession, url: str, path: str, leave_after: int,
               read_url: str | None = None) -> None:
    """One client: reads ``leave_after`` data lines (-1: all of them), then hangs up.

    ``read_url``: the instance that serves the events of a ``/v1/streams`` stream.
    """
    if path == "/v1/streams":
        async with session.post(url + path, json=_body(40)) as created:
            events_url = (await created.json())["events_url"]
        request = session.get((read_url or url) + events_url)
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


def _tasks() -> list[str]:
    return [repr(t.get_coro()) for t in asyncio.all_tasks()
            if "RequestHandler.start" not in repr(t.get_coro())]


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))  # type: ignore[union-attr]


def _redis_clients(redis: RedisServer) -> int:
    info = redis.command("INFO", "clients").decode()
    # Minus the connection that asks.
    return int(re.search(r"connected_clients:(\d+)", info).group(1)) - 1  # type: ignore[union-attr]


async def _soak_round(session: aiohttp.ClientSession, servers: list[RunningServer], count: int,
                      rng: random.Random) -> None:
    jobs = []
    for _ in range(count):
        path = rng.choice(PATHS)
        start, read = rng.choice(servers), rng.choice(servers)  # half the readers read elsewhere
        jobs.append(_one(session, start.url, path, rng.choice([-1, 1, 2, 5, 10, 20, 30]),
                         read_url=read.url))
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=300)


async def test_two_instances_on_redis_leak_no_reader_connection_or_task(
    redis_server: RedisServer, start_server: StartServer, simulator: SimulatorServer
) -> None:
    """The same soak across two instances on one Redis.

    Figures: ``SOAK_STREAMS=2000 SOAK_ROUNDS=4 pytest -s -k redis tests/test_soak.py``.
    """
    streams = int(os.environ.get("SOAK_STREAMS", str(STREAMS)))
    overrides = relay_overrides(simulator.url, journal={
        "backend": "redis", "redis_url": redis_server.url, "resume_grace_s": 0.2,
        "redis_max_connections": POOL,
        "retention_s": float(os.environ.get("SOAK_RETENTION_S", "300"))})
    servers = [await start_server(overrides=overrides), await start_server(overrides=overrides)]
    rng = random.Random(11)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _soak_round(session, servers, 100, rng)  # warm up: pools reach their size
        for server in servers:
            assert await wait_until(lambda s=server: len(s.app[REGISTRY]) == 0, timeout=10)
        gc.collect()
        before = (_redis_clients(redis_server), len(_tasks()), _rss_kib())
        for round_ in range(int(os.environ.get("SOAK_ROUNDS", "1"))):
            await _soak_round(session, servers, streams, rng)
            gc.collect()
            print(f"\nround {round_ + 1}: RSS {_rss_kib()} KiB,"
                  f" Redis clients {_redis_clients(redis_server)}, tasks {len(_tasks())}")
    for server in servers:
        registry = server.app[REGISTRY]
        assert await wait_until(lambda r=registry: len(r) == 0, timeout=10), f"{len(registry)}"
    assert await wait_until(lambda: simulator.stats.active == 0, timeout=10)
    assert await wait_until(lambda: len(_tasks()) <= before[1], timeout=10), _tasks()
    gc.collect()
    after = (_redis_clients(redis_server), len(_tasks()), _rss_kib())
    print(f"\nsoak on Redis, {streams} streams over 2 instances: Redis clients {before[0]} ->"
          f" {after[0]}, tasks {before[1]} -> {after[1]}, RSS {before[2]} -> {after[2]} KiB"
          f" ({after[2] - before[2]:+d})")
    # Each instance holds at most its bounded pool (journal.redis_max_connections),
    # whatever the number of streams and readers: no connection per reader.
    assert after[0] <= 2 * POOL, (before, after)
