"""The streamsvc event format: ``/v1/chat/stream`` (POST and one-shot GET) and ``/v1/streams``.

A resumable stream (``POST /v1/streams``, the one-shot GET) is written to the
journal, and every reader reads the journal from its ``Last-Event-ID`` on. So
a reconnect never calls the upstream again, and a reconnect after the final
event gets ``204``, the one answer that stops EventSource for good. ``POST
/v1/chat/stream`` is read by its one client as it comes (no journal): a slow
client holds its upstream back instead of filling memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
from aiohttp import web

from streamsvc.chat_request import ChatRequest
from streamsvc.errors import ClientError, ErrorCode, StreamsvcError
from streamsvc.server.auth import Ticket
from streamsvc.server.json_response import json_response
from streamsvc.server.middleware import note_hangup
from streamsvc.server.requests import (
    is_stream_id,
    parse_chat_body,
    parse_chat_query,
    parse_last_event_id,
)
from streamsvc.server.sse_response import ClientGone, SSEResponse
from streamsvc.server.state import (
    AUTH,
    CONFIG,
    DRAIN_LEAVERS,
    DRAINING,
    JOURNAL,
    JOURNAL_SHARED,
    KEY_ID,
    REGISTRY,
    REQUEST_ID,
    STREAMS,
    TICKET,
)
from streamsvc.sse import encode_event, retry_field
from streamsvc.streams.generation import Generation
from streamsvc.streams.readers import read_backlog, read_journal
from streamsvc.validation import decode_json
from streamsvc.wire.events import EventsEncoder

__all__ = ["routes"]

log = logging.getLogger("streamsvc.http")
routes = web.RouteTableDef()


async def _start_resumable(request: web.Request, chat: ChatRequest,
                           ticket: Ticket | None = None) -> Generation:
    key_id = request.get(KEY_ID)
    generation = await request.app[STREAMS].journaled(
        chat, key_id=key_id, meta=None if key_id is None else {"owner": key_id})
    await request.app[AUTH].bind_started(generation.id, generation.ended, ticket)
    log.info("request %s: stream %s started (model %s, resumable)", request[REQUEST_ID],
             generation.id, chat.model)
    return generation


def _resume_source(request: web.Request) -> tuple[str, str] | None:
    """(name, value) of the Last-Event-ID header, else of the lastEventId / Last-Event-ID
    query parameter."""
    header = request.headers.get("Last-Event-ID")
    if header:
        return "Last-Event-ID", header
    for name in ("lastEventId", "Last-Event-ID"):
        value = request.query.get(name)
        if value:
            return name, value
    return None


def _resume_point(request: web.Request) -> tuple[str, int] | None:
    source = _resume_source(request)
    return None if source is None else parse_last_event_id(source[1], source[0])


def _unknown(stream_id: str, param: str) -> ClientError:
    return ClientError(
        f"{param}: no stream {stream_id!r} (unknown, or expired after its retention time)",
        code=ErrorCode.NOT_FOUND, param=param,
    )


def _all_read(stream_id: str, after: int, state: tuple[int, bool]) -> bool:
    """Whether a reader that has seen event ``after`` has seen the whole ended stream.

    A resume point beyond the last event is a 400.
    """
    last, ended = state
    if after > last:
        raise ClientError(
            f"Last-Event-ID: names event {after}, but stream {stream_id} has {last} events",
            param="Last-Event-ID",
        )
    return ended and after >= last


def _ended(stream_id: str) -> web.Response:
    """``204``: the stream has ended and the client has it all; EventSource stops for good."""
    return web.Response(status=204, headers={"X-Stream-ID": stream_id})


async def serve_events(request: web.Request, stream_id: str, after: int) -> web.StreamResponse:
    """Replay a stream's events after ``after``, then tail it live until its final event."""
    app = request.app
    journal = app[JOURNAL]
    state = await journal.last_seq(stream_id)
    if state is None:
        raise _unknown(stream_id, "id")
    if _all_read(stream_id, after, state):
        return _ended(stream_id)

    server = app[CONFIG].server
    registry = app[REGISTRY]
    presence = await registry.attach(stream_id)
    response = SSEResponse(server, headers={"X-Stream-ID": stream_id})
    position = [after]
    leave = _leave_at_drain(request)
    try:
        await response.start(request)
        await read_journal(response, journal, stream_id, after, position,
                           first=retry_field(server.sse_retry_ms))
    except ClientGone:
        note_hangup(request)
        log.info("request %s: client left stream %s at event %d (499)", request[REQUEST_ID],
                 stream_id, position[0])
    except StreamsvcError as error:
        # The journal failed under a running stream (Redis lost): the client gets
        # the error event, without an id, so a resume starts after the last real one.
        log.warning("request %s: stream %s: %s", request[REQUEST_ID], stream_id, error.message)
        with contextlib.suppress(ClientGone):
            await response.send(encode_event(
                msgspec.json.encode(error.to_event()).decode(), event="error"))
    finally:
        if leave is not None:
            app[DRAIN_LEAVERS].discard(leave)
        registry.detach(stream_id, presence)
        await response.close()
    return response


