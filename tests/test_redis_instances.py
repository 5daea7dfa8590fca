"""Several streamsvc instances on one real redis-server behave as one service.

In-process apps (two ``start_server`` apps on one Redis) for what crosses
instances; ``streamsvc serve`` processes for SIGKILL, SIGTERM and start-up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import openai
import pytest

from streamsvc.config import JournalConfig
from streamsvc.journal.redis_client import connect_redis
from streamsvc.server.state import DRAIN_LEAVERS, DRAINING, JOURNAL, REGISTRY
from streamsvc.simulator import SimulatorServer
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import (
    RunningServer,
    Serve,
    StartServer,
    free_port,
    relay_overrides,
    wait_until,
)
from tests.helpers import PROMPT, expected, get_events, story, text_of
from tests.redis_server import RedisServer


def _redis_overrides(redis: RedisServer, **journal: Any) -> dict[str, Any]:
    return {"journal": {"backend": "redis", "redis_url": redis.url, "writer_lease_s": 0.6,
                        **journal}}


@pytest.fixture
async def pair(redis_server: RedisServer, start_server: StartServer, simulator: SimulatorServer
               ) -> tuple[RunningServer, RunningServer]:
    """Two instances on one Redis, both relaying to the standalone simulator."""
    overrides = relay_overrides(simulator.url, **_redis_overrides(redis_server))
    return await start_server(overrides=overrides), await start_server(overrides=overrides)


def _seqs(events: list[ServerSentEvent]) -> list[int]:
    return [int(e.id.rsplit(":", 1)[1]) for e in events if e.id]


async def test_a_stream_created_on_one_instance_is_read_on_the_other(
    pair: tuple[RunningServer, RunningServer], session: aiohttp.ClientSession
) -> None:
    one, two = pair
    async with session.post(one.url + "/v1/streams", json=story(40, rate=200)) as r:
        assert r.status == 201
        created = await r.json()
    read = await get_events(session, two.url + created["events_url"])
    events = read.events
    assert read.status == 200
    assert events[-1].event == "done"
    assert text_of(events) == expected(40)
    assert _seqs(events) == list(range(1, len(events) + 1))
    assert two.app[REGISTRY].get(created["id"]) is None  # it never ran there
    last = events[-1].id
    for server in pair:  # the end is the end, on every instance
        async with session.get(server.url + created["events_url"],
                               headers={"Last-Event-ID": last}) as r:
            assert r.status == 204


async def test_a_reader_resumes_on_the_other_instance_with_nothing_lost_or_repeated(
    pair: tuple[RunningServer, RunningServer], session: aiohttp.ClientSession,
    simulator: SimulatorServer,
) -> None:
    one, two = pair
    async with session.post(one.url + "/v1/streams", json=story(60, rate=100)) as r:
        created = await r.json()
    first = (await get_events(session, one.url + created["events_url"], stop_after=10)).events
    rest = (await get_events(session, two.url + created["events_url"], last_event_id=first[-1].id)).events
    events = [e for e in first if e.event == "message"] + rest
    assert _seqs(events) == list(range(1, len(events) + 1))
    assert text_of(events) == expected(60)
    assert rest[-1].event == "done"
    assert simulator.stats.requests == 1


async def test_delete_on_either_instance_stops_the_generation_where_it_runs(
    pair: tuple[RunningServer, RunningServer], session: aiohttp.ClientSession,
    simulator: SimulatorServer,
) -> None:
    one, two = pair
    async with session.post(one.url + "/v1/streams", json=story(10_000, rate=50)) as r:
        created = await r.json()
    assert one.app[REGISTRY].get(created["id"]) is not None
    async with session.delete(two.url + f"/v1/streams/{created['id']}") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "cancelled"
    assert await wait_until(lambda: one.app[REGISTRY].get(created["id"]) is None, 3)
    assert await wait_until(lambda: simulator.stats.disconnected == 1, 3)
    events = (await get_events(session, two.url + created["events_url"])).events
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    async with session.delete(two.url + f"/v1/streams/{created['id']}") as r:
        assert (await r.json())["status"] == "ended"


async def test_a_reader_on_another_instance_keeps_the_stream_alive_past_the_grace_period(
    redis_server: RedisServer, start_server: StartServer, simulator: SimulatorServer,
    session: aiohttp.ClientSession,
) -> None:
    overrides = relay_overrides(
        simulator.url, **_redis_overrides(redis_server, resume_grace_s=1.0))
    one, two = await start_server(overrides=overrides), await start_server(overrides=overrides)
    async with session.post(one.url + "/v1/streams", json=story(45, rate=15)) as r:
        # 3 s of answer, grace 1 s, nobody reads on `one`; the grace is long enough for
        # the reader on `two` to be present before it ends on a slow machine.
        created = await r.json()
    read = await get_events(session, two.url + created["events_url"])
    events = read.events
    assert read.status == 200 and events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    assert text_of(events) == expected(45)


async def test_with_nobody_reading_anywhere_the_grace_period_still_stops_it(
    redis_server: RedisServer, start_server: StartServer, simulator: SimulatorServer,
    session: aiohttp.ClientSession,
) -> None:
    overrides = relay_overrides(
        simulator.url, **_redis_overrides(redis_server, resume_grace_s=0.2))
    one = await start_server(overrides=overrides)
    async with session.post(one.url + "/v1/streams", json=story(1000, rate=20)) as r:
        created = await r.json()
    assert await wait_until(lambda: one.app[REGISTRY].get(created["id"]) is None, 3)
    assert await wait_until(lambda: simulator.stats.disconnected == 1, 3)


async def test_redis_lost_and_back_readiness_errors_then_service_again(
    pair: tuple[RunningServer, RunningServer], session: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    one, two = pair
    async with session.post(one.url + "/v1/streams", json=story(10_000, rate=50)) as r:
        created = await r.json()
    reading = asyncio.ensure_future(get_events(session, two.url + created["events_url"]))
    await asyncio.sleep(0.3)
    redis_server.stop(save=True)
    read = await asyncio.wait_for(reading, 10)  # an error event, not a hang
    events = read.events
    assert read.status == 200 and events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "journal_unavailable"
    # (The error frame has no id line: it was not journaled, so the client's
    # last event id stays that of the last message, as the resume below uses.)
    assert events[-1].id == events[-2].id
    for server in pair:
        assert await _status(session, server.url + "/readyz", 503, timeout=5), server.url
    async with session.post(two.url + "/v1/streams", json=story(3, rate=0)) as r:
        assert r.status == 503
        error = (await r.json())["error"]
    assert error["code"] == "journal_unavailable" and "Redis" in error["message"]
    # The stream on `one` was ended when Redis went away; it must not run on.
    assert await wait_until(lambda: one.app[REGISTRY].get(created["id"]) is None, 5)

    redis_server.start()
    for server in pair:
        assert await _status(session, server.url + "/readyz", 200, timeout=10), server.url
    # What was journaled before the outage is there, then the error that ended it.
    last_good = [e for e in events if e.event == "message"][-1].id
    read = await get_events(session, one.url + created["events_url"], last_event_id=last_good)
    after = read.events
    assert read.status == 200 and after[-1].event == "error"
    assert json.loads(after[-1].data)["code"] == "journal_unavailable"
    # And new streams work again, across instances.
    async with session.post(two.url + "/v1/streams", json=story(5, rate=0)) as r:
        assert r.status == 201
        fresh = await r.json()
    assert (await get_events(session, one.url + fresh["events_url"])).text == expected(5)


async def _status(session: aiohttp.ClientSession, url: str, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(url) as r:
            if r.status == want:
                return True
        await asyncio.sleep(0.1)
    return False


# -- real processes -----------------------------------------------------------------------


@pytest.fixture
def redis_serve(serve: Serve, redis_server: RedisServer) -> Serve:
    """``streamsvc serve`` processes on the test's Redis; ``await redis_serve(**env)``."""

    async def start(**env: str) -> tuple[subprocess.Popen[bytes], str]:
        return await serve(
            STREAMSVC__JOURNAL__BACKEND="redis",
            STREAMSVC__JOURNAL__REDIS_URL=redis_server.url,
            STREAMSVC__JOURNAL__WRITER_LEASE_S="0.6",
            **env,
        )

    return start


