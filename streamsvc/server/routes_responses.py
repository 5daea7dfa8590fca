"""The OpenAI Responses API over any chat-completions upstream, on the one stream lifecycle.

``POST /v1/responses`` translates the request (``server/responses_request.py``)
and runs it as a journaled stream whose entries are the Responses API's
events (``wire/responses.py``), numbered by ``sequence_number``. So every
response can be read again while the journal keeps it: ``GET
/v1/responses/{id}`` gives its state, ``?stream=true&starting_after=N``
replays the events after N and then the live tail, and
``previous_response_id`` continues a conversation from the journal. A
``background`` response runs to its end whoever reads it; any other ends when
its client leaves. ``POST /v1/responses/{id}/cancel`` stops the upstream.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import msgspec
from aiohttp import web

from streamsvc.errors import ClientError, ErrorCode, StreamsvcError
from streamsvc.journal.base import Journal
from streamsvc.server.json_response import json_response
from streamsvc.server.middleware import note_hangup
from streamsvc.server.responses_request import is_response_id, parse_responses_body
from streamsvc.server.sse_response import ClientGone, SSEResponse
from streamsvc.server.state import AUTH, CONFIG, JOURNAL, KEY_ID, REGISTRY, REQUEST_ID, STREAMS
from streamsvc.streams.readers import read_journal
from streamsvc.usage import UsageMeter, estimate_prompt_tokens
from streamsvc.wire.responses import FINAL_TYPES, ResponseEntries, ResponseEvents

__all__ = ["routes"]

log = logging.getLogger("streamsvc.http")
routes = web.RouteTableDef()

FORMAT = "responses"
"""The ``format`` in a response's journal meta: what tells a response from another stream."""


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(12)


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    parsed = parse_responses_body(await request.read())
    app = request.app
    key_id = request.get(KEY_ID)
    history = await _history(request, parsed.previous_response_id)
    chat = parsed.with_history(history)
    response_id = new_response_id()
    meter = UsageMeter()  # the generation counts, the response's usage reads it
    prompt_tokens = estimate_prompt_tokens(chat.body["messages"])  # once, for both
    events = ResponseEvents(
        {"id": response_id, "object": "response", "created_at": int(time.time()),
         "error": None, "incomplete_details": None, "usage": None, **parsed.echo},
        prompt_tokens=prompt_tokens, meter=meter,
    )
    entries = ResponseEntries(events)
    meta = {"format": FORMAT, "store": "1" if parsed.store else "0",
            "conversation": msgspec.json.encode(history + parsed.input_messages).decode()}
    if key_id is not None:
        meta["owner"] = key_id
    generation = await app[STREAMS].journaled(
        chat, key_id=key_id, meta=meta, stream_id=response_id, entries=entries,
        kind="responses", resumable=parsed.background, background=parsed.background,
        meter=meter, prompt_tokens=prompt_tokens,
    )
    log.info("request %s: response %s started (model %s%s)", request[REQUEST_ID], response_id,
             parsed.chat.model, ", background" if parsed.background else "")
    if not parsed.stream:
        if parsed.background:
            return json_response(events.snapshot("in_progress"))
        try:
            await generation.ended
        finally:
            app[STREAMS].done_reading(generation)
        if entries.failure is not None and not events.has_output:
            raise entries.failure  # nothing came: an HTTP status says it, as for chat
        return json_response(await _state(app[JOURNAL], response_id))
    return await _serve(request, response_id, 0, stop_when_gone=not parsed.background)


async def _serve(request: web.Request, response_id: str, after: int, *,
                 stop_when_gone: bool) -> web.StreamResponse:
    """Write a response's events from journal seq ``after`` on, until its final one."""
    app = request.app
    registry = app[REGISTRY]
    presence = None if stop_when_gone else await registry.attach(response_id)
    response = SSEResponse(app[CONFIG].server, headers={"X-Stream-ID": response_id})
    position = [after]
    try:
        await response.start(request)
        await read_journal(response, app[JOURNAL], response_id, after, position)
    except ClientGone:
        note_hangup(request)
        log.info("request %s: client left response %s at event %d (499)", request[REQUEST_ID],
                 response_id, position[0] - 1)
    except StreamsvcError as error:
        # The journal failed under a running response (Redis lost): an error event.
        log.warning("request %s: response %s: %s", request[REQUEST_ID], response_id,
                    error.message)
        data = {"type": "error", "code": str(error.code), "message": error.message,
                "param": None, "sequence_number": position[0]}
        try:
            await response.send(b"event: error\ndata: " + msgspec.json.encode(data) + b"\n\n")
        except ClientGone:
            pass
    finally:
        if stop_when_gone:
            generation = registry.get(response_id)
            if generation is not None:
                app[STREAMS].done_reading(generation)
        else:
            registry.detach(response_id, presence)
        await response.close()
    return response


