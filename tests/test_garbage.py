"""A stream that ended leaves nothing of streamsvc's for the cyclic garbage collector.

Every object a stream made is freed by reference counting when the stream
ends, on every endpoint and on the failure paths: a reference cycle would
keep the stream's whole chain (its Rx subscription, upstream exchange,
decoder, encoder) alive until a collection, and the collections of a busy
relay cost more than the streams' own work (measured: about 0.13 ms a stream
before the cycles were cut). Each test runs real streams through a real
relay and simulator with ``gc.DEBUG_SAVEALL`` on, then looks at what the
collector found.
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.helpers import get_events, read_events, story
from tests.redis_server import RedisServer

Scenario = Callable[[RunningServer, aiohttp.ClientSession], Awaitable[None]]


def _owner(obj: object) -> str:
    """The module an object's code or class comes from."""
    if isinstance(obj, types.FunctionType | types.CoroutineType):
        return obj.__module__ if isinstance(obj, types.FunctionType) else (
            obj.cr_code.co_filename)
    if isinstance(obj, types.MethodType):
        return _owner(obj.__func__)
    if isinstance(obj, types.FrameType):
        return obj.f_code.co_filename
    return type(obj).__module__


def _ours(garbage: list[Any]) -> list[str]:
    found = []
    for obj in garbage:
        owner = _owner(obj)
        if owner.startswith("streamsvc") or "/streamsvc/" in owner:
            found.append(f"{type(obj).__qualname__} {getattr(obj, '__qualname__', '')}".strip())
    return sorted(set(found))


@pytest.fixture
def saved_garbage() -> Iterator[list[Any]]:
    """``gc.garbage`` as the collector fills it with everything unreachable, collection off."""
    gc.collect()
    gc.garbage.clear()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def _chat(relay: RunningServer, session: aiohttp.ClientSession, path: str,
                body: dict[str, Any]) -> None:
    async with session.post(relay.url + path, json={**body, "stream": True}) as response:
        assert response.status == 200
        await read_events(response)


async def _openai(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    await _chat(relay, session, "/v1/chat/completions", story(5))


async def _chat_stream(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    await _chat(relay, session, "/v1/chat/stream", story(5))


async def _streams(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.post(relay.url + "/v1/streams", json=story(5)) as response:
        assert response.status == 201
        created = await response.json()
    read = await get_events(session, relay.url + created["events_url"])
    assert read.final()["finish_reason"] == "stop"


async def _responses(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    body = {"model": "sim-small", "input": "tell me a story", "stream": True}
    async with session.post(relay.url + "/v1/responses", json=body) as response:
        assert response.status == 200
        await read_events(response)


async def _retried(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    await _chat(relay, session, "/v1/chat/completions",
                story(5, fault="500", fail_times=1, key="garbage-retried"))


async def _cut_mid_stream(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    await _chat(relay, session, "/v1/chat/stream", story(8, fault="drop", fault_at=3))


async def _upstream_error(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    await _chat(relay, session, "/v1/chat/completions", story(5, fault="error_event", fault_at=2))


async def _hang_up(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.post(relay.url + "/v1/chat/completions",
                            json={**story(200, rate=100), "stream": True}) as response:
        await read_events(response, stop_after=3)


SCENARIOS: dict[str, Scenario] = {
    "openai": _openai, "chat-stream": _chat_stream, "streams": _streams,
    "responses": _responses, "retried": _retried, "cut-mid-stream": _cut_mid_stream,
    "upstream-error": _upstream_error, "client-hang-up": _hang_up,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_a_finished_stream_leaves_no_reference_cycle(
    name: str, start_server: StartServer, simulator: SimulatorServer,
    session: aiohttp.ClientSession, saved_garbage: list[Any],
) -> None:
    relay = await start_server(overrides=relay_overrides(
        simulator.url, pipeline={"retry_backoff_base_ms": 1.0}))
    await SCENARIOS[name](relay, session)  # the first one warms caches and pools
    before = simulator.stats.disconnected
    gc.collect()
    saved_garbage.clear()
    for _ in range(3):
        await SCENARIOS[name](relay, session)
    if name == "client-hang-up":
        assert await wait_until(lambda: simulator.stats.disconnected >= before + 3)
    await asyncio.sleep(0.2)  # what ends after the client's last byte (the handler's end)
    gc.collect()
    assert _ours(saved_garbage) == []


async def test_a_finished_stream_on_the_redis_journal_leaves_no_reference_cycle(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    redis_server: RedisServer, saved_garbage: list[Any],
) -> None:
    relay = await start_server(overrides=relay_overrides(
        simulator.url, journal={"backend": "redis", "redis_url": redis_server.url}))
    await _streams(relay, session)
    gc.collect()
    saved_garbage.clear()
    for _ in range(3):
        await _streams(relay, session)
    await asyncio.sleep(0.3)  # the journal's flush and its tail
    gc.collect()
    assert _ours(saved_garbage) == []


def _held_by(root: object, shared: list[object]) -> list[object]:
    """What ``root`` holds of its own: the objects reachable from it, short of ``shared`` ones
    (the clients, config), classes, modules and module-level functions (and their globals)."""
    stop = {id(obj) for obj in shared}
    found: list[object] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in stop or isinstance(obj, type | types.ModuleType):
            continue
        stop.add(id(obj))
        if isinstance(obj, types.FunctionType) and obj.__closure__ is None:
            continue
        found.append(obj)
        stack.extend([obj.__self__] if isinstance(obj, types.MethodType)
                     else gc.get_referents(obj))
    return found


async def test_a_stream_s_pipeline_holds_no_closure_for_the_collector_to_walk() -> None:
    """The Observables of a stream's pipeline live as long as the stream, and each collection
    walks what they hold: the per-stream callables are bound methods and small objects, not
    closures (a function, its tuple and one cell per value: 86 objects per open stream in
    ``streamsvc serve`` instead of 111, docs/performance.md)."""
    from streamsvc.config import PipelineConfig, UpstreamConfig
    from streamsvc.pipeline import StreamContext, build_pipeline
    from streamsvc.reactive.backpressure import Valve
    from streamsvc.upstream.client import UpstreamClient

    config = PipelineConfig()
    clients = [UpstreamClient(name, UpstreamConfig(base_url="http://127.0.0.1:9/v1"), None)
               for name in ("primary", "fallback")]
    context = StreamContext(valve=Valve())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    pipeline = build_pipeline(body, clients, config, context)
    held = _held_by(pipeline, [*clients, config, context, body])
    assert [obj for obj in held if isinstance(obj, types.CellType | types.FunctionType)] == []
    assert len(held) < 60  # the walk stopped at what is shared
    assert any(isinstance(obj, types.MethodType) for obj in held)