async def test_a_killed_generator_leaves_its_readers_everything_then_instance_lost(
    redis_serve: Serve, session: aiohttp.ClientSession
) -> None:
    writer, writer_url = await redis_serve()
    _, reader_url = await redis_serve()
    async with session.post(writer_url + "/v1/streams", json=story(10_000, rate=40)) as r:
        created = await r.json()
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    async with session.get(reader_url + created["events_url"]) as response:
        async for data in response.content.iter_any():
            events.extend(decoder.feed(data))
            if sum(e.event == "message" for e in events) == 5 and writer.poll() is None:
                writer.send_signal(signal.SIGKILL)
                killed = time.monotonic()
            if events and events[-1].event in ("done", "error"):
                break
    assert time.monotonic() - killed < 5, "the reader waited too long for the verdict"
    assert events[-1].event == "error"
    error = json.loads(events[-1].data)
    assert error["code"] == "instance_lost" and error["retryable"] is True
    messages = [e for e in events if e.event == "message"]
    assert _seqs(events) == list(range(1, len(messages) + 2))  # every event, then the error
    assert expected(10_000).startswith(text_of(messages))


async def test_sigterm_lets_readers_resume_on_another_instance_while_the_answer_finishes(
    redis_serve: Serve, session: aiohttp.ClientSession
) -> None:
    draining, draining_url = await redis_serve()
    _, other_url = await redis_serve()
    async with session.post(draining_url + "/v1/streams", json=story(60, rate=30)) as r:
        created = await r.json()  # 2 s of answer
    decoder = SSEDecoder()
    first: list[ServerSentEvent] = []
    cut = False
    try:
        async with session.get(draining_url + created["events_url"]) as response:
            async for data in response.content.iter_any():
                first.extend(decoder.feed(data))
                if len(first) >= 5 and draining.poll() is None and not cut:
                    draining.send_signal(signal.SIGTERM)
                    cut = True
    except aiohttp.ClientPayloadError:
        pass  # let go mid-stream: what EventSource sees as a network error
    assert cut and first[-1].event == "message", "the reader was not let go at drain"
    last = [e for e in first if e.id][-1].id
    read = await get_events(session, other_url + created["events_url"], last_event_id=last)
    rest = read.events
    assert read.status == 200 and rest[-1].event == "done"
    events = [e for e in first if e.event == "message"] + rest
    assert _seqs(events) == list(range(1, len(events) + 1))
    assert text_of(events) == expected(60)
    deadline = time.monotonic() + 20
    while draining.poll() is None:
        assert time.monotonic() < deadline, "the draining instance did not exit"
        await asyncio.sleep(0.05)
    assert draining.returncode == 0


