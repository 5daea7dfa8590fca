"""The streamsvc event format: ``/v1/chat/stream`` (POST and one-shot GET) and ``/v1/streams``.

Every stream is a generation writing into the journal; every reader reads
the journal from its ``Last-Event-ID`` on. So a reconnect never calls the
upstream again, and a reconnect after the final event gets ``204``, the one
answer that stops EventSource for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
from aiohttp import web

from streamsvc.errors import ClientError, ErrorCode, StreamsvcError
from streamsvc.journal.base import Event
from streamsvc.pipeline import StreamContext, build_pipeline
from streamsvc.server.auth import AUTH, KEY_ID, TICKET, Ticket
from streamsvc.server.limits import LIMITER
from streamsvc.server.middleware import ensure_accepting, note_hangup
from streamsvc.server.requests import (
    ChatRequest,
    is_stream_id,
    parse_chat_body,
    parse_chat_query,
    parse_last_event_id,
)
from streamsvc.server.sse_response import ClientGone, SSEResponse
from streamsvc.server.state import (
    CONFIG,
    DRAIN_LEAVERS,
    JOURNAL,
    JOURNAL_SHARED,
    METRICS,
    REGISTRY,
    REQUEST_ID,
    ROUTER,
)
from streamsvc.sse import encode_event, encode_retry
from streamsvc.streams import Generation
from streamsvc.usage import estimate_prompt_tokens

__all__ = ["routes"]

log = logging.getLogger("streamsvc.http")
routes = web.RouteTableDef()


async def _start(request: web.Request, chat: ChatRequest, *, resumable: bool,
                 ticket: Ticket | None = None) -> Generation:
    ensure_accepting(request)
    app = request.app
    clients = app[ROUTER].clients_for(chat.model)
    key_id = request.get(KEY_ID)
    context = StreamContext(key_id=key_id,
                            prompt_tokens=estimate_prompt_tokens(chat.body.get("messages")))
    source = build_pipeline(chat.body, clients, app[CONFIG].pipeline, context,
                            retries=chat.retries)
    # Counted against the limits from here until the generation ends (done, error,
    # cancelled, or stopped because its client left).
    slot = await app[LIMITER].acquire_stream(key_id)
    try:
        generation = await app[REGISTRY].start(
            source, context, resumable=resumable,
            meta=None if key_id is None else {"owner": key_id},
        )
    except BaseException:
        slot.release()
        raise
    generation.ended.add_done_callback(lambda _: slot.release())
    await app[AUTH].bind_started(generation.id, generation.ended, ticket)
    app[METRICS].streams_started.labels("resumable" if resumable else "direct").inc()
    log.info("request %s: stream %s started (model %s, %s)", request[REQUEST_ID],
             generation.id, chat.model, "resumable" if resumable else "direct")
    return generation


def _resume_point(request: web.Request) -> tuple[str, int] | None:
    """Last-Event-ID from the header, else the lastEventId / Last-Event-ID query parameter."""
    header = request.headers.get("Last-Event-ID")
    if header:
        return parse_last_event_id(header, "Last-Event-ID")
    for name in ("lastEventId", "Last-Event-ID"):
        value = request.query.get(name)
        if value:
            return parse_last_event_id(value, name)
    return None


async def serve_events(request: web.Request, stream_id: str, after: int) -> web.StreamResponse:
    """Replay a stream's events after ``after``, then tail it live until its final event."""
    app = request.app
    journal = app[JOURNAL]
    state = await journal.last_seq(stream_id)
    if state is None:
        raise ClientError(
            f"no stream {stream_id!r} (unknown, or expired after its retention time)",
            code=ErrorCode.NOT_FOUND, param="id",
        )
    last, ended = state
    if after > last:
        raise ClientError(
            f"Last-Event-ID: names event {after}, but stream {stream_id} has {last} events",
            param="Last-Event-ID",
        )
    if ended and after >= last:
        return web.Response(status=204, headers={"X-Stream-ID": stream_id})

    server = app[CONFIG].server
    registry = app[REGISTRY]
    presence = await registry.attach(stream_id)
    response = SSEResponse(server, headers={"X-Stream-ID": stream_id})
    limit = server.max_pending_bytes
    generation = registry.get(stream_id)
    behind: int | None = None  # bytes journaled but not yet written here, at the last check
    leave = _leave_at_drain(request, generation)
    try:
        await response.start(request)
        await response.send_bytes(encode_retry(server.sse_retry_ms))
        while True:
            # Everything pending goes in one write, up to the bound; a reader far
            # behind (a resume) catches up in writes of at most ``limit`` bytes.
            events = await journal.read(stream_id, after, limit)
            if not events:
                break
            if generation is not None and generation.resumable:
                lag = (journal.size(stream_id) or 0) - events[0].start
                if behind is not None and lag > limit and lag > behind:
                    _slow_reader(request, stream_id, after, lag)
                    break
                behind = lag
            await response.send_bytes(b"".join([event.frame for event in events]))
            after = events[-1].seq
            if generation is not None:
                generation.wrote_through(events[-1].end)
            if events[-1].final:
                break
            # Caught up with a running stream this process writes: take the live tail.
            # (Asked of this process's own state: no journal round trip per batch.)
            if journal.live_seq(stream_id) == after:
                after, ended = await _follow_live(request, response, stream_id, after, generation)
                if ended:
                    break
    except ClientGone:
        note_hangup(request)
        log.info("request %s: client left stream %s at event %d (499)", request[REQUEST_ID],
                 stream_id, after)
    except StreamsvcError as error:
        # The journal failed under a running stream (Redis lost): the client gets
        # the error event, without an id, so a resume starts after the last real one.
        log.warning("request %s: stream %s: %s", request[REQUEST_ID], stream_id, error.message)
        with contextlib.suppress(ClientGone):
            await response.send_bytes(encode_event(
                msgspec.json.encode(error.to_event()).decode(), event="error"))
    finally:
        if leave is not None:
            app[DRAIN_LEAVERS].discard(leave)
        registry.detach(stream_id, presence)
        await response.close()
    return response


