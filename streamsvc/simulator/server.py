"""The simulator on a real socket: :class:`SimulatorServer` and ``streamsvc simulate``."""

from __future__ import annotations

import asyncio
from enum import Enum
from types import TracebackType
from typing import Self

from aiohttp import web

from streamsvc.listen import LISTEN_BACKLOG
from streamsvc.simulator.app import SIMULATOR_STATS_KEY, create_simulator_app
from streamsvc.simulator.stats import SimulatorStats

__all__ = ["DEFAULT_HOST", "DEFAULT_SHUTDOWN_TIMEOUT", "SimulatorServer", "serve_simulator"]

DEFAULT_HOST = "127.0.0.1"
# Hanging streams are cancelled by the app's on_shutdown hook; this only
# bounds a handler that ignores that.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0


class _Lifecycle(Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class SimulatorServer:
    """The simulator on a real socket, as an async context manager.

    Args:
        host: the address to bind.
        port: the port; 0 picks a free one (read it back from ``port``).
        shutdown_timeout: how long closing waits for answers still running.

    Example::

        async with SimulatorServer() as sim:
            client = AsyncOpenAI(base_url=sim.url, api_key="x")
            ...
            assert sim.stats.completed == 1
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.host = host
        self.app = create_simulator_app()
        self._requested_port = port
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._lifecycle = _Lifecycle.NEW

    @property
    def stats(self) -> SimulatorStats:
        """The live counters (the same object ``GET /_sim/stats`` reads)."""
        return self.app[SIMULATOR_STATS_KEY]

    @property
    def port(self) -> int:
        """The bound port; only while running."""
        if self._lifecycle is not _Lifecycle.RUNNING or self._port is None:
            raise RuntimeError(
                f"SimulatorServer is {self._lifecycle.value}, not running: "
                "use 'async with SimulatorServer() as sim'"
            )
        return self._port

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Bind and start serving; a server starts once."""
        if self._lifecycle is not _Lifecycle.NEW:
            raise RuntimeError(f"SimulatorServer is {self._lifecycle.value}; it starts only once")
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            # A deep accept queue, as `streamsvc serve` has: a benchmark opens
            # hundreds of streams at once (aiohttp's default is 128).
            site = web.TCPSite(runner, self.host, self._requested_port, backlog=LISTEN_BACKLOG)
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._lifecycle = _Lifecycle.RUNNING

    async def close(self) -> None:
        """Stop serving and end the streams still open; closing twice is a no-op."""
        runner, self._runner = self._runner, None
        self._lifecycle = _Lifecycle.CLOSED
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def serve_simulator(host: str, port: int) -> None:
    """Serve the simulator until cancelled (``streamsvc simulate``).

    Prints one line, ``streamsvc simulator listening on http://HOST:PORT/v1``.
    """
    async with SimulatorServer(host, port) as sim:
        print(f"streamsvc simulator listening on {sim.url}", flush=True)
        await asyncio.Event().wait()
