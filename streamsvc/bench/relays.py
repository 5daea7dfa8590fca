"""The Python processes of a run (the simulator, the baseline relay, ``streamsvc serve``)
and the warm-up every relay gets before it is measured.

Shared by the sequential bench (``orchestrator``) and the paired one (``paired``), so that
both measure the same processes, started the same way.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from streamsvc.bench.load import request_body
from streamsvc.bench.options import ENDPOINTS, RelayLoop
from streamsvc.bench.services import Service, ServiceError, free_port

__all__ = [
    "EVENT_LOOP_SETTING",
    "WARM_UP_STREAMS",
    "WARM_UP_TOKENS",
    "PythonRelay",
    "python_service",
    "relay_service",
    "simulator_service",
    "warm_up",
]

WARM_UP_STREAMS = 20
WARM_UP_TOKENS = 20
EVENT_LOOP_SETTING = "STREAMSVC__SERVER__EVENT_LOOP"
"""How ``streamsvc serve`` is told its loop (the baseline takes ``--loop``)."""
PythonRelay = Literal["baseline", "streamsvc"]


def python_service(role: str, args: Sequence[str], *, workdir: Path,
                   env: Mapping[str, str] | None = None) -> Service:
    """``python ARGS`` on a free port (``{port}`` in ``args``), logging to
    ``workdir/ROLE-PORT.log``; not started."""
    port = free_port()
    command = [sys.executable, *(arg.replace("{port}", str(port)) for arg in args)]
    return Service(role, command, port=port, log_path=workdir / f"{role}-{port}.log", env=env)


def simulator_service(workdir: Path) -> Service:
    """A ``streamsvc simulate`` process on the harness's loop (its default), without the
    garbage collector's pauses (:mod:`streamsvc.bench.collector`); not started."""
    return python_service("simulator", ["-m", "streamsvc.bench.simulator", "--port", "{port}"],
                          workdir=workdir)


def relay_service(relay: PythonRelay, *, upstream: str, loop: RelayLoop, workdir: Path,
                  env: Mapping[str, str] | None = None) -> Service:
    """A fresh baseline relay or ``streamsvc serve`` in front of ``upstream`` (an OpenAI base
    URL), on ``loop``; ``env``: streamsvc's settings beyond the defaults. Not started."""
    if relay == "baseline":
        return python_service("baseline", ["-m", "streamsvc.bench.baseline", "--upstream",
                                           upstream, "--port", "{port}", "--loop", loop],
                              workdir=workdir)
    return python_service("streamsvc", ["-m", "streamsvc", "serve", "--upstream", upstream,
                                        "--port", "{port}"],
                          workdir=workdir, env={EVENT_LOOP_SETTING: loop, **(env or {})})


async def warm_up(url: str, endpoint: str, *, model: str, read_url: str | None = None) -> None:
    """A few fast streams through ``url``, so that the measured run pays no first-call costs
    (on ``read_url`` too, where the streams of ``streams`` are read).

    Raises:
        ServiceError: a warm-up request was not answered as it should be.
    """
    body = request_body(model, WARM_UP_TOKENS, 1000.0, endpoint)

    async def read(response: aiohttp.ClientResponse, status: int) -> bytes:
        text = await response.read()
        if response.status != status:
            raise ServiceError(f"warm-up request to {response.url} answered"
                               f" {response.status}: {text[:300]!r}")
        return text

    async def one(session: aiohttp.ClientSession) -> None:
        creates = endpoint == "streams"
        async with session.post(url + ENDPOINTS[endpoint], json=body) as resp:
            text = await read(resp, 201 if creates else 200)
        if creates:
            events_url = msgspec.json.decode(text)["events_url"]
            async with session.get((read_url or url) + events_url) as resp:
                await read(resp, 200)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(WARM_UP_STREAMS)))
