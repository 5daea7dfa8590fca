"""``GET /v1/models``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from streamsvc.server.json_response import json_response
from streamsvc.server.state import CONFIG, DRAINING, JOURNAL, METRICS, ROUTER
from streamsvc.simulator import MODELS as SIMULATOR_MODELS

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """The models the routes serve, in OpenAI's list shape.

    A route's literal model name is listed; a glob route lists the models its
    primary upstream lists (the built-in simulator's, or the upstream's own
    ``GET /models``, cached for a minute) that the glob matches.
    """
    config = request.app[CONFIG]
    router = request.app[ROUTER]
    names: list[str] = []
    for route in config.routes:
        if not any(c in route.model for c in "*?["):
            candidates = [route.model]
        elif router.is_simulator(route.upstreams[0]):
            candidates = [m for m in SIMULATOR_MODELS if route.matches(m)]
        else:
            listed = await router.models_of(route.upstreams[0])
            candidates = [m for m in listed if route.matches(m)]
        for name in candidates:
            # A model an earlier route already serves is listed once, under that route.
            if name not in names and config.route(name) is route:
                names.append(name)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "streamsvc"} for name in names
    ]
    return json_response({"object": "list", "data": data})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING].is_set():
        return json_response({"status": "draining"}, status=503)
    if not request.app[JOURNAL].healthy:
        return json_response(
            {"status": "journal_unavailable", "message": "the journal (Redis) cannot be reached"},
            status=503)
    return json_response({"status": "ready"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


@routes.get("/favicon.ico")
async def favicon(request: web.Request) -> web.Response:
    """No icon; an empty answer instead of a 404 in every browser console."""
    return web.Response(status=204)
