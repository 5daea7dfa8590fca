"""Typed app state keys; each is set by the cleanup context that owns the resource."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from streamsvc.config import Config
from streamsvc.journal.base import Journal
from streamsvc.server.metrics import Metrics
from streamsvc.streams import StreamRegistry
from streamsvc.upstream.routing import Router

CONFIG = web.AppKey("config", Config)
SESSION = web.AppKey("session", aiohttp.ClientSession)
ROUTER = web.AppKey("router", Router)
JOURNAL = web.AppKey("journal", Journal)
REGISTRY = web.AppKey("registry", StreamRegistry)
METRICS = web.AppKey("metrics", Metrics)
REDIS: web.AppKey[Redis | None] = web.AppKey("redis")
"""The process's one Redis client (one connection pool); None with the memory journal."""
REQUEST_ID = web.RequestKey("request_id", str)
HUNG_UP = web.RequestKey("hung_up", bool)
DRAINING = web.AppKey("draining", asyncio.Event)
JOURNAL_SHARED = web.AppKey("journal_shared", bool)
"""Whether other instances read the same journal (Redis): readers may resume elsewhere."""
ANSWERS: web.AppKey[dict[asyncio.Future[None], Callable[[], None]]] = web.AppKey("answers")
"""``POST /v1/chat/completions`` answers in flight (no generation), each with the function
that cuts it with ``shutting_down``: the drain waits for them, then cuts the rest."""
DRAIN_LEAVERS: web.AppKey[set[Callable[[], None]]] = web.AppKey("drain_leavers")
"""Readers to let go at drain so they resume on another instance (shared journal only)."""
"""Set when shutdown begins: readiness fails and new streams are refused."""
