"""The control: the thinnest byte-for-byte aiohttp relay.

``python -m streamsvc.bench.baseline --upstream http://127.0.0.1:8081/v1 --port 8090``

``POST /v1/chat/completions`` goes to the upstream's ``/chat/completions``
through one shared ``ClientSession``; the answer's bytes go back as they
come (``iter_any()``), with no parsing, no journal and no pipeline. Its CPU
per token is what any aiohttp relay pays for two sockets and an event loop,
so ``streamsvc bench`` reports streamsvc's cost as a ratio to it, measured
in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from streamsvc.eventloop import EVENT_LOOPS, loop_factory, loop_name
from streamsvc.listen import LISTEN_BACKLOG

__all__ = ["create_baseline_app", "main"]

_SESSION = web.AppKey("baseline_session", aiohttp.ClientSession)
_UPSTREAM = web.AppKey("baseline_upstream", str)
# Request headers worth passing on; hop-by-hop ones are aiohttp's business.
_FORWARDED = ("Content-Type", "Accept", "Authorization")


async def _relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
    session = request.app[_SESSION]
    async with session.post(request.app[_UPSTREAM], data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[_SESSION] = session
        yield


def create_baseline_app(upstream: str) -> web.Application:
    """The relay app; ``upstream`` is an OpenAI base URL such as ``http://host:port/v1``."""
    app = web.Application()
    app[_UPSTREAM] = upstream.rstrip("/") + "/chat/completions"
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", _relay)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the baseline relay until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m streamsvc.bench.baseline",
                                     description="A byte-for-byte aiohttp relay (the control).")
    parser.add_argument("--upstream", required=True, metavar="URL",
                        help="OpenAI base URL, e.g. http://127.0.0.1:8081/v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args(argv)
    loop = loop_factory(args.loop)()
    web.run_app(
        create_baseline_app(args.upstream), host=args.host, port=args.port, loop=loop,
        access_log=None, handler_cancellation=True,  # a hang-up cancels the upstream request
        backlog=LISTEN_BACKLOG,  # as streamsvc serve
        print=lambda _: print(f"baseline listening on http://{args.host}:{args.port}"
                              f" (event loop: {loop_name(loop)})", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
