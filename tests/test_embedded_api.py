"""``streamsvc.chat_stream`` against a real simulator over real sockets.

The embedded API is the server's own chain (``build_pipeline`` over an
``UpstreamClient``); these tests pin what only it promises: a caller's
``ClientSession`` carries every request and stays the caller's (without one,
each stream's own connection is closed at its end), each
subscription is one request, and disposing a subscription hangs up on the
upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from reactivex import Observable
from reactivex.scheduler.eventloop import AsyncIOScheduler

import streamsvc
from streamsvc.upstream import client as client_module
from streamsvc.upstream.http_stream import Connection
from tests.conftest import wait_until
from tests.test_cancellation import HANGUP_LIMIT_S

PROMPT = "Hello, reactive world"
NO_TIMEOUTS = streamsvc.PipelineConfig(first_token_timeout_s=0, idle_timeout_s=0)


@dataclass
class TracedSession:
    """A caller's session whose trace config notes each request it sends."""

    session: aiohttp.ClientSession
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, URL)


@pytest.fixture
async def traced() -> AsyncIterator[TracedSession]:
    requests: list[tuple[str, str]] = []

    async def on_request_start(_: aiohttp.ClientSession, __: SimpleNamespace,
                               params: aiohttp.TraceRequestStartParams) -> None:
        requests.append((params.method, str(params.url)))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)  # before the session freezes it
    seen = TracedSession(aiohttp.ClientSession(trace_configs=[trace]), requests)
    session = seen.session
    try:
        yield seen
    finally:
        await session.close()  # the caller owns it, so the caller closes it


def _answer(sim: streamsvc.SimulatorServer, **kwargs: Any) -> Observable[streamsvc.Chunk]:
    return streamsvc.chat_stream([{"role": "user", "content": PROMPT}], model="echo",
                                 base_url=sim.url, **kwargs)


async def _text(answer: Observable[streamsvc.Chunk]) -> str:
    return "".join([chunk.content async for chunk in streamsvc.aiter_observable(answer)])


async def test_every_request_goes_through_the_given_session(
    simulator: streamsvc.SimulatorServer, traced: TracedSession
) -> None:
    assert await _text(_answer(simulator, session=traced.session)) == PROMPT
    assert traced.requests == [("POST", simulator.url + "/chat/completions")]
    assert simulator.stats.requests == simulator.stats.completed == 1
    assert not traced.session.closed


async def test_the_given_session_stays_open_after_an_error_and_serves_the_next_stream(
    simulator: streamsvc.SimulatorServer, traced: TracedSession
) -> None:
    failing = _answer(simulator, session=traced.session, simulate={"fault": "500"},
                      pipeline=streamsvc.PipelineConfig(retry_max_attempts=1))
    with pytest.raises(streamsvc.UpstreamError) as raised:
        await _text(failing)
    assert raised.value.code is streamsvc.ErrorCode.UPSTREAM_ERROR
    assert not traced.session.closed
    assert await _text(_answer(simulator, session=traced.session)) == PROMPT
    assert len(traced.requests) == 2


async def test_two_subscriptions_make_two_requests_through_the_session(
    simulator: streamsvc.SimulatorServer, traced: TracedSession
) -> None:
    answer = _answer(simulator, session=traced.session, simulate={"rate": 50})
    texts = await asyncio.gather(_text(answer), _text(answer))  # at the same time
    assert list(texts) == [PROMPT, PROMPT]
    assert traced.requests == [("POST", simulator.url + "/chat/completions")] * 2
    assert simulator.stats.requests == simulator.stats.completed == 2
    assert not traced.session.closed


async def test_without_a_session_each_request_opens_and_closes_its_own(
    simulator: streamsvc.SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No session, no pool: each stream opens a connection of its own, and closes it."""
    opened: list[Connection] = []
    real = client_module.open_connection

    async def recording(*args: Any) -> Connection:
        opened.append(await real(*args))
        return opened[-1]

    monkeypatch.setattr(client_module, "open_connection", recording)
    sessions: list[object] = []
    monkeypatch.setattr(aiohttp, "ClientSession", lambda *a, **k: sessions.append(a))
    answer = _answer(simulator)
    assert [await _text(answer), await _text(answer)] == [PROMPT, PROMPT]
    assert len(opened) == 2 and sessions == []
    assert await wait_until(lambda: all(c.transport is not None and c.transport.is_closing()
                                        for c in opened))


@pytest.mark.parametrize("given", [True, False], ids=["given-session", "own-session"])
async def test_disposing_the_subscription_hangs_up_on_the_upstream(
    simulator: streamsvc.SimulatorServer, traced: TracedSession, given: bool
) -> None:
    answer = _answer(simulator, session=traced.session if given else None,
                     simulate={"rate": 20, "tokens": 200})
    chunks: list[streamsvc.Chunk] = []
    errors: list[Exception] = []
    subscription = answer.subscribe(
        chunks.append, errors.append, scheduler=AsyncIOScheduler(asyncio.get_running_loop())
    )
    assert await wait_until(lambda: len(chunks) >= 3)
    assert simulator.stats.active == 1
    subscription.dispose()
    assert await wait_until(
        lambda: simulator.stats.disconnected == 1 and simulator.stats.active == 0,
        timeout=HANGUP_LIMIT_S,
    ), f"upstream still open {HANGUP_LIMIT_S} s after the dispose"
    assert simulator.stats.completed == 0
    assert errors == []
    assert len(traced.requests) == (1 if given else 0)
    assert not traced.session.closed


async def test_subscribing_without_a_scheduler_fails_before_any_request(
    simulator: streamsvc.SimulatorServer, traced: TracedSession
) -> None:
    # Timeouts off: the retry's backoff is the timer that asks for the scheduler.
    answer = _answer(simulator, session=traced.session, pipeline=NO_TIMEOUTS)
    tasks = asyncio.all_tasks()
    with pytest.raises(ValueError, match="retry_with_backoff needs a scheduler"):
        answer.subscribe()
    # A subscribed upstream starts its request task inside subscribe: none was started.
    assert asyncio.all_tasks() == tasks
    assert traced.requests == []
    assert simulator.stats.requests == 0
