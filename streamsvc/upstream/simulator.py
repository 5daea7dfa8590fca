"""The built-in upstream: a real OpenAI-compatible streaming server (aiohttp).

Used by the tests, by ``streamsvc bench`` and, in process, as the relay's
default upstream when no key is configured. Endpoints::

    GET  /v1/models             "echo", "sim-small", "sim-large" in OpenAI's list shape
    POST /v1/chat/completions   OpenAI chat completions, streamed or not
    GET  /_sim/stats            {"requests", "active", "completed", "disconnected"}
    GET  /_sim/requests         the last 50 chat requests: {"path", "headers", "body"}
    POST /_sim/reset            zero the counters, forget the requests and fail counters

Model ``echo`` streams the last user message back in tokens that carry
their leading white space (see :mod:`streamsvc.upstream.simtext`); every
other model streams deterministic prose. The stream is byte-for-byte
OpenAI's wire format: ``data: <chat.completion.chunk>`` events, a role
chunk first, one chunk per token, a finish chunk, an optional usage chunk,
then ``data: [DONE]``.

Everything else is chosen per request by an extra body field, so tests and
benchmarks drive the simulator from the client side::

    "simulate": {"rate": 20, "first_token_delay": 0.5, "tokens": 200,
                 "fault": "drop", "fault_at": 5, "retry_after": 1,
                 "fail_times": 2, "key": "retry-test-1"}

Where this departs from a plain reading of that contract, on purpose:

- ``malformed`` inserts the broken event before token ``fault_at`` and
  loses no token, so a relay that skips the bad event can still be checked
  for lossless text.
- ``fail_times`` limits every fault, not only ``429``/``500``: "drop twice,
  then succeed" is as useful to a retry test as "429 twice".
- ``drop`` counts as ``completed``: the simulator ended the stream as
  asked; ``disconnected`` counts only clients that left on their own.
- ``/_sim/reset`` leaves ``active`` alone: it is a gauge of the streams
  running now, and zeroing it would drive it negative when they end.

Cost: one coroutine per stream, no task or timer per token, one socket
write per step (all choices of a step together), JSON framing pre-encoded
once per stream so that a token costs one ``msgspec.json.encode`` of its
text and one bytes concatenation.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import TracebackType
from typing import Any, NoReturn, Self

import msgspec
from aiohttp import web

from streamsvc.errors import ClientError
from streamsvc.upstream.simtext import echo_tokens, generated_tokens, words_in

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_TOKENS",
    "ECHO_MODEL",
    "MODELS",
    "SIMULATOR_STATS_KEY",
    "ChunkEncoder",
    "Fault",
    "SimulateOptions",
    "SimulatorServer",
    "SimulatorStats",
    "create_simulator_app",
    "parse_chat_request",
    "serve_simulator",
]

DEFAULT_HOST = "127.0.0.1"
ECHO_MODEL = "echo"
MODELS = (ECHO_MODEL, "sim-small", "sim-large")
DEFAULT_TOKENS = 40
RECENT_REQUESTS = 50
MAX_N = 128
MAX_TOKENS = 1_000_000
# Echo requests may carry long texts; aiohttp's default limit is 1 MiB.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Hanging streams are cancelled by the app's on_shutdown hook; this only
# bounds a handler that ignores that.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
# With rate 0 a long stream would never give the loop back; yield this often.
_YIELD_EVERY = 64

_encode = msgspec.json.encode


class Fault(StrEnum):
    """The faults ``simulate.fault`` can ask for."""

    RATE_LIMITED = "429"  # status 429 + Retry-After before the first byte
    SERVER_ERROR = "500"  # status 500 before the first byte
    DROP = "drop"  # abort the connection after fault_at tokens
    HANG = "hang"  # stop sending after fault_at tokens, until the client leaves
    MALFORMED = "malformed"  # a broken JSON event before token fault_at
    ERROR_EVENT = "error_event"  # data: {"error": ...} after fault_at tokens, no [DONE]
    NO_DONE = "no_done"  # every token, then end without finish chunk or [DONE]
    OPEN_AFTER_DONE = "open_after_done"  # [DONE], then keep the body open


_FAULTS = frozenset(fault.value for fault in Fault)
_BEFORE_FIRST_BYTE = frozenset({Fault.RATE_LIMITED, Fault.SERVER_ERROR})
_AT_TOKEN = frozenset({Fault.DROP, Fault.HANG, Fault.MALFORMED, Fault.ERROR_EVENT})

_MALFORMED_EVENT = b'data: {"choices": [\n\n'
_ERROR_BODY = _encode(
    {
        "error": {
            "message": "simulated upstream error",
            "type": "server_error",
            "code": "simulated",
        }
    }
)
_ERROR_EVENT = b"data: " + _ERROR_BODY + b"\n\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_MODELS_BODY = _encode(
    {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "streamsvc-simulator"}
            for model in MODELS
        ],
    }
)


# ---------------------------------------------------------------------------
# stats


@dataclass
class SimulatorStats:
    """Live counters of one simulator app (also at ``GET /_sim/stats``)."""

    requests: int = 0  # chat completion requests received, valid or not
    active: int = 0  # answers in progress
    completed: int = 0  # answers the simulator ended (faults included)
    disconnected: int = 0  # answers whose client left before the end
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))

    def snapshot(self) -> dict[str, int]:
        """The counters as the JSON body of ``GET /_sim/stats``."""
        return {
            "requests": self.requests,
            "active": self.active,
            "completed": self.completed,
            "disconnected": self.disconnected,
        }

    def reset(self) -> None:
        """Zero the counters and forget the recent requests (``active`` stays: it is live)."""
        self.requests = self.completed = self.disconnected = 0
        self.recent.clear()


# ---------------------------------------------------------------------------
# request parsing (pure)


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulateOptions:
    """The ``simulate`` body field, validated; see the module docstring."""

    rate: float = 0.0
    first_token_delay: float = 0.0
    tokens: int = DEFAULT_TOKENS
    fault: Fault | None = None
    fault_at: int = 0
    retry_after: float = 1.0
    fail_times: int = 0
    key: str = ""

    @classmethod
    def from_json(cls, raw: object) -> SimulateOptions:
        """Validate the raw field; raises :class:`ClientError` naming the bad key."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise _bad("simulate must be an object", "simulate", raw)
        unknown = sorted(set(raw) - _SIMULATE_KEYS)
        if unknown:
            known = ", ".join(sorted(_SIMULATE_KEYS))
            raise ClientError(
                f"simulate.{unknown[0]} is not a simulator option (known: {known})",
                param=f"simulate.{unknown[0]}",
            )
        key = raw.get("key", "")
        if not isinstance(key, str):
            raise _bad("simulate.key must be a string", "simulate.key", key)
        return cls(
            rate=_number(raw, "rate", 0.0),
            first_token_delay=_number(raw, "first_token_delay", 0.0),
            tokens=_integer(raw, "tokens", DEFAULT_TOKENS, maximum=MAX_TOKENS),
            fault=_fault(raw.get("fault")),
            fault_at=_integer(raw, "fault_at", 0, maximum=MAX_TOKENS),
            retry_after=_number(raw, "retry_after", 1.0),
            fail_times=_integer(raw, "fail_times", 0, maximum=MAX_TOKENS),
            key=key,
        )


