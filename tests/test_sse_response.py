"""SSEResponse over a real socket: frames kept for the turn's write batch keep their order.

``write_now`` keeps a frame until the end of the loop's turn
(``streamsvc.reactive.write_batch``); whatever writes next (``send``, the end
of the body, or the same turn going past the keep bound) must come after it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from streamsvc.config import ServerConfig
from streamsvc.server.sse_response import KEEP_BYTES, SSEResponse

Handler = Callable[[SSEResponse], Awaitable[None]]


def frame(n: int, size: int = 0) -> bytes:
    return b"data: %d %s\n\n" % (n, b"x" * size)


async def body_of(aiohttp_client: Any, handler: Handler) -> bytes:
    async def route(request: web.Request) -> web.StreamResponse:
        response = SSEResponse(ServerConfig(), headers={})
        await response.start(request)
        await handler(response)
        return response

    app = web.Application()
    app.router.add_get("/", route)
    client = await aiohttp_client(app)
    async with client.get("/") as reply:
        assert reply.status == 200
        return await reply.read()


async def test_frames_kept_this_turn_go_before_the_end_of_a_body_aiohttp_ends(
    aiohttp_client: Any,
) -> None:
    async def handler(response: SSEResponse) -> None:
        assert response.write_now(frame(1)) and response.write_now(frame(2))
        # returns at once: aiohttp ends the body, after the kept frames

    assert await body_of(aiohttp_client, handler) == frame(1) + frame(2)


async def test_a_send_after_kept_frames_comes_after_them(aiohttp_client: Any) -> None:
    async def handler(response: SSEResponse) -> None:
        assert response.write_now(frame(1))
        await response.send(frame(2))
        assert response.write_now(frame(3))
        await response.close()

    assert await body_of(aiohttp_client, handler) == frame(1) + frame(2) + frame(3)


async def test_frames_past_the_keep_bound_are_written_in_the_same_turn(
    aiohttp_client: Any,
) -> None:
    """A reader catching up in one turn meets the connection's backpressure, not a list
    that grows with the whole backlog: past ``KEEP_BYTES`` the frames go to the socket."""
    size = 1024
    count = 4 * KEEP_BYTES // size
    sent_in_turn = []

    async def handler(response: SSEResponse) -> None:
        taken = 0
        while taken < count and response.write_now(frame(taken, size)):
            taken += 1
        sent_in_turn.append(response.sent)  # before the loop's turn ends
        for n in range(taken, count):
            await response.send(frame(n, size))
        await response.close()

    body = await body_of(aiohttp_client, handler)
    assert body == b"".join(frame(n, size) for n in range(count))
    assert sent_in_turn[0] >= KEEP_BYTES
