"""Every typed app and request state key of the server, in one place.

Each app key is set by the start-up step or cleanup context that owns the
resource (``streamsvc.server.app``). The value types are imported for type
checking only, so any module may import its keys from here without cycles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from streamsvc.config import Config
    from streamsvc.journal.base import Journal
    from streamsvc.server.auth import Auth, Ticket
    from streamsvc.server.connections import Connections
    from streamsvc.server.limits import Limiter
    from streamsvc.server.metrics import Metrics
    from streamsvc.streams.lifecycle import Streams
    from streamsvc.streams.registry import StreamRegistry
    from streamsvc.upstream.routing import Router

__all__ = [
    "AUTH", "CONFIG", "CONNECTIONS", "DRAINING", "DRAIN_LEAVERS", "HUNG_UP", "JOURNAL",
    "JOURNAL_SHARED", "KEY_ID", "LIMITER", "METRICS", "REDIS", "REGISTRY", "REQUEST_ID",
    "ROUTER", "SESSION", "STREAMS", "TICKET",
]

CONFIG: web.AppKey[Config] = web.AppKey("config")
SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTER: web.AppKey[Router] = web.AppKey("router")
JOURNAL: web.AppKey[Journal] = web.AppKey("journal")
REGISTRY: web.AppKey[StreamRegistry] = web.AppKey("registry")
STREAMS: web.AppKey[Streams] = web.AppKey("streams")
"""The one stream lifecycle every endpoint starts its streams through."""
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
AUTH: web.AppKey[Auth] = web.AppKey("auth")
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
CONNECTIONS: web.AppKey[Connections] = web.AppKey("connections")
REDIS: web.AppKey[Redis | None] = web.AppKey("redis")
"""The process's one Redis client (one connection pool); None with the memory journal."""
DRAINING = web.AppKey("draining", asyncio.Event)
"""Set when shutdown begins: readiness fails and new streams are refused."""
JOURNAL_SHARED = web.AppKey("journal_shared", bool)
"""Whether other instances read the same journal (Redis): readers may resume elsewhere."""
DRAIN_LEAVERS: web.AppKey[set[Callable[[], None]]] = web.AppKey("drain_leavers")
"""Readers to let go at drain so they resume on another instance (shared journal only)."""

REQUEST_ID = web.RequestKey("request_id", str)
HUNG_UP = web.RequestKey("hung_up", bool)
KEY_ID = web.RequestKey("key_id", str)
"""The id (an HMAC) of the API key the request came with; absent with auth off."""
TICKET: web.RequestKey[Ticket] = web.RequestKey("ticket")
"""The EventSource ticket the request came with (``?ticket=``)."""
