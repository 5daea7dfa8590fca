"""``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI's wire format, exactly.

Streaming answers relay the upstream's chunk bytes unchanged where nothing
merged them. The response headers wait for the first content (at most
``heartbeat_s``), so an error before the stream (429, no upstream, exhausted
retries and fallbacks) gets an HTTP status, as OpenAI clients expect; after that,
an error is a ``data: {"error": ...}`` event and the body ends without
``[DONE]``. No ``id:`` or ``retry:`` frames: they break the OpenAI SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from aiohttp import web

from streamsvc.chunks import Chunk, coalesce_batch
from streamsvc.config import PipelineConfig
from streamsvc.errors import ErrorCode, StreamError, StreamsvcError, UpstreamError
from streamsvc.pipeline import StreamContext, build_pipeline
from streamsvc.reactive.bridge import ObservableIterator
from streamsvc.reactive.operators._retry import next_attempt
from streamsvc.server.auth import KEY_ID
from streamsvc.server.limits import LIMITER
from streamsvc.server.middleware import ensure_accepting, note_hangup
from streamsvc.server.requests import ChatRequest, parse_chat_body
from streamsvc.server.sse_response import ClientGone, SSEResponse
from streamsvc.server.state import ANSWERS, CONFIG, METRICS, REQUEST_ID, ROUTER
from streamsvc.streams import TokenClock, new_stream_id
from streamsvc.upstream.client import UpstreamClient
from streamsvc.usage import Usage, UsageMeter, answer_usage, estimate_prompt_tokens

__all__ = ["routes"]

log = logging.getLogger("streamsvc.http")
routes = web.RouteTableDef()

_DONE = b"data: [DONE]\n\n"
CUT_BY_DRAIN = web.RequestKey("cut_by_drain", bool)
_NULL_USAGE = b',"usage":null}'


def _frame(chunk: Chunk) -> bytes:
    return b"data: " + chunk.to_json() + b"\n\n"


def _client_frames(batch: list[Chunk], include_usage: bool) -> list[bytes]:
    """The frames this client gets: usage only if it asked, as OpenAI does.

    streamsvc always asks the upstream for usage; a client that did not ask
    gets neither the usage chunk nor the ``"usage": null`` field on the others.
    """
    if include_usage:
        return [_frame(chunk) for chunk in batch]
    frames = []
    for chunk in batch:
        if "usage" in chunk.data:
            if chunk.data["usage"] is not None and not chunk.choices:
                continue
            raw = chunk.raw
            if raw is not None and raw.endswith(_NULL_USAGE):
                # The upstream's bytes minus the field: no parse or encode per token.
                frames.append(b"data: " + raw[: -len(_NULL_USAGE)] + b"}\n\n")
                continue
            chunk = Chunk({k: v for k, v in chunk.data.items() if k != "usage"})
        frames.append(_frame(chunk))
    return frames


def _chunk_size(chunk: Chunk) -> int:
    raw = chunk.raw
    return len(raw) if raw is not None else 256


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Counted as an open stream (limits) from here until the answer ends or the client leaves."""
    slot = await request.app[LIMITER].acquire_stream(request.get(KEY_ID))
    answers = request.app[ANSWERS]
    finished = asyncio.get_running_loop().create_future()
    handler = asyncio.current_task()

    def cut() -> None:  # the drain ran out of time: end with shutting_down, not a bare cut
        request[CUT_BY_DRAIN] = True
        if handler is not None:
            handler.cancel()

    answers[finished] = cut  # a drain waits for this answer too
    try:
        return await _chat_completions(request)
    finally:
        answers.pop(finished, None)
        finished.set_result(None)
        slot.release()


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    chat = parse_chat_body(await request.read())
    ensure_accepting(request)
    clients = request.app[ROUTER].clients_for(chat.model)
    key_id = request.get(KEY_ID)
    prompt_tokens = estimate_prompt_tokens(chat.body.get("messages"))  # the text is not kept
    if not chat.stream:
        try:
            answer, upstream, attempts = await _complete(request, chat, clients)
        except asyncio.CancelledError:
            # The client left while the upstream worked (or the drain ran out of time):
            # it had the prompt, nothing came back.
            request.app[METRICS].usage(key_id, Usage(prompt_tokens, 0, estimated=True))
            _raise_if_cut_by_drain(request)
            raise
        request.app[METRICS].usage(key_id, answer_usage(answer, prompt_tokens))
        return web.json_response(
            answer, dumps=lambda o: msgspec.json.encode(o).decode(),
            headers={"X-Streamsvc-Upstream": upstream, "X-Streamsvc-Attempts": str(attempts)},
        )
    request.app[METRICS].streams_started.labels("openai").inc()

    context = StreamContext(key_id=key_id, prompt_tokens=prompt_tokens)
    metrics = request.app[METRICS]
    clock = TokenClock(metrics)  # from here: time to first token, then the gaps
    meter = UsageMeter()  # what was relayed, and the upstream's usage chunk

    def count_usage() -> None:
        # Once per stream, and only once an upstream answered 200 (a refusal bills nothing).
        if context.upstream is not None:
            metrics.usage(context.key_id, meter.result(context.prompt_tokens))
    source = build_pipeline(chat.body, clients, config.pipeline, context, retries=chat.retries)
    coalesce_chars = config.pipeline.coalesce_max_chars if config.pipeline.coalesce else None
    async with ObservableIterator(
        source, max_pending=config.server.max_pending_bytes, size=_chunk_size
    ) as batches:
        first: asyncio.Future[list[Chunk]] = asyncio.ensure_future(anext(batches))
        try:
            await _wait_for_answer(first, config.server.heartbeat_s)
        except BaseException as exc:
            first.cancel()
            count_usage()
            if isinstance(exc, asyncio.CancelledError):
                _raise_if_cut_by_drain(request)
            raise

        # Not resumable, but named like every stream, for logs and support.
        headers = {"X-Stream-ID": new_stream_id(), "X-Streamsvc-Attempts": str(context.attempts)}
        if context.upstream:
            headers["X-Streamsvc-Upstream"] = context.upstream
        response = SSEResponse(config.server, headers=headers)

        def write_now(chunk: Chunk) -> bool:
            frames = _client_frames([chunk], chat.include_usage)
            if not frames:
                meter.add(chunk)  # e.g. the usage chunk, for a client that did not ask for it
                return True
            if response.write_now(b"".join(frames)):
                meter.add(chunk)
                clock.tick()
                return True
            return False

        try:
            await response.start(request)
            try:
                batch: list[Chunk] | None = await first
            except StopAsyncIteration:
                batch = None
            # From here a chunk the socket can take goes out from the upstream's
            # own turn of the loop; this task only wakes for what had to wait.
            batches.direct = write_now
            while batch is not None:
                if coalesce_chars is not None:
                    batch = coalesce_batch(batch, coalesce_chars)
                for chunk in batch:
                    meter.add(chunk)
                frames = _client_frames(batch, chat.include_usage)
                if frames:
                    await response.send_bytes(b"".join(frames))
                    clock.tick()
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    batch = None
            await response.send_bytes(_DONE)
        except ClientGone:
            note_hangup(request)
            log.info("request %s: client left (499)", request[REQUEST_ID])
        except asyncio.CancelledError:
            if not _taken_drain_cut(request):
                raise
            await _send_error(request, response, _cut_error())  # then the body ends cleanly
        except StreamsvcError as error:
            log.info("request %s: stream ended with %s: %s", request[REQUEST_ID], error.code,
                     error.message)
            await _send_error(request, response, error)
        except Exception:  # a bug of ours: the client still gets a typed end, not a cut
            log.exception("request %s: stream failed", request[REQUEST_ID])
            await _send_error(request, response, StreamsvcError(
                "internal error while relaying the stream",
                code=ErrorCode.INTERNAL_ERROR, retryable=True,
            ))
        finally:
            if not first.done():
                first.cancel()
            if context.retried:
                metrics.retried(context.retried)
            count_usage()
            await response.close()
    return response


