"""Running the app: aiohttp's runner, with streamsvc's answer to requests aiohttp refuses itself.

aiohttp answers a request it cannot parse (a NUL or CR in a header, a line
longer than 8,190 bytes, a bad method or chunk size) from inside its
protocol, before any middleware runs, in plain text that repeats the
offending bytes, and logs those bytes (an ``Authorization`` header among
them) with a traceback. It has no hook for this (aio-libs/aiohttp#3287), so
streamsvc owns that piece: :class:`Protocol` is aiohttp's ``RequestHandler``
with its own ``handle_error``, which answers the OpenAI-shaped JSON of every
other error, names the part of the request at fault (a header by its name,
never its value) and logs one line. :class:`AppRunner` serves an app with
it; :func:`run_app` is ``web.run_app`` on that runner (``streamsvc serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import re
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from streamsvc.errors import ClientError, ErrorCode, StreamsvcError
from streamsvc.server.middleware import error_response
from streamsvc.tasks import stop_tasks

__all__ = ["AppRunner", "Protocol", "log_tasks", "run_app", "unreadable_request"]

log = logging.getLogger("streamsvc.http")

# aiohttp's messages quote the bytes at fault after the reason ("Invalid header
# value char:\n\n  b'X-A: a\x00b'"); only a header's name is taken from them.
_QUOTED_HEADER = re.compile(r"""b?['"]([!#$%&'*+.^_`|~0-9A-Za-z-]+):""")
_QUOTE_START = re.compile(r""":?\s*(?:bytearray\()?b?['"].*""", re.DOTALL)


def unreadable_request(status: int, exc: BaseException | None) -> StreamsvcError:
    """The typed error for a request aiohttp could not read (``status`` is aiohttp's).

    Example:
        >>> error = unreadable_request(400, http_exceptions.BadHttpMessage(
        ...     "Invalid header value char:\\n\\n  b'X-A: a\\\\x00b'"))
        >>> error.param, error.message
        ('X-A', 'X-A: the request could not be read: Invalid header value char')
    """
    if status != 400 or not isinstance(exc, http_exceptions.HttpProcessingError):
        return StreamsvcError("internal error while reading the request",
                              code=ErrorCode.INTERNAL_ERROR, status=status)
    text = exc.message or "bad request"
    reason = _QUOTE_START.sub("", text.split("\n", 1)[0]).rstrip(" :.") or "bad request"
    param: str | None
    if isinstance(exc, http_exceptions.LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray):
            line = line.decode("latin-1")
        param = "url" if line.startswith(("/", "http")) else "headers"
        reason = f"a {'request line' if param == 'url' else 'header'} is longer than" \
                 f" {exc.args[1] if len(exc.args) > 1 else 8190} bytes"
    elif isinstance(exc, http_exceptions.InvalidHeader):
        param = "headers"  # its text may be a header's value (one with a NUL): never echoed
        reason = "invalid header"
    elif isinstance(exc, http_exceptions.BadHttpMethod):
        param = "method"
    elif isinstance(exc, http_exceptions.BadStatusLine | http_exceptions.InvalidURLError):
        param = "request line"
    elif isinstance(exc, http_exceptions.PayloadEncodingError):
        param = "body"
    elif named := _QUOTED_HEADER.search(text):
        param = named.group(1)
    else:
        param = "body" if re.search(r"chunk|payload|body", reason, re.IGNORECASE) else "headers"
    return ClientError(f"{param}: the request could not be read: {reason}", param=param)


class Protocol(RequestHandler):
    """aiohttp's HTTP/1 protocol, answering what it refuses itself in streamsvc's JSON."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer is half out, the end is near
            raise ConnectionError("the response started already; no error body can follow")
        error = unreadable_request(status, exc)
        request_id = uuid.uuid4().hex
        log.info("request %s from %s: %s %s (param=%s): %s", request_id, request.remote,
                 error.status, error.code, error.param, error.message)
        response = error_response(error)
        response.headers["X-Request-ID"] = request_id
        response.force_close()  # the rest of the stream cannot be trusted to be a request
        return response


class _Server(web.Server):
    """aiohttp's Server, whose connections are :class:`Protocol`."""

    def __call__(self) -> RequestHandler:
        # As web.Server.__call__ does, with streamsvc's class.
        return Protocol(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unreadable requests in streamsvc's JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's start-up runs here
        return _Server(server.request_handler, request_factory=server.request_factory,
                       handler_cancellation=server.handler_cancellation,
                       loop=asyncio.get_running_loop(), **server._kwargs)


def run_app(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    backlog: int,
    shutdown_timeout: float,
    print: Callable[[str], None],  # the name web.run_app gives it
    **runner_options: Any,
) -> None:
    """``web.run_app`` on :class:`AppRunner`: serve until SIGINT or SIGTERM, then shut down.

    ``runner_options`` go to the runner (``handler_cancellation``,
    ``access_log_class``, ...). ``print`` is called once the socket listens.
    """

    async def serve() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            loop.add_signal_handler(signal.SIGUSR1, log_tasks, loop)
        runner = AppRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout,
                           **runner_options)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=backlog)
            await site.start()
            _tune_gc()
            print(f"listening on {site.name}")
            await asyncio.get_running_loop().create_future()  # until GracefulExit
        finally:
            started = time.monotonic()
            await runner.cleanup()  # the drain and the cleanup contexts
            log.info("shut down in %.1f s", time.monotonic() - started)

    asyncio.set_event_loop(loop)
    task = loop.create_task(serve())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):  # the signal handler raised it
        pass
    finally:
        try:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        finally:
            _cancel_left(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _tune_gc() -> None:
    """Short, rare-enough garbage collections while serving (docs/performance.md).

    What start-up made (modules, classes, config, pools) lives as long as the
    process: frozen, no full collection walks it again. What a stream keeps
    while it is open (about 75 objects) survives the young generation and
    waits in the middle one, whose collection walks all of it: every 3 young
    collections of 10,000 allocations, that was 11 to 39 ms at 1,000 streams
    opened in 4 s, a pause the streams opening then waited out (the slowest
    times to first token fell on those pauses). Young every 2,000 and the
    middle one after each: 1 to 3 ms each, 26 where there were 3, less collector
    time in all, the same CPU per token. The old generation waits for 100
    middle collections instead of 10: a full collection (35 to 80 ms at 1,000
    open streams) every 200,000 allocations, where it was 300,000, not 20,000.
    """
    gc.freeze()
    gc.set_threshold(2_000, 1, 100)


def log_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Log every pending task with where it waits (``kill -USR1 <pid>``: what a shutdown or a
    stream is stuck on)."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    out = io.StringIO()
    for task in tasks:
        task.print_stack(limit=8, file=out)
    log.warning("%d tasks pending:\n%s", len(tasks), out.getvalue())


def _cancel_left(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending after the shutdown, and wait (a bounded time) for them."""
    left = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if left:
        loop.run_until_complete(stop_tasks(left, within_s=5.0))