async def test_a_reader_that_comes_during_the_drain_is_let_go_at_once(
    pair: tuple[RunningServer, RunningServer], session: aiohttp.ClientSession
) -> None:
    one, two = pair
    async with session.post(one.url + "/v1/streams", json=story(60, rate=30)) as r:
        created = await r.json()  # 2 s of answer, generated on one
    two.app[DRAINING].set()  # two drains; its leavers were already let go
    with pytest.raises(aiohttp.ClientError):  # the connection is closed: a proxy retries
        async with session.get(two.url + created["events_url"]) as response:
            await response.read()
    assert not two.app[DRAIN_LEAVERS]  # none left behind for a drain that has passed
    read = await get_events(session, one.url + created["events_url"])  # elsewhere: all of it
    assert read.events[-1].event == "done" and text_of(read.events) == expected(60)


async def test_a_pooled_connection_left_stale_by_a_redis_restart_is_retried(
    redis_server: RedisServer,
) -> None:
    client = await connect_redis(JournalConfig(backend="redis", redis_url=redis_server.url))
    try:
        await client.set("k", b"v")  # the pool now holds a connection to the old server
        redis_server.stop(save=True)
        redis_server.start()
        assert await client.get("k") == b"v"  # not ConnectionError: sent again on a new one
    finally:
        await client.aclose()


async def test_redis_down_at_start_exits_with_a_message_naming_the_setting() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamsvc", "serve", "--port", str(free_port()),
        env={"STREAMSVC__JOURNAL__BACKEND": "redis", "STREAMSVC__JOURNAL__REDIS_URL": url,
             "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 69
    message = stderr.decode()
    assert "journal.redis_url" in message and "cannot reach Redis" in message
    assert "hunter2" not in message and "Traceback" not in message


async def test_the_journal_in_use_is_the_redis_one(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    one, two = pair
    assert type(one.app[JOURNAL]).__name__ == "RedisJournal"
    assert one.app[JOURNAL].instance != two.app[JOURNAL].instance  # type: ignore[attr-defined]


async def test_a_background_response_started_on_one_instance_is_resumed_and_cancelled_on_another(
    pair: tuple[RunningServer, RunningServer], simulator: SimulatorServer,
) -> None:
    """The Responses API on the Redis journal: events, state and cancel cross instances."""
    a, b = pair
    on_a = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0)
    on_b = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
    async with on_a, on_b:
        stream = await on_a.responses.create(
            model="sim-small", input=PROMPT, stream=True, background=True,
            extra_body={"simulate": {"tokens": 60, "rate": 200}})
        seen = []
        async for event in stream:
            seen.append(event)
            if len(seen) == 6:
                break
        await stream.close()
        rest = [e async for e in await on_b.responses.retrieve(
            seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number)]
        numbers = [e.sequence_number for e in seen + rest]
        assert numbers == list(range(len(numbers)))
        text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
        assert text == expected(60) and rest[-1].type == "response.completed"
        assert (await on_b.responses.retrieve(seen[0].response.id)).status == "completed"

        long = await on_a.responses.create(
            model="sim-small", input=PROMPT, background=True,
            extra_body={"simulate": {"tokens": 5000, "rate": 20}})
        assert await wait_until(lambda: simulator.stats.active == 1)
        await on_b.responses.cancel(long.id)  # the writer is A: the cancel goes there
        assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=5)
        for _ in range(50):
            state = await on_b.responses.retrieve(long.id)
            if state.status != "in_progress":
                break
            await asyncio.sleep(0.05)
        assert state.status == "cancelled"
    assert simulator.stats.requests == 2
