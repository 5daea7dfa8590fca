"""The simulator's aiohttp app: the handlers, and the coroutine that plays one answer.

Cost: one coroutine per stream, no task or timer per token, one socket
write per step (all choices of a step together), JSON framing pre-encoded
once per stream (:class:`~streamsvc.simulator.encoding.ChunkEncoder`) so
that a token costs one ``msgspec.json.encode`` of its text and one bytes
concatenation.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn

from aiohttp import web

from streamsvc.errors import ClientError
from streamsvc.server.json_response import json_response
from streamsvc.simulator.encoding import DONE_EVENT, MODELS_BODY, ChunkEncoder, completion_body
from streamsvc.simulator.faults import (
    AT_TOKEN,
    BEFORE_FIRST_BYTE,
    ERROR_BODY,
    ERROR_EVENT,
    MALFORMED_BODY,
    MALFORMED_EVENT,
    SSE_ERROR_EVENT,
    Fault,
    fault_reply,
    json_string,
    split_astral,
)
from streamsvc.simulator.request import ChatParams, SimulateOptions, parse_chat_request
from streamsvc.simulator.stats import SimulatorStats
from streamsvc.simulator.text import Choice, answer_choices
from streamsvc.validation import decode_json

__all__ = ["MAX_BODY_BYTES", "SIMULATOR_STATS_KEY", "create_simulator_app"]

# Echo requests may carry long texts; aiohttp's default limit is 1 MiB.
MAX_BODY_BYTES = 16 * 1024 * 1024
# With rate 0 a long stream would never give the loop back; yield this often.
_YIELD_EVERY = 64


class _SimState:
    """Per-app state: stats, fail counters, live answers (for shutdown)."""

    def __init__(self, stats: SimulatorStats) -> None:
        self.stats = stats
        self.fail_counts: dict[str, int] = {}
        self.live: set[asyncio.Task[Any]] = set()
        self.closing = False
        self._ids: Iterator[int] = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def fault_for(self, options: SimulateOptions) -> Fault | None:
        """The fault to inject into this request, after ``fail_times``."""
        if options.fault is None or options.fail_times == 0:
            return options.fault
        seen = self.fail_counts.get(options.key, 0)
        if seen >= options.fail_times:
            return None
        self.fail_counts[options.key] = seen + 1
        return options.fault


SIMULATOR_STATS_KEY = web.AppKey("streamsvc_simulator_stats", SimulatorStats)
_STATE_KEY = web.AppKey("streamsvc_simulator_state", _SimState)


class _Tracked:
    """Counts one answer in ``active``, then in ``completed`` or ``disconnected``."""

    def __init__(self, state: _SimState) -> None:
        self._state = state
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> None:
        self._state.stats.active += 1
        self._task = asyncio.current_task()
        if self._task is not None:
            self._state.live.add(self._task)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        state.stats.active -= 1
        if self._task is not None:
            state.live.discard(self._task)
        if exc_type is None:
            state.stats.completed += 1
        elif (
            issubclass(exc_type, asyncio.CancelledError | ConnectionResetError)
            and not state.closing
        ):
            # handler_cancellation turns a hang-up into CancelledError at the
            # next await; a write that comes first raises ConnectionResetError.
            # Cancellations by our own on_shutdown hook are not hang-ups.
            state.stats.disconnected += 1


async def _wait_forever() -> NoReturn:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: nothing resolves this future")


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        # abort(), not close(): the chunked body must stay unfinished.
        transport.abort()


def _choices(params: ChatParams) -> list[Choice]:
    return answer_choices(
        params.model,
        params.prompt,
        n=params.n,
        tokens=params.simulate.tokens,
        max_tokens=params.max_tokens,
        continues=params.continues,
    )


# ---------------------------------------------------------------------------
# handlers


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=MODELS_BODY, content_type="application/json")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    state.stats.requests += 1
    raw = await request.read()
    body: Any = None
    try:
        body = decode_json(raw, "body")
        params = parse_chat_request(body)
    except ClientError as exc:
        return json_response(exc.to_openai(), status=400)
    finally:
        # Recorded whether valid or not: tests look at what the relay sent.
        state.stats.recent.append(
            {"path": request.path, "headers": dict(request.headers), "body": body}
        )
    if params.simulate.key:
        state.stats.key_request(params.simulate.key)
    fault = state.fault_for(params.simulate)
    if fault in BEFORE_FIRST_BYTE:
        assert fault is not None
        reply = fault_reply(fault, retry_after=params.simulate.retry_after)
        return json_response(reply.body, status=reply.status, headers=reply.headers)
    if params.stream:
        return await _stream(request, state, params, fault)
    return await _complete(request, state, params, fault)


async def _stream(
    request: web.Request, state: _SimState, params: ChatParams, fault: Fault | None
) -> web.StreamResponse:
    completion_id = state.next_id()
    resp = web.StreamResponse(
        status=200,
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Request-Id": f"req-sim-{completion_id}",
        },
    )
    # No enable_chunked_encoding(): aiohttp picks chunked for HTTP/1.1 and a
    # close-delimited body for HTTP/1.0 clients (nginx's proxy default).
    resp.content_type = "text/event-stream"
    try:
        with _Tracked(state):
            await _stream_body(request, resp, params, fault, f"chatcmpl-sim-{completion_id}")
    except ConnectionResetError:
        pass  # the client left; _Tracked counted it
    return resp


async def _stream_body(
    request: web.Request,
    resp: web.StreamResponse,
    params: ChatParams,
    fault: Fault | None,
    completion_id: str,
) -> None:
    options = params.simulate
    if fault is Fault.SLOW_HEADERS:
        await asyncio.sleep(options.first_token_delay)  # nothing at all until then
    # Headers go out now, before any delay, as real upstreams do.
    await resp.prepare(request)
    encoder = ChunkEncoder(
        completion_id=completion_id,
        created=int(time.time()),
        model=params.model,
        include_usage=params.include_usage,
    )
    choices = _choices(params)
    token_count = sum(len(choice.tokens) for choice in choices)
    content = encoder.content
    if fault is Fault.SPLIT_SURROGATES:
        choices = [Choice(split_astral(c.tokens), c.finish_reason) for c in choices]

        def content(index: int, token: str) -> bytes:
            return encoder.content_json(index, json_string(token))

    steps = max(len(choice.tokens) for choice in choices)
    fault_at = min(options.fault_at, steps) if fault in AT_TOKEN else -1
    delay = 1.0 / options.rate if options.rate > 0 else 0.0

    async def inject() -> bool:
        """Play the fault at its token; False when the stream ends here."""
        if fault is Fault.DROP:
            _abort(request)
            return False
        if fault is Fault.HANG:
            await _wait_forever()
        if fault is Fault.MALFORMED:
            await resp.write(MALFORMED_EVENT)
            return True
        await resp.write(SSE_ERROR_EVENT if fault is Fault.SSE_ERROR else ERROR_EVENT)
        await resp.write_eof()
        return False

    if options.first_token_delay > 0 and fault is not Fault.SLOW_HEADERS:
        await asyncio.sleep(options.first_token_delay)
    await resp.write(b"".join(encoder.role(i) for i in range(len(choices))))
    single = choices[0].tokens if len(choices) == 1 else None
    for step in range(steps):
        if step:
            if delay:
                await asyncio.sleep(delay)
            elif step % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if step == fault_at and not await inject():
            return
        if single is not None:
            await resp.write(content(0, single[step]))
        else:
            await resp.write(
                b"".join(
                    content(i, choice.tokens[step])
                    for i, choice in enumerate(choices)
                    if step < len(choice.tokens)
                )
            )
        if step == 0 and options.key and not (fault is Fault.MALFORMED and fault_at == 0):
            # The first content went out (not behind a broken event, which ends the read).
            request.app[SIMULATOR_STATS_KEY].key_content(options.key)
    if fault_at == steps and not await inject():
        return
    if fault is Fault.NO_DONE:
        await resp.write_eof()
        return
    end = [] if fault is Fault.NO_FINISH else [
        encoder.finish(i, choice.finish_reason) for i, choice in enumerate(choices)]
    if params.include_usage:
        end.append(encoder.usage(params.prompt_tokens, token_count))
    end.append(DONE_EVENT)
    await resp.write(b"".join(end))
    if fault is Fault.OPEN_AFTER_DONE:
        await _wait_forever()
    await resp.write_eof()


async def _complete(
    request: web.Request, state: _SimState, params: ChatParams, fault: Fault | None
) -> web.StreamResponse:
    completion_id = state.next_id()
    resp: web.StreamResponse = web.Response()
    try:
        with _Tracked(state):
            resp = await _complete_body(request, params, fault, f"chatcmpl-sim-{completion_id}")
    except ConnectionResetError:
        pass  # the client left; _Tracked counted it
    return resp


async def _complete_body(
    request: web.Request, params: ChatParams, fault: Fault | None, completion_id: str
) -> web.StreamResponse:
    options = params.simulate
    choices = _choices(params)
    steps = max(len(choice.tokens) for choice in choices)
    # One sleep for the time the stream would have taken.
    wait = options.first_token_delay
    if options.rate > 0 and steps > 1:
        wait += (steps - 1) / options.rate
    if wait > 0:
        await asyncio.sleep(wait)
    if fault is Fault.DROP:
        _abort(request)
        return web.Response()
    if fault is Fault.HANG:
        await _wait_forever()
    if fault is Fault.MALFORMED:
        return web.Response(body=MALFORMED_BODY, content_type="application/json")
    if fault in (Fault.ERROR_EVENT, Fault.SSE_ERROR):
        return web.Response(body=ERROR_BODY, content_type="application/json")
    body = completion_body(
        completion_id=completion_id,
        created=int(time.time()),
        model=params.model,
        choices=choices,
        prompt_tokens=params.prompt_tokens,
    )
    return web.Response(body=body, content_type="application/json")


async def _stats(request: web.Request) -> web.Response:
    return json_response(request.app[SIMULATOR_STATS_KEY].snapshot())


async def _recent_requests(request: web.Request) -> web.Response:
    return json_response(list(request.app[SIMULATOR_STATS_KEY].recent))


async def _keys(request: web.Request) -> web.Response:
    keys = request.app[SIMULATOR_STATS_KEY].keys
    wanted = request.query.get("key")
    if wanted is not None:
        return json_response({wanted: keys.get(wanted, {"requests": 0, "after_content": 0,
                                                        "content": 0})})
    return json_response(keys)


async def _reset(request: web.Request) -> web.Response:
    state = request.app[_STATE_KEY]
    state.stats.reset()
    state.fail_counts.clear()
    return json_response(state.stats.snapshot())


async def _on_shutdown(app: web.Application) -> None:
    # Hanging and open streams would otherwise hold the server's shutdown
    # for its whole timeout.
    state = app[_STATE_KEY]
    state.closing = True
    for task in list(state.live):
        task.cancel()


def create_simulator_app() -> web.Application:
    """A fresh simulator app with its own stats (``app[SIMULATOR_STATS_KEY]``).

    Run it on an ``AppRunner(app, handler_cancellation=True)`` so that a
    client hang-up cancels its stream at once;
    :class:`~streamsvc.simulator.server.SimulatorServer` does that for you.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    stats = SimulatorStats()
    app[SIMULATOR_STATS_KEY] = stats
    app[_STATE_KEY] = _SimState(stats)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/requests", _recent_requests)
    app.router.add_get("/_sim/keys", _keys)
    app.router.add_post("/_sim/reset", _reset)
    app.on_shutdown.append(_on_shutdown)
    return app
