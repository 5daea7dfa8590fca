"""Shared fixtures: real servers on free loopback ports (in-process apps on pytest-aiohttp's
``aiohttp_server``, ``streamsvc serve`` processes, the simulator), real client sessions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, async_playwright
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from streamsvc.config import Config, load_config
from streamsvc.journal.base import Journal
from streamsvc.journal.memory import MemoryJournal
from streamsvc.journal.redis import RedisJournal
from streamsvc.server.access_log import AccessLogger
from streamsvc.server.app import create_app
from streamsvc.simulator import SimulatorServer
from tests.redis_server import RedisServer

# Debian's Chromium; Playwright never downloads a browser. When it is missing
# launch() raises and the browser tests fail (CI installs it); they never skip.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def answers_ok(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll ``url`` until it answers 200; False once ``timeout`` passes or ``process`` exits."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return True
            if time.monotonic() > deadline or process.poll() is not None:
                return False
            await asyncio.sleep(0.05)


async def spawn_serve(
    env: dict[str, str] | None = None, *, stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``streamsvc serve`` (built-in simulator) as its own process; wait until ready.

    ``env`` adds to the test's environment without its STREAMSVC settings;
    ``port`` (default: a free one) lets a restarted instance come back where it was.
    The caller stops the process.
    """
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    full_env.update(env or {})
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-m", "streamsvc", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=stderr, env=full_env,
    )
    url = f"http://127.0.0.1:{port}"
    if not await answers_ok(url + "/readyz", process, 20):
        process.kill()
        raise AssertionError("streamsvc serve did not start")
    return process, url


Serve = Callable[..., Awaitable[tuple[subprocess.Popen[bytes], str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(**env)``: a ``streamsvc serve`` process (see :func:`spawn_serve`)
    and its URL; every one still running is killed at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    async def start(**env: str) -> tuple[subprocess.Popen[bytes], str]:
        process, url = await spawn_serve(env)
        processes.append(process)
        return process, url

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@dataclass
class RunningServer:
    """A streamsvc app listening on a free port."""

    url: str  # e.g. "http://127.0.0.1:54321"
    app: web.Application
    config: Config


StartServer = Callable[..., Awaitable[RunningServer]]


JOURNAL_BACKENDS = ["memory", "redis"]
JournalFactory = Callable[..., Journal]


@contextlib.asynccontextmanager
async def journal_factory(backend: str, request: pytest.FixtureRequest
                          ) -> AsyncIterator[JournalFactory]:
    """``make(**options)`` journals of ``backend`` (``"redis"``: on the test's own
    ``redis_server``); every one made is closed at the end."""
    made: list[Journal] = []
    client: Redis | None = None
    if backend == "redis":
        client = Redis.from_url(request.getfixturevalue("redis_server").url)

    def make(**options: Any) -> Journal:
        journal: Journal = (MemoryJournal(**options) if client is None
                            else RedisJournal(client, lease_s=0.5, **options))
        made.append(journal)
        return journal

    try:
        yield make
    finally:
        for journal in made:
            await journal.close()
        if client is not None:
            await client.aclose()


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``check`` until it holds; False when ``timeout`` passes first (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FakeUpstream = Callable[[Handler], Awaitable[str]]


@pytest.fixture
def fake_upstream(aiohttp_server: AiohttpServer) -> FakeUpstream:
    """Factory: ``await fake_upstream(handler)`` serves a hand-written upstream's
    ``POST /v1/chat/completions`` on ``aiohttp_server`` (stopped at teardown) and
    returns its base URL.

    For faults the simulator does not make (garbage shapes, endless events). It
    runs with handler_cancellation, as every ``aiohttp_server`` app: the relay
    hanging up cancels the handler.
    """

    async def start(handler: Handler) -> str:
        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", handler)
        server = await aiohttp_server(upstream)
        return str(server.make_url("/v1"))

    return start


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    """A standalone simulator; tests read its stats (requests, hang-ups)."""
    async with SimulatorServer(host="127.0.0.1", port=0) as sim:
        yield sim


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port, for this test only."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def start_server(aiohttp_server: AiohttpServer) -> StartServer:
    """Factory: ``await start_server(config)`` or ``await start_server(overrides={...})``.

    Each app listens on 127.0.0.1, on a port ``aiohttp_server`` picks, and is
    cleaned up at teardown, the last started first.
    """

    async def start(config: Config | None = None, *, overrides: dict[str, Any] | None = None
                    ) -> RunningServer:
        if config is None:
            config = load_config(env={}, overrides=overrides or {})
        app = create_app(config)
        # As `streamsvc serve` runs it: access lines without queries, and hang-ups
        # cancel handlers (aiohttp's test server passes handler_cancellation=True
        # itself; passing it again is a TypeError).
        server = await aiohttp_server(app, access_log_class=AccessLogger)
        assert server.handler.handler_cancellation
        return RunningServer(url=str(server.make_url("")), app=app, config=config)

    return start


def relay_overrides(simulator_url: str, **more: Any) -> dict[str, Any]:
    """Config overrides that route every model to the given simulator URL."""
    return {
        "upstreams": {"sim": {"base_url": simulator_url}},
        "routes": [{"model": "*", "upstreams": ["sim"]}],
        **more,
    }


@pytest.fixture
async def relay(start_server: StartServer, simulator: SimulatorServer,
                request: pytest.FixtureRequest) -> RunningServer:
    """streamsvc in front of the standalone ``simulator`` fixture.

    A test module's ``RELAY_CONFIG`` (config overrides, e.g. a short ``sse_retry_ms``)
    applies to its relays.
    """
    more: dict[str, Any] = getattr(request.module, "RELAY_CONFIG", {})
    return await start_server(overrides=relay_overrides(simulator.url, **more))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for a test module (each test opens its own context in it).

    Module-scoped, so it lives in the module's event loop, which its tests share
    (``asyncio_default_test_loop_scope`` in pyproject.toml).
    """
    playwright = await async_playwright().start()
    try:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await playwright.stop()
