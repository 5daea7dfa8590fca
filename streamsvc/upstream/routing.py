"""Model name -> the upstreams that serve it, in fallback order. Clients never choose URLs."""

from __future__ import annotations

import difflib
import logging
import time

import aiohttp

from streamsvc.config import BUILTIN_SIMULATOR, Config
from streamsvc.errors import ClientError, ErrorCode, UpstreamError
from streamsvc.upstream.client import UpstreamClient
from streamsvc.upstream.pool import ConnectionPool

__all__ = ["Router"]

log = logging.getLogger("streamsvc.routing")
_MODELS_TTL_S = 60.0


class Router:
    """Builds one :class:`UpstreamClient` per configured upstream and picks them by model.

    Args:
        config: the loaded config.
        session: the app's shared ``ClientSession`` (for ``GET /models``).
        simulator_url: the base URL of the in-process simulator, when one runs.
        pool: the app's upstream connections, which the streams reuse.
    """

    def __init__(
        self, config: Config, session: aiohttp.ClientSession, simulator_url: str | None = None,
        *, pool: ConnectionPool | None = None,
    ) -> None:
        self._config = config
        self.clients: dict[str, UpstreamClient] = {}
        self._models: dict[str, tuple[float, list[str]]] = {}
        self._simulated = {n for n, u in config.upstreams.items() if u.base_url == BUILTIN_SIMULATOR}
        for name, upstream in config.upstreams.items():
            base_url = simulator_url if upstream.base_url == BUILTIN_SIMULATOR else None
            self.clients[name] = UpstreamClient(name, upstream, session, pool=pool,
                                                base_url=base_url)

    def describe(self) -> str:
        """The start-up log line: which models go where, and what happens to the others.

        Routes in a row with the same upstreams share one entry:
        ``routes: echo, sim-small -> simulator; gpt-* -> openai, then azure; any other
        model: 404 model_not_found``.
        """
        groups: list[tuple[list[str], list[str]]] = []
        for route in self._config.routes:
            if groups and groups[-1][1] == route.upstreams:
                groups[-1][0].append(route.model)
            else:
                groups.append(([route.model], route.upstreams))
        parts = [f"{', '.join(models)} -> {', then '.join(upstreams)}"
                 for models, upstreams in groups]
        if not any(route.model == "*" for route in self._config.routes):
            parts.append("any other model: 404 model_not_found")
        return "routes: " + "; ".join(parts)

    def is_simulator(self, name: str) -> bool:
        """Whether the named upstream is the built-in simulator."""
        return name in self._simulated

    async def models_of(self, name: str) -> list[str]:
        """The models upstream ``name`` lists, cached for a minute; [] when it cannot say."""
        now = time.monotonic()
        cached = self._models.get(name)
        if cached is not None and now - cached[0] < _MODELS_TTL_S:
            return cached[1]
        try:
            models = await self.clients[name].models()
        except UpstreamError as error:
            log.warning("GET /v1/models: %s", error.message)
            models = []
        self._models[name] = (now, models)
        return models

    def clients_for(self, model: str) -> list[UpstreamClient]:
        """The upstreams for ``model``: the first is primary, the rest fallbacks."""
        route = self._config.route(model)
        if route is None:
            near = difflib.get_close_matches(model, self._config.models(), n=1, cutoff=0.6)
            raise ClientError(
                f"no route serves model {model!r}"
                + (f"; did you mean {near[0]!r}?" if near else "")
                + " (GET /v1/models lists the models served)",
                code=ErrorCode.MODEL_NOT_FOUND, param="model",
            )
        return [self.clients[name] for name in route.upstreams]

    def continues(self, model: str) -> bool:
        """Whether answers for ``model`` are continued after a mid-stream failure: the
        route's ``continue_on_failure``, else ``pipeline.continue_on_failure``."""
        route = self._config.route(model)
        if route is not None and route.continue_on_failure is not None:
            return route.continue_on_failure
        return self._config.pipeline.continue_on_failure