_SIMULATE_KEYS = frozenset(
    ("rate", "first_token_delay", "tokens", "fault", "fault_at", "retry_after", "fail_times", "key")
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatParams:
    """What the simulator needs from a chat completion request."""

    model: str
    prompt: str  # the text of the last user message
    prompt_tokens: int
    stream: bool = False
    n: int = 1
    max_tokens: int | None = None
    include_usage: bool = False
    simulate: SimulateOptions = SimulateOptions()


def parse_chat_request(body: object) -> ChatParams:
    """Validate a chat completion body lightly, the way OpenAI would reject it.

    Raises:
        ClientError: with ``param`` naming the field, e.g. ``simulate.rate``.

    Example:
        >>> body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        >>> parse_chat_request(body).prompt
        'hi'
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model", model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages", messages)
    texts: list[str] = []
    prompt = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(
                "each message must be an object with a string role", f"messages[{i}]", message
            )
        text = _content_text(message.get("content"), f"messages[{i}].content")
        texts.append(text)
        if message["role"] == "user":
            prompt = text
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", stream)
    n = _integer(body, "n", 1, minimum=1, maximum=MAX_N, prefix="")
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            max_tokens = _integer(body, name, 0, minimum=1, maximum=MAX_TOKENS, prefix="")
            break
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _bad("stream_options must be an object", "stream_options", stream_options)
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad(
                "stream_options.include_usage must be a boolean",
                "stream_options.include_usage",
                include_usage,
            )
    return ChatParams(
        model=model,
        prompt=prompt,
        prompt_tokens=sum(words_in(text) for text in texts),
        stream=stream,
        n=n,
        max_tokens=max_tokens,
        include_usage=include_usage,
        simulate=SimulateOptions.from_json(body.get("simulate")),
    )


def _content_text(content: object, param: str) -> str:
    # OpenAI allows a string, a list of parts, or null (assistant tool calls).
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    raise _bad("content must be a string, a list of parts or null", param, content)


def _bad(message: str, param: str | None, got: object) -> ClientError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ClientError(f"{message}, got {shown}", param=param)


def _number(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"simulate.{name} must be a number", f"simulate.{name}", value)
    if value < 0:
        raise _bad(f"simulate.{name} must be a number >= 0", f"simulate.{name}", value)
    return float(value)


def _integer(
    raw: dict[str, Any],
    name: str,
    default: int,
    *,
    minimum: int = 0,
    maximum: int,
    prefix: str = "simulate.",
) -> int:
    value = raw.get(name, default)
    if value is None and not prefix:
        value = default
    param = f"{prefix}{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{param} must be an integer", param, value)
    if not minimum <= value <= maximum:
        raise _bad(f"{param} must be an integer from {minimum} to {maximum}", param, value)
    return value


def _fault(value: object) -> Fault | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # "fault": 429 is read as "429"
    if isinstance(value, str) and value in _FAULTS:
        return Fault(value)
    known = ", ".join(f.value for f in Fault)
    raise _bad(f"simulate.fault must be one of {known}", "simulate.fault", value)


# ---------------------------------------------------------------------------
# wire encoding (pure)


class ChunkEncoder:
    """Encodes one completion's ``chat.completion.chunk`` events as SSE bytes.

    Everything but the token text is encoded once, in the constructor; a
    content chunk is then ``prefix[index] + json(token) + suffix``.

    Example:
        >>> enc = ChunkEncoder(completion_id="chatcmpl-sim-1", created=0, model="echo")
        >>> enc.content(0, " hi")[:6]
        b'data: '
    """

    def __init__(
        self, *, completion_id: str, created: int, model: str, include_usage: bool = False
    ) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                _encode(completion_id),
                b',"object":"chat.completion.chunk","created":',
                _encode(created),
                b',"model":',
                _encode(model),
                b',"system_fingerprint":"fp_sim","choices":[',
            )
        )
        # OpenAI sends "usage": null on every chunk once include_usage is asked.
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}' + self._tail
        self._content_prefixes: list[bytes] = []

    def _content_prefix(self, index: int) -> bytes:
        prefixes = self._content_prefixes
        while len(prefixes) <= index:
            prefixes.append(self._head + b'{"index":%d,"delta":{"content":' % len(prefixes))
        return prefixes[index]

    def role(self, index: int) -> bytes:
        """The first chunk of a choice: ``delta {"role": "assistant", "content": ""}``."""
        return b"".join(
            (
                self._head,
                b'{"index":%d,"delta":{"role":"assistant","content":""},' % index,
                b'"logprobs":null,"finish_reason":null}',
                self._tail,
            )
        )

    def content(self, index: int, token: str) -> bytes:
        """One token of one choice: ``delta {"content": token}``."""
        return self._content_prefix(index) + _encode(token) + self._content_suffix

    def finish(self, index: int, reason: str) -> bytes:
        """The last chunk of a choice: ``delta {}`` and its ``finish_reason``."""
        return b"".join(
            (
                self._head,
                b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":' % index,
                _encode(reason),
                b"}",
                self._tail,
            )
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The usage chunk: ``"choices": []`` and the token counts."""
        counts = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return self._head + b'],"usage":' + _encode(counts) + b"}\n\n"


@dataclass(frozen=True, slots=True)
class _Choice:
    tokens: list[str]
    finish_reason: str


def _choices(params: ChatParams) -> list[_Choice]:
    if params.model == ECHO_MODEL:
        texts = [echo_tokens(params.prompt)] * params.n
    else:
        count = params.simulate.tokens
        texts = [
            generated_tokens(params.model, params.prompt, count, choice=i) for i in range(params.n)
        ]
    limit = params.max_tokens
    return [
        _Choice(tokens[:limit], "length")
        if limit is not None and len(tokens) > limit
        else _Choice(tokens, "stop")
        for tokens in texts
    ]


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if seconds.is_integer() else str(seconds)


def _fault_response(fault: Fault, options: SimulateOptions) -> web.Response:
    if fault is Fault.RATE_LIMITED:
        error = {
            "message": "simulated rate limit, retry later",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        headers = {"Retry-After": _retry_after(options.retry_after)}
        return _json_response({"error": error}, status=429, headers=headers)
    error = {
        "message": "simulated server error",
        "type": "server_error",
        "param": None,
        "code": "simulated",
    }
    return _json_response({"error": error}, status=500)


def _json_response(
    body: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_encode(body), status=status, headers=headers, content_type="application/json"
    )


# ---------------------------------------------------------------------------
# app state


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


# ---------------------------------------------------------------------------
# handlers


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=_MODELS_BODY, content_type="application/json")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    state.stats.requests += 1
    raw = await request.read()
    body: Any = None
    try:
        body = msgspec.json.decode(raw)
        params = parse_chat_request(body)
    except msgspec.DecodeError as exc:
        error = ClientError(f"the request body must be JSON: {exc}")
        return _json_response(error.to_openai(), status=400)
    except ClientError as exc:
        return _json_response(exc.to_openai(), status=400)
    finally:
        # Recorded whether valid or not: tests look at what the relay sent.
        state.stats.recent.append(
            {"path": request.path, "headers": dict(request.headers), "body": body}
        )
    fault = state.fault_for(params.simulate)
    if fault in _BEFORE_FIRST_BYTE:
        assert fault is not None
        return _fault_response(fault, params.simulate)
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
    # Headers go out now, before any delay, as real upstreams do.
    await resp.prepare(request)
    encoder = ChunkEncoder(
        completion_id=completion_id,
        created=int(time.time()),
        model=params.model,
        include_usage=params.include_usage,
    )
    choices = _choices(params)
    steps = max(len(choice.tokens) for choice in choices)
    fault_at = min(options.fault_at, steps) if fault in _AT_TOKEN else -1
    delay = 1.0 / options.rate if options.rate > 0 else 0.0

    async def inject() -> bool:
        """Play the fault at its token; False when the stream ends here."""
        if fault is Fault.DROP:
            _abort(request)
            return False
        if fault is Fault.HANG:
            await _wait_forever()
        if fault is Fault.MALFORMED:
            await resp.write(_MALFORMED_EVENT)
            return True
        await resp.write(_ERROR_EVENT)  # Fault.ERROR_EVENT
        await resp.write_eof()
        return False

    if options.first_token_delay > 0:
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
            await resp.write(encoder.content(0, single[step]))
        else:
            await resp.write(
                b"".join(
                    encoder.content(i, choice.tokens[step])
                    for i, choice in enumerate(choices)
                    if step < len(choice.tokens)
                )
            )
    if fault_at == steps and not await inject():
        return
    if fault is Fault.NO_DONE:
        await resp.write_eof()
        return
    end = [encoder.finish(i, choice.finish_reason) for i, choice in enumerate(choices)]
    if params.include_usage:
        end.append(encoder.usage(params.prompt_tokens, sum(len(c.tokens) for c in choices)))
    end.append(_DONE_EVENT)
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
        return web.Response(body=b'{"choices": [', content_type="application/json")
    if fault is Fault.ERROR_EVENT:
        return web.Response(body=_ERROR_BODY, content_type="application/json")
    completion_tokens = sum(len(choice.tokens) for choice in choices)
    return _json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": params.model,
            "system_fingerprint": "fp_sim",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(choice.tokens)},
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                for i, choice in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": params.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": params.prompt_tokens + completion_tokens,
            },
        }
    )


