"""Tickets, stream owners and limits across instances, on a real redis-server.

Two apps on one Redis (``journal.backend = "redis"``), with the same API keys
and ticket secret, must act as one service: the per-key limits count both,
a chat ticket starts one stream in all, its EventSource reconnect works on
either, and a stream's owner is known to both. The Redis limiter and ticket
store are also tested on their own (no journal needed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from streamsvc.config import LimitsConfig
from streamsvc.errors import ErrorCode, LimitError, StreamError
from streamsvc.journal.redis import RedisJournal
from streamsvc.server.limits_redis import RedisLimiter
from streamsvc.server.state import AUTH, JOURNAL, LIMITER
from streamsvc.server.tickets import IN_USE, MemoryTicketStore, RedisTicketStore, TicketStore
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.helpers import bearer
from tests.redis_server import RedisServer
from tests.test_limits import assert_limited

KEY_A = "sk-redis-a-3c0ffee1d2e3-never-log-me"
KEY_B = "sk-redis-b-9badc0de4f56-never-log-me"
SECRET = "a-ticket-secret-shared-by-all-instances"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
SLOW = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
        "simulate": {"rate": 20, "tokens": 400}}
PREFIX = "streamsvc:"


def event_ids(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("id: ")]


Pair = Callable[..., Awaitable[tuple[RunningServer, RunningServer]]]


@pytest.fixture
def pair(start_server: StartServer, simulator: SimulatorServer, redis_server: RedisServer,
         monkeypatch: pytest.MonkeyPatch) -> Pair:
    """Factory: two instances with the same keys, secret, Redis and ``more`` overrides.

    ``secret=False``: no ``STREAMSVC_TICKET_SECRET`` (the instances share one through Redis).
    """
    monkeypatch.setenv("STREAMSVC_API_KEYS", f"{KEY_A},{KEY_B}")
    monkeypatch.setenv("STREAMSVC_TICKET_SECRET", SECRET)

    async def start(secret: bool = True, **more: Any) -> tuple[RunningServer, RunningServer]:
        if not secret:
            monkeypatch.delenv("STREAMSVC_TICKET_SECRET")
        journal = {"backend": "redis", "redis_url": redis_server.url, **more.pop("journal", {})}
        overrides = relay_overrides(simulator.url, journal=journal, **more)
        first = await start_server(overrides=overrides)
        second = await start_server(overrides=overrides)
        return first, second

    return start


async def create(relay: RunningServer, session: aiohttp.ClientSession, key: str = KEY_A,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with session.post(relay.url + "/v1/streams", json=body or BODY, headers=bearer(key)
                            ) as response:
        assert response.status == 201, await response.text()
        created: dict[str, Any] = await response.json()
    return created


# -- two instances -------------------------------------------------------------------------------


async def test_both_instances_use_redis_for_journal_tickets_and_limits(pair: Pair) -> None:
    for relay in await pair():
        assert isinstance(relay.app[JOURNAL], RedisJournal)
        assert isinstance(relay.app[AUTH].tickets, RedisTicketStore)
        assert isinstance(relay.app[LIMITER], RedisLimiter)


async def test_without_a_ticket_secret_the_instances_share_one_through_redis(
    pair: Pair, session: aiohttp.ClientSession, redis_server: RedisServer,
) -> None:
    one, two = await pair(secret=False)
    for relay in (one, two):
        assert "tickets signed with a secret shared through Redis (STREAMSVC_TICKET_SECRET is" \
            " unset: the first instance made it)" in relay.app[AUTH].describe()
    assert one.app[AUTH].key_id(KEY_A) == two.app[AUTH].key_id(KEY_A)
    assert redis_server.command("EXISTS", f"{PREFIX}auth:ticket-secret") == b":1\r\n"
    created = await create(one, session)
    # The ticket one signed opens the stream on two, and two knows the key as its owner.
    async with session.get(two.url + created["events_url"]) as response:
        assert response.status == 200
        ids = event_ids(await response.text())
    async with session.get(two.url + f"/v1/streams/{created['id']}/events",
                           headers={**bearer(KEY_A), "Last-Event-ID": ids[0]}) as response:
        assert response.status == 200
        assert event_ids(await response.text()) == ids[1:]
    async with session.get(two.url + f"/v1/streams/{created['id']}/events",
                           headers=bearer(KEY_B)) as response:
        assert response.status == 403  # another key is still another key


async def test_requests_per_minute_hold_across_instances(
    pair: Pair, session: aiohttp.ClientSession,
) -> None:
    one, two = await pair(limits={"requests_per_minute_per_key": 3})
    for relay in (one, two, one):
        async with session.get(relay.url + "/v1/models", headers=bearer(KEY_A)) as response:
            assert response.status == 200
    async with session.get(two.url + "/v1/models", headers=bearer(KEY_A)) as response:
        await assert_limited(response, "limits.requests_per_minute_per_key (3)")
        assert 1 <= int(response.headers["Retry-After"]) <= 20
    async with session.get(one.url + "/v1/models", headers=bearer(KEY_A)) as response:
        await assert_limited(response, "limits.requests_per_minute_per_key (3)")
    async with session.get(two.url + "/v1/models", headers=bearer(KEY_B)) as response:
        assert response.status == 200  # another key has its own bucket


async def test_streams_per_key_hold_across_instances(
    pair: Pair, session: aiohttp.ClientSession, redis_server: RedisServer,
) -> None:
    one, two = await pair(limits={"max_streams_per_key": 2})
    first = await create(one, session, body=SLOW)
    second = await create(two, session, body=SLOW)
    for relay in (one, two):
        async with session.post(relay.url + "/v1/streams", json=SLOW, headers=bearer(KEY_A)
                                ) as response:
            await assert_limited(response, "limits.max_streams_per_key (2)")
    async with session.post(one.url + "/v1/chat/completions", json=BODY, headers=bearer(KEY_B)
                            ) as response:
        assert response.status == 200  # another key is not affected
    key_id = one.app[AUTH].key_id(KEY_A)
    assert redis_server.command("ZCARD", f"{PREFIX}l:streams:{key_id}") == b":2\r\n"
    # A stream that ends gives its slot back to every instance.
    async with session.delete(one.url + f"/v1/streams/{first['id']}", headers=bearer(KEY_A)
                              ) as response:
        assert response.status == 200
    assert await wait_until(
        lambda: redis_server.command("ZCARD", f"{PREFIX}l:streams:{key_id}") == b":1\r\n")
    third = await create(two, session, body=SLOW)
    for created, relay in ((second, two), (third, two)):
        async with session.delete(relay.url + f"/v1/streams/{created['id']}",
                                  headers=bearer(KEY_A)) as response:
            assert response.status == 200
    assert await wait_until(
        lambda: redis_server.command("EXISTS", f"{PREFIX}l:streams:{key_id}") == b":0\r\n")


async def test_a_chat_ticket_starts_one_stream_on_all_instances_and_resumes_on_any(
    pair: Pair, session: aiohttp.ClientSession, simulator: SimulatorServer,
) -> None:
    one, two = await pair()
    async with session.post(one.url + "/v1/tickets", headers=bearer(KEY_A)) as response:
        assert response.status == 201
        minted = await response.json()
    path = minted["url"] + "&model=echo&q=one%20shot"
    async with session.get(one.url + path) as response:
        assert response.status == 200
        text = await response.text()
    ids = event_ids(text)
    assert "event: done" in text and ids
    stream_id = ids[0].split(":")[0]
    # The same URL on the other instance does not start a second stream: it replays the first.
    async with session.get(two.url + path) as response:
        assert response.status == 200
        again = event_ids(await response.text())
    assert again == ids
    # EventSource's reconnect (same URL + Last-Event-ID) resumes on the other instance.
    async with session.get(two.url + path, headers={"Last-Event-ID": ids[0]}) as response:
        assert response.status == 200
        resumed = await response.text()
    assert event_ids(resumed) == ids[1:] and "event: done" in resumed
    async with session.get(two.url + path, headers={"Last-Event-ID": ids[-1]}) as response:
        assert response.status == 204  # it had seen the end: EventSource stops
    # Not good for another stream, on either instance.
    other = await create(two, session)
    async with session.get(two.url + path, headers={"Last-Event-ID": f"{other['id']}:1"}
                           ) as response:
        assert response.status == 403
    assert stream_id != other["id"]


async def test_a_chat_ticket_used_on_two_instances_at_once_starts_one_stream(
    pair: Pair, session: aiohttp.ClientSession, simulator: SimulatorServer,
) -> None:
    one, two = await pair()
    async with session.post(two.url + "/v1/tickets", headers=bearer(KEY_A)) as response:
        minted = await response.json()
    path = minted["url"] + "&model=echo&q=only%20once"
    before = simulator.stats.requests

    async def use(relay: RunningServer) -> tuple[int, list[str]]:
        async with session.get(relay.url + path) as response:
            return response.status, event_ids(await response.text())

    results = await asyncio.gather(*[use(relay) for relay in (one, two, one, two, one, two)])
    started = {ids[0].split(":")[0] for status, ids in results if status == 200}
    assert len(started) == 1  # every 200 is that one stream
    assert {status for status, _ in results} <= {200, 403}  # 403: "already used" mid-start
    assert simulator.stats.requests == before + 1  # the model was called once


async def test_a_chat_ticket_is_bound_again_when_its_long_stream_ends(
    pair: Pair, session: aiohttp.ClientSession,
) -> None:
    # The binding made at the start (TTL 1.0 + 0.3 s) lapses while the stream runs
    # (about 2 s); the instance that ran it binds it again at the end.
    one, two = await pair(journal={"retention_s": 1.0}, auth={"ticket_ttl_s": 0.3})
    async with session.post(one.url + "/v1/tickets", headers=bearer(KEY_A)) as response:
        minted = await response.json()
    extra = '{"simulate":{"rate":20,"tokens":40}}'
    path = minted["url"] + f"&model=sim-small&q=x&extra={extra}"
    async with session.get(one.url + path) as response:
        ids = event_ids(await response.text())
    assert len(ids) > 2
    await asyncio.sleep(0.5)
    async with session.get(two.url + path, headers={"Last-Event-ID": ids[-1]}) as response:
        assert response.status == 204
    async with session.get(two.url + path, headers={"Last-Event-ID": ids[0]}) as response:
        assert response.status == 200
        assert event_ids(await response.text()) == ids[1:]


async def test_an_events_url_ticket_resumes_on_the_other_instance_after_its_ttl(
    pair: Pair, session: aiohttp.ClientSession,
) -> None:
    one, two = await pair(auth={"ticket_ttl_s": 0.5})
    created = await create(one, session)
    async with session.get(one.url + created["events_url"]) as response:
        ids = event_ids(await response.text())
    unused = await create(one, session)
    await asyncio.sleep(0.8)
    # Used in time (on instance one): still good for its stream, on instance two.
    async with session.get(two.url + created["events_url"], headers={"Last-Event-ID": ids[0]}
                           ) as response:
        assert response.status == 200
        assert event_ids(await response.text()) == ids[1:]
    async with session.get(two.url + unused["events_url"]) as response:
        assert response.status == 401  # never used within its TTL
        assert (await response.json())["error"]["message"] == "ticket expired"


async def test_one_key_cannot_read_or_stop_another_keys_stream_on_another_instance(
    pair: Pair, session: aiohttp.ClientSession,
) -> None:
    one, two = await pair()
    created = await create(one, session, KEY_A, body=SLOW)
    stream = f"/v1/streams/{created['id']}"
    async with session.get(two.url + stream + "/events", headers=bearer(KEY_B)) as response:
        assert response.status == 403
        assert created["id"] in (await response.json())["error"]["message"]
    async with session.delete(two.url + stream, headers=bearer(KEY_B)) as response:
        assert response.status == 403
    async with session.post(two.url + "/v1/tickets", json={"stream_id": created["id"]},
                            headers=bearer(KEY_B)) as response:
        assert response.status == 403
    async with session.get(two.url + "/v1/chat/stream", headers={
            **bearer(KEY_B), "Last-Event-ID": f"{created['id']}:1"}) as response:
        assert response.status == 403
    # The owner is known on the other instance too: a fresh ticket, then its events.
    async with session.post(two.url + "/v1/tickets", json={"stream_id": created["id"]},
                            headers=bearer(KEY_A)) as response:
        assert response.status == 201
        fresh = await response.json()
    async with session.get(two.url + fresh["url"]) as response:
        assert response.status == 200
        await response.content.readany()
    async with session.delete(one.url + stream, headers=bearer(KEY_A)) as response:
        assert response.status == 200


# -- the Redis limiter on its own ------------------------------------------------------------


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[Callable[[], Redis]]:
    """Factory of Redis clients (one per simulated instance), closed after the test."""
    made: list[Redis] = []

    def make() -> Redis:
        client = Redis.from_url(redis_server.url)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def test_redis_limiter_rate_is_one_token_bucket_for_all_instances(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    config = LimitsConfig(requests_per_minute_per_key=60)  # one token a second
    one, two = RedisLimiter(clients(), config), RedisLimiter(clients(), config)
    await asyncio.gather(*[limiter.check_rate("k") for limiter in (one, two) * 30])
    with pytest.raises(LimitError) as caught:
        await two.check_rate("k")
    assert 0.5 < caught.value.retry_after <= 1.0
    assert "limits.requests_per_minute_per_key (60)" in str(caught.value)
    await one.check_rate("other")  # per key
    ttl = int(redis_server.command("PTTL", f"{PREFIX}l:rate:k")[1:-2])
    assert 0 < ttl <= 60_000  # gone once it would be full again
    await asyncio.sleep(caught.value.retry_after + 0.05)
    await one.check_rate("k")  # a token came back
    with pytest.raises(LimitError):
        await one.check_rate("k")


async def test_redis_limiter_rate_zero_is_off_and_touches_nothing(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    limiter = RedisLimiter(clients(), LimitsConfig(requests_per_minute_per_key=0,
                                                   max_streams_per_key=0, max_streams=0))
    for _ in range(100):
        await limiter.check_rate("k")
    slots = [await limiter.acquire_stream("k") for _ in range(30)]
    assert limiter.open_streams("k") == 30
    for slot in slots:
        slot.release()
    assert redis_server.command("DBSIZE") == b":0\r\n"


async def test_redis_limiter_streams_per_key_across_instances(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    config = LimitsConfig(max_streams_per_key=2, max_streams=10)
    one, two = RedisLimiter(clients(), config), RedisLimiter(clients(), config)
    await one.start()
    await two.start()
    try:
        first = await one.acquire_stream("k")
        second = await two.acquire_stream("k")
        for limiter in (one, two):
            with pytest.raises(LimitError, match=r"max_streams_per_key \(2\)"):
                await limiter.acquire_stream("k")
        await one.acquire_stream(None)  # auth off: the instance limit only
        assert one.open_streams() == 2 and one.open_streams("k") == 1
        first.release()
        first.release()  # idempotent
        assert await wait_until(
            lambda: redis_server.command("ZCARD", f"{PREFIX}l:streams:k") == b":1\r\n")
        third = await one.acquire_stream("k")
        second.release()
        third.release()
        assert await wait_until(
            lambda: redis_server.command("EXISTS", f"{PREFIX}l:streams:k") == b":0\r\n")
    finally:
        await one.close()
        await two.close()


async def test_redis_limiter_max_streams_stays_per_instance(
    clients: Callable[[], Redis],
) -> None:
    config = LimitsConfig(max_streams=1, max_streams_per_key=0)
    one, two = RedisLimiter(clients(), config), RedisLimiter(clients(), config)
    await one.acquire_stream("k")
    with pytest.raises(LimitError, match=r"limits.max_streams \(1\)"):
        await one.acquire_stream("k")
    await two.acquire_stream("k")  # another instance has its own


async def test_redis_limiter_slots_are_refreshed_and_a_dead_instances_expire(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    config = LimitsConfig(max_streams_per_key=2)
    alive = RedisLimiter(clients(), config, lease_s=0.3)  # refresh every 0.1 s, expiry 0.9 s
    dead = RedisLimiter(clients(), config, lease_s=0.3)  # never started: like a SIGKILL'd one
    await alive.start()
    try:
        await alive.acquire_stream("k")
        await dead.acquire_stream("k")
        with pytest.raises(LimitError):
            await alive.acquire_stream("k")
        await asyncio.sleep(1.5)  # past the expiry: only the refreshed slot is left
        await alive.acquire_stream("k")
        assert redis_server.command("ZCARD", f"{PREFIX}l:streams:k") == b":2\r\n"
    finally:
        await alive.close()
    assert redis_server.command("EXISTS", f"{PREFIX}l:streams:k") == b":0\r\n"  # closed: removed


async def test_redis_limiter_fails_open_with_one_warning_per_outage(
    clients: Callable[[], Redis], redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streamsvc")
    config = LimitsConfig(requests_per_minute_per_key=1, max_streams_per_key=1)
    limiter = RedisLimiter(clients(), config, lease_s=0.3)
    await limiter.start()
    try:
        redis_server.stop()
        for _ in range(3):  # over both limits, but Redis cannot say so: let through
            await limiter.check_rate("k")
        slot = await limiter.acquire_stream("k")
        await limiter.acquire_stream("k")
        assert limiter.open_streams("k") == 2
        await asyncio.sleep(0.3)  # the refresher fails too
        warnings = [r for r in caplog.records if r.getMessage().startswith("limits: cannot")]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        redis_server.start()
        # Back: the refresher counts the streams opened meanwhile, and limits hold again.
        assert await wait_until(
            lambda: redis_server.command("ZCARD", f"{PREFIX}l:streams:k") == b":2\r\n")
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        with pytest.raises(LimitError):
            await limiter.acquire_stream("k")
        await limiter.check_rate("k")
        with pytest.raises(LimitError):
            await limiter.check_rate("k")
        slot.release()
    finally:
        await limiter.close()


# -- ticket stores -------------------------------------------------------------------------------


StoreFactory = Callable[[float], TicketStore]


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> StoreFactory:
    """Factory of ticket stores with a given TTL; every Redis one is another instance."""
    if request.param == "memory":
        shared: dict[float, MemoryTicketStore] = {}
        return lambda ttl_s: shared.setdefault(ttl_s, MemoryTicketStore(ttl_s=ttl_s))
    make: Callable[[], Redis] = request.getfixturevalue("clients")
    return lambda ttl_s: RedisTicketStore(make(), prefix=f"{PREFIX}t:", ttl_s=ttl_s)


async def test_a_ticket_is_claimed_once_among_concurrent_users(stores: StoreFactory) -> None:
    one, two = stores(10.0), stores(10.0)
    results = await asyncio.gather(*[store.claim("n1") for store in (one, two) * 10])
    assert results.count(None) == 1 and results.count(IN_USE) == 19
    await one.bind("n1", "st_abc")
    assert await two.claim("n1") == "st_abc"  # bound: the stream it started
    assert await two.get("n1") == "st_abc"
    await two.release("n1")  # a binding to a stream is not a claim: it stays
    assert await one.get("n1") == "st_abc"


async def test_an_unstarted_claim_is_released_for_another_try(stores: StoreFactory) -> None:
    one, two = stores(10.0), stores(10.0)
    assert await one.claim("n2") is None
    assert await two.get("n2") == IN_USE
    await two.release("n2")
    assert await one.get("n2") is None
    assert await two.claim("n2") is None


async def test_a_binding_lives_its_ttl_from_its_last_use(stores: StoreFactory) -> None:
    store = stores(0.4)
    await store.bind("n3", "st_abc")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # used every 0.1 s: kept well past 0.4 s
        assert await store.get("n3") == "st_abc"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.6)
    assert await store.get("n3") is None


async def test_redis_ticket_store_keys_and_ttl(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    store = RedisTicketStore(clients(), prefix=f"{PREFIX}t:", ttl_s=360.0)
    assert await store.claim("abc") is None
    assert redis_server.command("GET", f"{PREFIX}t:abc") == b"$0\r\n\r\n"  # IN_USE is ""
    await store.bind("abc", "st_xyz")
    assert redis_server.command("GET", f"{PREFIX}t:abc") == b"$6\r\nst_xyz\r\n"
    ttl = int(redis_server.command("PTTL", f"{PREFIX}t:abc")[1:-2])
    assert 350_000 < ttl <= 360_000


async def test_redis_ticket_store_down_is_journal_unavailable(
    clients: Callable[[], Redis], redis_server: RedisServer,
) -> None:
    store = RedisTicketStore(clients(), prefix=f"{PREFIX}t:", ttl_s=10.0,
                             url=redis_server.url.replace("//", "//user:pw@"))
    redis_server.stop()
    for call in (store.get("n"), store.claim("n"), store.bind("n", "st_x"), store.release("n")):
        with pytest.raises(StreamError) as caught:
            await call
        assert caught.value.code == ErrorCode.JOURNAL_UNAVAILABLE
        assert "pw" not in str(caught.value)