def _leave_at_drain(request: web.Request, generation: Generation | None) -> Callable[[], None] | None:
    """With a shared journal, a resumable stream's reader is let go when this instance drains.

    Its connection is closed; EventSource reconnects with Last-Event-ID,
    through the load balancer, to an instance that is not shutting down, and
    resumes from the journal while the generation here finishes into it.
    Returns the callback registered for the drain (None: the reader stays).
    """
    if not request.app[JOURNAL_SHARED] or (generation is not None and not generation.resumable):
        return None
    transport = request.transport

    def leave() -> None:
        if transport is not None:
            transport.close()

    request.app[DRAIN_LEAVERS].add(leave)
    return leave


async def _follow_live(
    request: web.Request,
    response: SSEResponse,
    stream_id: str,
    after: int,
    generation: Generation | None,
) -> tuple[int, bool]:
    """Write the live tail from the generation's own call while the socket has room.

    A reader that has caught up would otherwise wake up once per token to
    ``read`` and write. Here the journal hands it each new batch as it is
    appended, and the batch goes straight to the socket (``write_now``). Once
    the socket has no room (or the stream expires), this returns and the
    reader goes on with ``read``, where writes wait and the bounds apply.

    Returns:
        The seq written through, and whether that was the final event.
    """
    woken: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    position = after

    def take(events: list[Event]) -> bool:
        nonlocal position
        if (
            not events
            or events[0].seq != position + 1
            or not response.write_now(b"".join([event.frame for event in events]))
        ):
            if not woken.done():
                woken.set_result(False)
            return False
        position = events[-1].seq
        if generation is not None:
            generation.wrote_through(events[-1].end)
        if events[-1].final:
            woken.set_result(True)
            return False
        return True

    stop = request.app[JOURNAL].listen(stream_id, take)
    if stop is None:
        return after, False
    try:
        ended = await woken
    finally:
        stop()
    return position, ended


def _slow_reader(request: web.Request, stream_id: str, after: int, lag: int) -> None:
    """A reader of a resumable stream is over ``max_pending_bytes`` behind and falling further.

    Only this connection is closed: the generation goes on into the journal,
    and EventSource comes back with Last-Event-ID when it can. (A reader
    catching up on a replay is not one: its lag shrinks.)
    """
    request.app[METRICS].slow_consumers.inc()
    log.info("request %s: reader of stream %s is %d bytes behind at event %d: closing"
             " (slow_consumer; the stream goes on)", request[REQUEST_ID], stream_id, lag, after)


@routes.post("/v1/chat/stream")
async def post_chat_stream(request: web.Request) -> web.StreamResponse:
    """Same body as chat completions, answered in the streamsvc event format."""
    chat = parse_chat_body(await request.read(), stream_default=True)
    generation = await _start(request, chat, resumable=False)
    return await serve_events(request, generation.id, 0)


@routes.get("/v1/chat/stream")
async def get_chat_stream(request: web.Request) -> web.StreamResponse:
    """The one-shot EventSource form; a reconnect resumes by Last-Event-ID."""
    resume = _resume_point(request)
    auth = request.app[AUTH]
    ticket = request.get(TICKET)
    if ticket is not None:
        if ticket.scope != "chat":
            raise ClientError("ticket: it is for one stream's events_url, not for"
                              " GET /v1/chat/stream (mint one with POST /v1/tickets)",
                              code=ErrorCode.FORBIDDEN)
        bound = await auth.admit(ticket, resume[0] if resume is not None else None)
        if bound is not None:  # EventSource reconnecting with the URL that started `bound`
            return await serve_events(request, bound, resume[1] if resume else 0)
    elif resume is not None:
        await auth.check_owner(request, resume[0])
    if resume is not None:
        return await serve_events(request, *resume)
    try:
        chat = parse_chat_query(request.query,
                                default_model=request.app[CONFIG].server.default_model)
        generation = await _start(request, chat, resumable=True, ticket=ticket)
    except BaseException:
        if ticket is not None:
            await auth.release_unstarted(ticket)
        raise
    return await serve_events(request, generation.id, 0)