async def _stats(request: web.Request) -> web.Response:
    return _json_response(request.app[SIMULATOR_STATS_KEY].snapshot())


async def _recent_requests(request: web.Request) -> web.Response:
    return _json_response(list(request.app[SIMULATOR_STATS_KEY].recent))


async def _reset(request: web.Request) -> web.Response:
    state = request.app[_STATE_KEY]
    state.stats.reset()
    state.fail_counts.clear()
    return _json_response(state.stats.snapshot())


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
    client hang-up cancels its stream at once; :class:`SimulatorServer`
    does that for you.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    stats = SimulatorStats()
    app[SIMULATOR_STATS_KEY] = stats
    app[_STATE_KEY] = _SimState(stats)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/requests", _recent_requests)
    app.router.add_post("/_sim/reset", _reset)
    app.on_shutdown.append(_on_shutdown)
    return app


# ---------------------------------------------------------------------------
# running it


class _Lifecycle(Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class SimulatorServer:
    """The simulator on a real socket, as an async context manager.

    Args:
        host: the address to bind.
        port: the port; 0 picks a free one (read it back from ``port``).
        shutdown_timeout: how long closing waits for answers still running.

    Example::

        async with SimulatorServer() as sim:
            client = AsyncOpenAI(base_url=sim.url, api_key="x")
            ...
            assert sim.stats.completed == 1
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.host = host
        self.app = create_simulator_app()
        self._requested_port = port
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._lifecycle = _Lifecycle.NEW

    @property
    def stats(self) -> SimulatorStats:
        """The live counters (the same object ``GET /_sim/stats`` reads)."""
        return self.app[SIMULATOR_STATS_KEY]

    @property
    def port(self) -> int:
        """The bound port; only while running."""
        if self._lifecycle is not _Lifecycle.RUNNING or self._port is None:
            raise RuntimeError(
                f"SimulatorServer is {self._lifecycle.value}, not running: "
                "use 'async with SimulatorServer() as sim'"
            )
        return self._port

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Bind and start serving; a server starts once."""
        if self._lifecycle is not _Lifecycle.NEW:
            raise RuntimeError(f"SimulatorServer is {self._lifecycle.value}; it starts only once")
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            # A deep accept queue, as `streamsvc serve` has: a benchmark opens
            # hundreds of streams at once (aiohttp's default is 128).
            site = web.TCPSite(runner, self.host, self._requested_port, backlog=1024)
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._lifecycle = _Lifecycle.RUNNING

    async def close(self) -> None:
        """Stop serving and end the streams still open; closing twice is a no-op."""
        runner, self._runner = self._runner, None
        self._lifecycle = _Lifecycle.CLOSED
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def serve_simulator(host: str, port: int) -> None:
    """Serve the simulator until cancelled (``streamsvc simulate``).

    Prints one line, ``streamsvc simulator listening on http://HOST:PORT/v1``.
    """
    async with SimulatorServer(host, port) as sim:
        print(f"streamsvc simulator listening on {sim.url}", flush=True)
        await asyncio.Event().wait()
