"""Access log lines without query strings: a one-shot GET carries the prompt in ``q``."""

from __future__ import annotations

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from streamsvc.server.state import REQUEST_ID

__all__ = ["AccessLogger"]


class AccessLogger(AbstractAccessLogger):
    """``METHOD /path STATUS BYTES TIMEs request_id``; never the query, never a header value."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        request_id = request.get(REQUEST_ID, "-")
        self.logger.info(
            "%s %s %s %d %d %.3fs %s",
            request.remote, request.method, request.path, response.status,
            response.body_length, time, request_id,
        )