@routes.post("/v1/streams")
async def create_stream(request: web.Request) -> web.Response:
    """Create a resumable stream; the upstream starts now, EventSource reads events_url."""
    chat = parse_chat_body(await request.read(), stream_default=True)
    generation = await _start(request, chat, resumable=True)
    grace = request.app[CONFIG].journal.resume_grace_s
    events_url = f"/v1/streams/{generation.id}/events"
    key_id = request.get(KEY_ID)
    if key_id is not None:  # auth on: EventSource cannot send the key, the URL carries a ticket
        ticket, _ = request.app[AUTH].mint("stream", key_id, generation.id)
        events_url += f"?ticket={ticket}"
    return web.json_response(
        {
            "id": generation.id,
            "object": "stream",
            "events_url": events_url,
            "expires_at": int(time.time() + grace),
        },
        status=201,
        headers={"X-Stream-ID": generation.id},
    )


def _path_stream_id(request: web.Request) -> str:
    stream_id = request.match_info["stream_id"]
    if not is_stream_id(stream_id):
        raise ClientError(f"id: {stream_id[:80]!r} is not a stream id", code=ErrorCode.NOT_FOUND,
                          param="id")
    return stream_id


@routes.get("/v1/streams/{stream_id}/events")
async def stream_events(request: web.Request) -> web.StreamResponse:
    stream_id = _path_stream_id(request)
    resume = _resume_point(request)
    if resume is not None and resume[0] != stream_id:
        raise ClientError(
            f"Last-Event-ID: belongs to stream {resume[0]}, not {stream_id}",
            param="Last-Event-ID",
        )
    ticket = request.get(TICKET)
    if ticket is not None:
        if ticket.scope != "stream":
            raise ClientError("ticket: it is for GET /v1/chat/stream, not for this stream",
                              code=ErrorCode.FORBIDDEN)
        await request.app[AUTH].admit(ticket, stream_id)
    else:
        await request.app[AUTH].check_owner(request, stream_id)
    return await serve_events(request, stream_id, resume[1] if resume else 0)


@routes.delete("/v1/streams/{stream_id}")
async def delete_stream(request: web.Request) -> web.Response:
    """Stop generation: the upstream is cancelled and readers get ``done`` (cancelled)."""
    stream_id = _path_stream_id(request)
    await request.app[AUTH].check_owner(request, stream_id)
    if await request.app[REGISTRY].cancel(stream_id):
        status = "cancelled"
    elif await request.app[JOURNAL].last_seq(stream_id) is not None:
        status = "ended"  # it had already finished; nothing to stop
    else:
        raise ClientError(f"no stream {stream_id!r}", code=ErrorCode.NOT_FOUND, param="id")
    return web.json_response({"id": stream_id, "object": "stream", "status": status},
                             headers={"X-Stream-ID": stream_id})


@routes.post("/v1/tickets")
async def create_ticket(request: web.Request) -> web.Response:
    """A ticket for the one-shot ``GET /v1/chat/stream`` (EventSource sends no headers).

    Body (optional): ``{"stream_id": "st_..."}`` for a fresh ticket to one of
    the key's own streams instead (``GET /v1/streams/{id}/events``).
    """
    body = await request.read()
    stream_id: str | None = None
    if body.strip():
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ClientError("body: not valid JSON", param="body") from exc
        if not isinstance(data, dict) or set(data) - {"stream_id"}:
            raise ClientError("body: expected {} or {\"stream_id\": \"st_...\"}", param="body")
        if "stream_id" in data:
            stream_id = data["stream_id"]
            if not isinstance(stream_id, str) or not is_stream_id(stream_id):
                raise ClientError("stream_id: not a stream id", param="stream_id")
            if await request.app[JOURNAL].last_seq(stream_id) is None:
                raise ClientError(f"no stream {stream_id!r}", code=ErrorCode.NOT_FOUND,
                                  param="stream_id")
            await request.app[AUTH].check_owner(request, stream_id)
    auth = request.app[AUTH]
    key_id = request.get(KEY_ID) or "anonymous"  # auth off: a ticket is not needed, but works
    scope = "chat" if stream_id is None else "stream"
    ticket, expires = auth.mint(scope, key_id, stream_id)
    url = (f"/v1/chat/stream?ticket={ticket}" if stream_id is None
           else f"/v1/streams/{stream_id}/events?ticket={ticket}")
    return web.json_response(
        {"object": "ticket", "ticket": ticket, "scope": scope, "stream_id": stream_id,
         "url": url, "expires_at": int(expires)},
        status=201,
    )
