"""The aiohttp application: resources in paired start-up/shutdown contexts, and the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import aiohttp_cors
from aiohttp import web

from streamsvc.config import BUILTIN_SIMULATOR, Config, redact_url
from streamsvc.journal.redis_client import connect_redis
from streamsvc.journal.memory import MemoryJournal
from streamsvc.server import routes_info, routes_openai, routes_page, routes_streams
from streamsvc.server.auth import AUTH, Auth, auth_middleware
from streamsvc.server.limits import LIMITER, MemoryLimiter
from streamsvc.server.metrics import Metrics
from streamsvc.server.middleware import error_middleware, set_request_id_header
from streamsvc.server.state import (
    CONFIG,
    DRAINING,
    JOURNAL,
    METRICS,
    REDIS,
    REGISTRY,
    ROUTER,
    SESSION,
)
from streamsvc.streams import StreamRegistry
from streamsvc.upstream.routing import Router
from streamsvc.upstream.simulator import SimulatorServer

__all__ = ["create_app"]

log = logging.getLogger("streamsvc")


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    """The shared ClientSession, the in-process simulator when a route uses it, the router."""
    config = app[CONFIG]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        auto_decompress=True,
    )
    simulator: SimulatorServer | None = None
    try:
        simulator_url: str | None = None
        if any(u.base_url == BUILTIN_SIMULATOR for u in config.upstreams.values()):
            simulator = SimulatorServer(host="127.0.0.1", port=0)
            await simulator.__aenter__()
            simulator_url = simulator.url
            log.info("built-in simulator upstream at %s", simulator_url)
        app[SESSION] = session
        app[ROUTER] = Router(config, session, simulator_url)
        for name, upstream in config.upstreams.items():
            if upstream.api_key_env and not upstream.api_key():
                log.warning("upstream %r: environment variable %s is not set; requests go"
                            " without a key", name, upstream.api_key_env)
        yield
    finally:
        await session.close()
        if simulator is not None:
            await simulator.__aexit__(None, None, None)


async def _redis(app: web.Application) -> AsyncIterator[None]:
    """The one Redis client of this process (``journal.backend = "redis"``), else None.

    Redis down at start-up stops the start with an error naming ``journal.redis_url``.
    """
    journal = app[CONFIG].journal
    if journal.backend != "redis":
        app[REDIS] = None
        yield
        return
    client = await connect_redis(journal)
    app[REDIS] = client
    log.info("journal: Redis at %s", redact_url(journal.redis_url))
    try:
        yield
    finally:
        await client.aclose()


async def _streams(app: web.Application) -> AsyncIterator[None]:
    """The journal and the registry of running generations; shutdown stops them all."""
    config = app[CONFIG]
    journal = MemoryJournal(
        retention_s=config.journal.retention_s, max_events=config.journal.max_events
    )
    registry = StreamRegistry(
        journal,
        resume_grace_s=config.journal.resume_grace_s,
        max_lag_bytes=config.server.max_pending_bytes,
    )
    app[JOURNAL] = journal
    app[REGISTRY] = registry
    metrics = Metrics(active_streams=lambda: len(registry))
    registry.on_error = metrics.count_error
    registry.observer = metrics
    app[METRICS] = metrics
    try:
        yield
    finally:
        await registry.close()
        await journal.close()


async def _drain(app: web.Application) -> None:
    """Shutdown (SIGTERM), once the listening socket is closed: let answers finish.

    ``/readyz`` fails and new streams get ``503 shutting_down`` from here on;
    running generations get ``drain_timeout_s`` to finish into the journal
    (their readers are still being served), and the rest end with the
    ``shutting_down`` error event. Then aiohttp waits ``shutdown_timeout_s``
    for the handlers to write what is left.
    """
    app[DRAINING].set()
    running = len(app[REGISTRY])
    timeout = app[CONFIG].server.drain_timeout_s
    if running:
        log.info("shutting down: waiting up to %g s for %d running streams", timeout, running)
    stopped = await app[REGISTRY].drain(timeout)
    if stopped:
        log.warning("shutting down: %d streams did not finish in %g s and were cut"
                    " (shutting_down)", stopped, timeout)


def create_app(config: Config | None = None) -> web.Application:
    """Build the streamsvc app for ``config`` (default: the built-in defaults).

    Run it with ``handler_cancellation=True`` (as ``streamsvc serve`` does) so
    that a client hang-up cancels its handler at once, even before the first token.
    """
    config = config or Config()
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[error_middleware, auth_middleware],
    )
    app[CONFIG] = config
    app[AUTH] = Auth(config.auth, retention_s=config.journal.retention_s)
    app[LIMITER] = MemoryLimiter(config.limits)  # a Redis limiter goes here for many instances
    app.on_startup.append(_log_auth)
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_streams)
    app.on_shutdown.append(_drain)
    app.on_response_prepare.append(set_request_id_header)
    app.add_routes(routes_openai.routes)
    app.add_routes(routes_streams.routes)
    app.add_routes(routes_info.routes)
    app.add_routes(routes_page.routes)
    _cors(app, config)
    return app


async def _log_auth(app: web.Application) -> None:
    log.info("%s", app[AUTH].describe())  # one line: on or off, never a key


def _cors(app: web.Application, config: Config) -> None:
    """CORS for the ``/v1/*`` routes, for the origins in ``auth.cors_origins`` (none: no CORS)."""
    origins = config.auth.cors_origins
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_headers=("Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"),
        expose_headers=("X-Request-ID", "X-Stream-ID", "X-Streamsvc-Upstream",
                        "X-Streamsvc-Attempts", "Retry-After"),
        allow_methods=("GET", "POST", "DELETE"),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        resource = route.resource
        if resource is not None and resource.canonical.startswith("/v1/"):
            cors.add(route)