def _leave_at_drain(request: web.Request) -> Callable[[], None] | None:
    """With a shared journal, a resumable stream's reader is let go when this instance drains.

    Its connection is closed; EventSource reconnects with Last-Event-ID,
    through the load balancer, to an instance that is not shutting down, and
    resumes from the journal while the generation here finishes into it.
    A reader that comes while the drain is under way (on a connection the
    proxy had open) is let go at once. Returns the callback registered for the
    drain (None: the reader stays).
    """
    app = request.app
    if not app[JOURNAL_SHARED]:
        return None
    transport = request.transport

    def leave() -> None:
        if transport is not None:
            transport.close()

    if app[DRAINING].is_set():
        leave()
    else:
        app[DRAIN_LEAVERS].add(leave)
    return leave


async def _reconnect(request: web.Request, *, events: bool) -> web.StreamResponse | None:
    """A POST that carries a ``Last-Event-ID`` (header or query) reconnects; None: it does not.

    Clients that re-send their POST to reconnect (fetch-event-source by
    default, aiohttp-sse-client after every end) would otherwise start, and
    bill, a new generation each time. Such a POST never starts one; its body
    is not looked at:

    - a journaled stream: ``204`` once the id is its final event; before that,
      its events from there (``events``: ``POST /v1/chat/stream``, as ``GET
      /v1/streams/{id}/events``) or its ``events_url`` (``POST /v1/streams``, ``200``);
    - a direct stream that ended here: ``204`` (it had one reader and no
      journal: nothing is left to replay); one still running: ``409`` (its
      one client is reading it);
    - an unknown id (expired; or another instance's direct stream): ``404``.
    """
    source = _resume_source(request)
    if source is None:
        return None
    param = source[0]
    parsed = parse_last_event_id(source[1], param)
    if parsed is None:
        return None
    stream_id, after = parsed
    await request.app[AUTH].check_owner(request, stream_id)
    state = await request.app[JOURNAL].last_seq(stream_id)
    if state is not None:
        if events:
            return await serve_events(request, stream_id, after)
        return _ended(stream_id) if _all_read(stream_id, after, state) else _created(
            request, stream_id, status=200)
    direct = request.app[REGISTRY].direct(stream_id)
    if direct is None:
        raise _unknown(stream_id, param)
    running, owner = direct
    key_id = request.get(KEY_ID)
    if key_id is not None and owner is not None and owner != key_id:
        raise ClientError(f"stream {stream_id} belongs to another API key",
                          code=ErrorCode.FORBIDDEN)
    if running:
        raise ClientError(
            f"{param}: stream {stream_id} is being read by the one client that started it;"
            " a stream of POST /v1/chat/stream cannot be resumed (POST /v1/streams makes one"
            " that can)",
            param=param, status=409,
        )
    return _ended(stream_id)


@routes.post("/v1/chat/stream")
async def post_chat_stream(request: web.Request) -> web.StreamResponse:
    """Same body as chat completions, answered in the streamsvc event format."""
    reconnected = await _reconnect(request, events=True)
    if reconnected is not None:
        return reconnected
    chat = parse_chat_body(await request.read(), stream_default=True)
    server = request.app[CONFIG].server
    streams = request.app[STREAMS]
    generation, backlog = await streams.direct(
        chat, lambda stream_id: EventsEncoder(stream_id, server.sse_retry_ms),
        key_id=request.get(KEY_ID), kind="direct")
    log.info("request %s: stream %s started (model %s, direct)", request[REQUEST_ID],
             generation.id, chat.model)
    response = SSEResponse(server, headers={"X-Stream-ID": generation.id})
    try:
        await response.start(request)
        await read_backlog(response, backlog)
    except ClientGone:
        note_hangup(request)
        log.info("request %s: client left stream %s (499)", request[REQUEST_ID], generation.id)
    finally:
        streams.done_reading(generation)
        await response.close()
    return response


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
        generation = await _start_resumable(request, chat, ticket)
    except BaseException:
        if ticket is not None:
            await auth.release_unstarted(ticket)
        raise
    return await serve_events(request, generation.id, 0)


@routes.post("/v1/streams")
async def create_stream(request: web.Request) -> web.StreamResponse:
    """Create a resumable stream; the upstream starts now, EventSource reads events_url."""
    reconnected = await _reconnect(request, events=False)
    if reconnected is not None:
        return reconnected
    chat = parse_chat_body(await request.read(), stream_default=True)
    generation = await _start_resumable(request, chat)
    return _created(request, generation.id, status=201)


def _created(request: web.Request, stream_id: str, *, status: int) -> web.Response:
    """The answer naming a resumable stream: its id, ``events_url`` and ``expires_at``."""
    grace = request.app[CONFIG].journal.resume_grace_s
    events_url = f"/v1/streams/{stream_id}/events"
    key_id = request.get(KEY_ID)
    if key_id is not None:  # auth on: EventSource cannot send the key, the URL carries a ticket
        ticket, _ = request.app[AUTH].mint("stream", key_id, stream_id)
        events_url += f"?ticket={ticket}"
    return json_response(
        {
            "id": stream_id,
            "object": "stream",
            "events_url": events_url,
            "expires_at": int(time.time() + grace),
        },
        status=status,
        headers={"X-Stream-ID": stream_id},
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
    return json_response({"id": stream_id, "object": "stream", "status": status},
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
        data = decode_json(body, "body")
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
    return json_response(
        {"object": "ticket", "ticket": ticket, "scope": scope, "stream_id": stream_id,
         "url": url, "expires_at": int(expires)},
        status=201,
    )
