"""The one middleware every request goes through: its connection counted, its request id,
its key checked, its body read, and typed errors turned into OpenAI-style error bodies."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from streamsvc.errors import ClientError, ErrorCode, StreamError, StreamsvcError
from streamsvc.server.auth import authorize, needs_key
from streamsvc.server.json_response import json_response
from streamsvc.server.sse_response import response_bytes
from streamsvc.server.state import CONFIG, CONNECTIONS, HUNG_UP, METRICS, REQUEST_ID

__all__ = ["read_body", "request_middleware", "set_request_id_header"]

log = logging.getLogger("streamsvc.http")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: StreamsvcError) -> web.Response:
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(math.ceil(retry_after))  # what the upstream asked for
    return json_response(error.to_openai(), status=error.status, headers=headers)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request goes through, in this order: counted against its connection
    (:class:`~streamsvc.server.connections.Connections`), given its request id, its key
    checked (:func:`~streamsvc.server.auth.authorize`), its body read (:func:`read_body`);
    a typed error of any step or of the handler is answered as an OpenAI error body.

    One middleware, not one per step: aiohttp keeps a middleware's coroutine for as
    long as its request runs (a stream's whole life), one more object for every
    garbage collection to walk, and one more call and task step a request.
    """
    connections = request.app[CONNECTIONS]
    protocol = request.protocol if isinstance(request.protocol, RequestHandler) else None
    if protocol is not None:
        connections.enter(protocol)
    try:
        incoming = request.headers.get("X-Request-ID", "")
        request[REQUEST_ID] = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        try:
            if needs_key(request):
                await authorize(request)
            if request.body_exists:
                await read_body(request)
            response = await handler(request)
            _count(request, response.status, response)
            return response
        except asyncio.CancelledError:
            _count(request, 499)  # the client hung up; the handler was cancelled
            raise
        except StreamsvcError as exc:
            failure = exc
        except web.HTTPRequestEntityTooLarge:
            failure = ClientError(
                "body: the request body is larger than server.max_body_bytes"
                f" ({request.app[CONFIG].server.max_body_bytes} bytes)",
                code=ErrorCode.PAYLOAD_TOO_LARGE, param="body",
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST
            failure = ClientError(f"{request.method} {request.path}: {exc.reason}", code=code,
                                  status=exc.status)
        except Exception:  # a bug of ours: a typed 500, and the process goes on
            log.exception("request %s %s %s failed", request[REQUEST_ID], request.method,
                          request.path)
            failure = StreamsvcError("internal error", code=ErrorCode.INTERNAL_ERROR)
        return _failed(request, failure)
    finally:
        if protocol is not None:
            connections.leave(protocol)


def _failed(request: web.Request, failure: StreamsvcError) -> web.Response:
    """The error body of a request that failed, logged and counted."""
    log.info(
        "request %s %s %s: %s %s (param=%s)", request[REQUEST_ID], request.method,
        request.path, failure.status, failure.code, failure.param,
    )
    request.app[METRICS].count_error(str(failure.code))
    response = error_response(failure)
    if failure.code is ErrorCode.REQUEST_TIMEOUT:
        response.force_close()  # RFC 9110: a 408 means the server stops waiting on this connection
    _count(request, failure.status, response)
    return response


async def read_body(request: web.Request) -> None:
    """Read the whole body, within ``server.body_timeout_s``, before the handler runs.

    So an upload that stalls holds nothing but its connection (no stream slot,
    no upstream request) and gets ``408 request_timeout``; aiohttp keeps what
    was read, and the handler's own ``read()`` returns it at once.
    """
    if request.content.is_eof():  # it all came with the headers (nearly every request)
        await request.read()
        return
    server = request.app[CONFIG].server
    try:
        async with asyncio.timeout(server.body_timeout_s):
            await request.read()
    except TimeoutError:
        raise ClientError(
            f"body: the request body did not arrive within server.body_timeout_s"
            f" ({server.body_timeout_s:g} s)",
            code=ErrorCode.REQUEST_TIMEOUT, param="body",
        ) from None


def _count(request: web.Request, status: int, response: web.StreamResponse | None = None) -> None:
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS]
    if response is not None:
        metrics.response_bytes.inc(response_bytes(response))
    metrics.count_request(endpoint, status)
    if status == 499:
        note_hangup(request)


def ensure_accepting(draining: asyncio.Event) -> None:
    """New streams are refused once shutdown began: the client retries elsewhere."""
    if draining.is_set():
        raise StreamError(
            "the server is shutting down: retry, and the load balancer sends you to"
            " another instance",
            code=ErrorCode.SHUTTING_DOWN, retryable=True,
        )


def note_hangup(request: web.Request) -> None:
    """Count and log a client that left, once per request (a handler may see it twice).

    The log line has status 499 (nginx's code for it): aiohttp writes no
    access line for a handler cancelled by a hang-up.
    """
    if not request.get(HUNG_UP):
        request[HUNG_UP] = True
        request.app[METRICS].client_hangups.inc()
        request_id = request.get(REQUEST_ID, "-")
        log.info(
            "request %s %s %s: 499 client left", request_id, request.method, request.path,
            extra={"request_id": request_id, "method": request.method, "path": request.path,
                   "status": 499},
        )


async def set_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, carries X-Request-ID."""
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers["X-Request-ID"] = request_id