def _cut_error() -> StreamError:
    return StreamError("the server is shutting down; the answer was cut here",
                       code=ErrorCode.SHUTTING_DOWN, retryable=True)


def _taken_drain_cut(request: web.Request) -> bool:
    """Whether the cancel being handled is the drain's cut; if so it is taken back,
    because the handler answers it (a client hang-up stays a cancel)."""
    if not request.get(CUT_BY_DRAIN):
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _raise_if_cut_by_drain(request: web.Request) -> None:
    """Before the headers, a cut by the drain is answered ``503 shutting_down``."""
    if _taken_drain_cut(request):
        raise _cut_error()


async def _send_error(
    request: web.Request, response: SSEResponse, error: StreamsvcError
) -> None:
    """End a started OpenAI stream the way OpenAI does: an error object, no [DONE]."""
    request.app[METRICS].count_error(str(error.code))
    with contextlib.suppress(ClientGone):
        await response.send_bytes(b"data: " + msgspec.json.encode(error.to_openai()) + b"\n\n")


async def _wait_for_answer(first: asyncio.Future[list[Chunk]], limit_s: float) -> None:
    """Hold the response headers until the first content came (at most ``limit_s``).

    Until then the status is still open: an error (no upstream, 429 after the
    retries, a first-token timeout on the last upstream) raises here and is
    answered with its HTTP status, and the upstream that answers is known
    for ``X-Streamsvc-Upstream``. Past ``limit_s`` the headers go out anyway
    so that proxies and clients see a live response.
    """
    await asyncio.wait((first,), timeout=limit_s)
    if first.done() and not first.cancelled():
        error = first.exception()
        if error is not None and not isinstance(error, StopAsyncIteration):
            raise error


async def _complete(
    request: web.Request, chat: ChatRequest, clients: list[UpstreamClient]
) -> tuple[dict[str, Any], str, int]:
    """Non-streaming answer, with the same retry, fallback and total timeout as streams.

    Returns the answer, the name of the upstream that gave it and the number
    of attempts made.
    """
    policy = request.app[CONFIG].pipeline
    if policy.total_timeout_s <= 0:
        return await _complete_with_retries(chat, clients, policy)
    try:
        async with asyncio.timeout(policy.total_timeout_s):
            return await _complete_with_retries(chat, clients, policy)
    except TimeoutError as exc:
        raise UpstreamError(
            f"the answer did not come within {policy.total_timeout_s:g} s"
            " (pipeline.total_timeout_s)",
            code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True,
        ) from exc


async def _complete_with_retries(
    chat: ChatRequest, clients: list[UpstreamClient], policy: PipelineConfig
) -> tuple[dict[str, Any], str, int]:
    attempts = policy.retry_max_attempts if chat.retries else 1
    candidates = clients if chat.retries else clients[:1]
    index, attempt, made = 0, 1, 0
    while True:
        try:
            made += 1
            return await candidates[index].complete(chat.body), candidates[index].name, made
        except StreamsvcError as error:
            plan = next_attempt(error, index, attempt, len(candidates), attempts,
                                policy.retry_backoff_base_ms / 1000,
                                policy.retry_backoff_max_ms / 1000)
            if plan is None:
                raise
            index, attempt, delay = plan
            await asyncio.sleep(delay)
