"""Access log lines without query strings: a one-shot GET carries the prompt in ``q``."""

from __future__ import annotations

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from streamsvc.server.sse_response import response_bytes
from streamsvc.server.state import HUNG_UP, REQUEST_ID

__all__ = ["AccessLogger"]


class AccessLogger(AbstractAccessLogger):
    """``METHOD /path STATUS BYTES TIMEs request_id``; never the query, never a header value.

    BYTES is the body the response handed to its connection (an event
    stream's frames as written, a JSON body's length), without headers.

    A client that hung up is logged with status 499 (nginx's code for it),
    whatever the response had started as. The same values go along as
    fields, for the JSON log format (``[log] format = "json"``).
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        request_id = request.get(REQUEST_ID, "-")
        status = 499 if request.get(HUNG_UP) else response.status
        sent = response_bytes(response)
        self.logger.info(
            "%s %s %s %d %d %.3fs %s",
            request.remote, request.method, request.path, status,
            sent, time, request_id,
            extra={
                "request_id": request_id, "method": request.method, "path": request.path,
                "status": status, "bytes": sent, "duration_s": round(time, 4),
            },
        )
