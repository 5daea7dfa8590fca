"""``POST /v1/chat/completions``: OpenAI's wire format, exactly, on the one stream lifecycle.

Streamed answers hold the response headers until the first content (at most
``heartbeat_s``), so an error before the stream (429, no upstream, exhausted
retries and fallbacks, a drain) gets an HTTP status, as OpenAI clients
expect; after that, an error is a ``data: {"error": ...}`` frame and the
body ends without ``[DONE]``. A non-streamed answer is the same pipeline,
collected.
"""

from __future__ import annotations

import logging

from aiohttp import web

from streamsvc.server.json_response import json_response
from streamsvc.server.middleware import note_hangup
from streamsvc.server.requests import parse_chat_body
from streamsvc.server.sse_response import ClientGone, SSEResponse
from streamsvc.server.state import CONFIG, KEY_ID, REQUEST_ID, STREAMS
from streamsvc.streams.readers import read_backlog
from streamsvc.wire.openai_chat import OpenAIChatEncoder

__all__ = ["routes"]

log = logging.getLogger("streamsvc.http")
routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat_body(await request.read())
    streams = request.app[STREAMS]
    key_id = request.get(KEY_ID)
    if not chat.stream:
        answer, context = await streams.complete(chat, key_id=key_id)
        headers = {"X-Streamsvc-Attempts": str(context.attempts)}
        if context.upstream:
            headers["X-Streamsvc-Upstream"] = context.upstream
        return json_response(answer, headers=headers)

    generation, backlog = await streams.direct(
        chat, lambda _id: OpenAIChatEncoder(chat.include_usage), key_id=key_id, kind="openai")
    response: SSEResponse | None = None
    try:
        await backlog.wait_first(request.app[CONFIG].server.heartbeat_s)
        context = generation.context
        # Not resumable, but named like every stream, for logs and support.
        headers = {"X-Stream-ID": generation.id, "X-Streamsvc-Attempts": str(context.attempts)}
        if context.upstream:
            headers["X-Streamsvc-Upstream"] = context.upstream
        response = SSEResponse(request.app[CONFIG].server, headers=headers)
        await response.start(request)
        await read_backlog(response, backlog)
    except ClientGone:
        note_hangup(request)
        log.info("request %s: client left (499)", request[REQUEST_ID])
    finally:
        streams.done_reading(generation)
        if response is not None:
            await response.close()
    assert response is not None
    return response