async def _known(request: web.Request, response_id: str, param: str) -> dict[str, str]:
    """The journal meta of a retrievable response of this key; 404 (or 403) otherwise."""
    meta = None
    if is_response_id(response_id):
        meta = await request.app[JOURNAL].meta(response_id)
    if meta is None or meta.get("format") != FORMAT or meta.get("store") == "0":
        raise ClientError(
            f"{param}: no response {response_id[:80]!r} (unknown, created with store: false,"
            " or expired after journal.retention_s)", code=ErrorCode.NOT_FOUND, param=param)
    await request.app[AUTH].check_owner(request, response_id)
    return meta


async def _state(journal: Journal, response_id: str) -> dict[str, Any]:
    """The response object now: the final event's, or the latest with the items done so far."""
    events = await journal.read(response_id, 0)
    latest: dict[str, Any] = {}
    done: list[dict[str, Any]] = []
    for event in events:
        data = msgspec.json.decode(event.data)
        if event.kind in FINAL_TYPES:
            return dict(data["response"])
        if "response" in data:
            latest = dict(data["response"])
        elif event.kind == "response.output_item.done":
            done.append(data["item"])
    latest["output"] = done
    return latest


async def _history(request: web.Request, previous: str | None) -> list[dict[str, Any]]:
    """The chat messages of the conversation ``previous`` ended, its answer included."""
    if previous is None:
        return []
    meta = await _known(request, previous, "previous_response_id")
    state = await _state(request.app[JOURNAL], previous)
    if state.get("status") in ("in_progress", "queued"):
        raise ClientError(f"previous_response_id: response {previous} has not ended yet",
                          param="previous_response_id")
    messages: list[dict[str, Any]] = msgspec.json.decode(meta["conversation"])
    calls: list[dict[str, Any]] = []
    for item in state.get("output") or []:
        if item.get("type") == "message":
            text = "".join(part.get("text", "") for part in item.get("content") or [])
            messages.append({"role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"),
                                       "arguments": item.get("arguments", "")}})
    if calls:
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
    return messages


def _starting_after(request: web.Request) -> int | None:
    value = request.query.get("starting_after")
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ClientError(f"starting_after: expected a sequence number, got {value[:40]!r}",
                          param="starting_after")
    return int(value)


@routes.get("/v1/responses/{response_id}")
async def get_response(request: web.Request) -> web.StreamResponse:
    response_id = request.match_info["response_id"]
    await _known(request, response_id, "response_id")
    stream = request.query.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise ClientError(f"stream: expected true or false, got {stream[:20]!r}", param="stream")
    starting_after = _starting_after(request)
    if stream in ("false", "0"):
        return json_response(await _state(request.app[JOURNAL], response_id))
    state = await request.app[JOURNAL].last_seq(response_id)
    assert state is not None
    last, _ = state
    # Journal seq n holds sequence_number n - 1.
    after = 0 if starting_after is None else starting_after + 1
    if after > last:
        raise ClientError(f"starting_after: response {response_id} has events 0 to {last - 1}",
                          param="starting_after")
    return await _serve(request, response_id, after, stop_when_gone=False)


@routes.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: web.Request) -> web.Response:
    """Stop the upstream; the response ends ``cancelled`` (already ended: as it ended)."""
    response_id = request.match_info["response_id"]
    await _known(request, response_id, "response_id")
    journal = request.app[JOURNAL]
    if await request.app[REGISTRY].cancel(response_id):
        # Here the end is journaled at once; on another instance it follows shortly.
        state = await _state(journal, response_id)
        if state.get("status") == "in_progress":
            state["status"] = "cancelled"
        return json_response(state)
    return json_response(await _state(journal, response_id))
