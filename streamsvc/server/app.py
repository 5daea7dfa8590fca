"""The aiohttp application: resources in paired start-up/shutdown contexts, and the routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import aiohttp_cors
from aiohttp import web
from redis.utils import HIREDIS_AVAILABLE

from streamsvc.config import BUILTIN_SIMULATOR, Config, redact_url
from streamsvc.journal.base import Journal
from streamsvc.journal.memory import MemoryJournal
from streamsvc.journal.peers import RedisPeers
from streamsvc.journal.redis import RedisJournal
from streamsvc.journal.redis_client import connect_redis
from streamsvc.server import (
    routes_info,
    routes_openai,
    routes_page,
    routes_responses,
    routes_streams,
)
from streamsvc.server.auth import Auth
from streamsvc.server.connections import Connections
from streamsvc.server.limits import MemoryLimiter
from streamsvc.server.limits_redis import RedisLimiter
from streamsvc.server.metrics import Metrics
from streamsvc.server.middleware import (
    ensure_accepting,
    request_middleware,
    set_request_id_header,
)
from streamsvc.server.state import (
    AUTH,
    CONFIG,
    CONNECTIONS,
    DRAIN_LEAVERS,
    DRAINING,
    JOURNAL,
    JOURNAL_SHARED,
    LIMITER,
    METRICS,
    REDIS,
    REGISTRY,
    ROUTER,
    SESSION,
    STREAMS,
)
from streamsvc.server.tickets import RedisTicketStore, shared_secret
from streamsvc.simulator import SimulatorServer
from streamsvc.streams.lifecycle import Streams
from streamsvc.streams.registry import StreamRegistry
from streamsvc.upstream.pool import ConnectionPool
from streamsvc.upstream.routing import Router

__all__ = ["create_app"]

log = logging.getLogger("streamsvc")


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    """The upstream connection pool (streams), the shared ClientSession (``GET /models``),
    the in-process simulator when a route uses it, the router."""
    config = app[CONFIG]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        auto_decompress=True,
    )
    pool = ConnectionPool()
    simulator: SimulatorServer | None = None
    try:
        simulator_url: str | None = None
        if any(u.base_url == BUILTIN_SIMULATOR for u in config.upstreams.values()):
            simulator = SimulatorServer(host="127.0.0.1", port=0)
            await simulator.__aenter__()
            simulator_url = simulator.url
            log.info("built-in simulator upstream at %s", simulator_url)
        app[SESSION] = session
        app[ROUTER] = Router(config, session, simulator_url, pool=pool)
        log.info("%s", app[ROUTER].describe())
        for name, upstream in config.upstreams.items():
            if upstream.api_key_env and not upstream.api_key():
                log.warning("upstream %r: environment variable %s is not set; requests go"
                            " without a key", name, upstream.api_key_env)
        yield
    finally:
        await pool.close()
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
    log.info("journal: Redis at %s (replies parsed by %s)", redact_url(journal.redis_url),
             "hiredis" if HIREDIS_AVAILABLE
             else "redis-py in Python; pip install 'streamsvc[fast]' for hiredis")
    try:
        yield
    finally:
        await client.aclose()


async def _shared_auth(app: web.Application) -> AsyncIterator[None]:
    """Ticket bindings and limits: in Redis with the Redis journal (then they hold across
    instances), else in this process (the defaults ``create_app`` set)."""
    redis = app[REDIS]
    auth = app[AUTH]
    limiter: RedisLimiter | None = None
    if redis is not None:
        config = app[CONFIG]
        journal = config.journal
        auth.tickets = RedisTicketStore(redis, prefix=journal.redis_prefix + "t:",
                                        ttl_s=auth.binding_ttl_s, url=journal.redis_url)
        if auth.enabled and not auth.shared_secret:
            # Every instance on this Redis must sign alike, or tickets, stream owners and
            # per-key limits would not hold across them: the first one's secret is shared.
            auth.use_secret(
                await shared_secret(redis, key=journal.redis_prefix + "auth:ticket-secret",
                                    url=journal.redis_url),
                f"a secret shared through Redis ({config.auth.ticket_secret_env} is unset: the"
                " first instance made it)")
        limiter = RedisLimiter(redis, config.limits, prefix=journal.redis_prefix,
                               lease_s=journal.writer_lease_s)
        await limiter.start()
        app[LIMITER] = limiter
    try:
        yield
    finally:
        await auth.close()
        if limiter is not None:
            await limiter.close()


async def _streams(app: web.Application) -> AsyncIterator[None]:
    """The journal and the registry of running generations; shutdown stops them all."""
    config = app[CONFIG]
    redis = app[REDIS]
    journal: Journal
    peers: RedisPeers | None = None
    if redis is None:
        journal = MemoryJournal(
            retention_s=config.journal.retention_s, max_events=config.journal.max_events,
            max_bytes=config.journal.max_bytes,
        )
    else:
        journal = redis_journal = RedisJournal(
            redis, url=config.journal.redis_url, retention_s=config.journal.retention_s,
            max_events=config.journal.max_events, max_bytes=config.journal.max_bytes,
            prefix=config.journal.redis_prefix, lease_s=config.journal.writer_lease_s,
        )
        await redis_journal.start()
    registry = StreamRegistry(resume_grace_s=config.journal.resume_grace_s,
                              retention_s=config.journal.retention_s)
    app[JOURNAL] = journal
    app[JOURNAL_SHARED] = redis is not None
    app[REGISTRY] = registry
    metrics = Metrics(active_streams=lambda: len(registry))
    app[METRICS] = metrics
    draining = app[DRAINING]
    app[STREAMS] = Streams(
        config=config, router=app[ROUTER], registry=registry, journal=journal,
        limits=app[LIMITER], observer=metrics, accepting=lambda: ensure_accepting(draining),
    )
    if redis is not None:
        redis_journal.on_unavailable = registry.fail_all
        redis_journal.on_lost = registry.cancel_here
        redis_journal.on_lag = metrics.journal_lag
        peers = RedisPeers(redis, redis_journal, prefix=config.journal.redis_prefix,
                           lease_s=config.journal.writer_lease_s,
                           on_cancel=registry.cancel_here)
        await peers.start()
        registry.peers = peers
        log.info("journal: this instance is %s", redis_journal.instance)
    try:
        yield
    finally:
        await registry.close()
        if peers is not None:
            await peers.close()
        await journal.close()


async def _drain(app: web.Application) -> None:
    """Shutdown (SIGTERM), once the listening socket is closed: let answers finish.

    ``/readyz`` fails and new streams get ``503 shutting_down`` from here on.
    With a shared journal (Redis) the readers of resumable streams are let go
    at once: they reconnect through the load balancer to another instance and
    resume from the journal. Running generations (of every endpoint) get ``drain_timeout_s`` to
    finish (readers of the others are still served here), and the rest end
    with ``shutting_down``: an error event or frame, or a 503 before the headers. Then aiohttp
    waits ``shutdown_timeout_s`` for the handlers to write what is left.
    """
    app[DRAINING].set()
    app[CONNECTIONS].close_idle()  # a proxy must not queue requests on them meanwhile
    registered: set[Callable[[], None]] = app[DRAIN_LEAVERS]
    leavers = list(registered)
    for leave in leavers:
        leave()
    if leavers:
        log.info("shutting down: %d readers of resumable streams let go to resume elsewhere",
                 len(leavers))
    running = len(app[REGISTRY])
    timeout = app[CONFIG].server.drain_timeout_s
    if running:
        log.info("shutting down: waiting up to %g s for %d running streams", timeout, running)
    started = time.monotonic()
    stopped = await app[REGISTRY].drain(timeout)
    if running:
        log.info("shutting down: streams ended in %.1f s", time.monotonic() - started)
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
        middlewares=[request_middleware],
        # Every runner's connections: a request head must come within this (slowloris).
        handler_args={"keepalive_timeout": config.server.keepalive_timeout_s},
    )
    app[CONFIG] = config
    app[AUTH] = Auth(config.auth, retention_s=config.journal.retention_s)
    app[LIMITER] = MemoryLimiter(config.limits)  # _shared_auth puts Redis's in with Redis
    app.on_startup.append(_log_auth)
    app[DRAINING] = asyncio.Event()
    app[DRAIN_LEAVERS] = set[Callable[[], None]]()
    app[CONNECTIONS] = Connections()
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_shared_auth)
    app.cleanup_ctx.append(_streams)
    app.on_shutdown.append(_drain)
    app.on_response_prepare.append(set_request_id_header)
    app.on_response_prepare.append(_close_when_draining)
    app.add_routes(routes_openai.routes)
    app.add_routes(routes_streams.routes)
    app.add_routes(routes_responses.routes)
    app.add_routes(routes_info.routes)
    app.add_routes(routes_page.routes)
    _cors(app, config)
    return app


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """While draining, every answer closes its connection after it (``Connection: close``)."""
    if request.app[DRAINING].is_set():
        response.force_close()
        response.headers["Connection"] = "close"  # the hook runs after aiohttp set this header


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
