"""Config -> the operator chain between the upstream request and the journal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reactivex import Observable

from streamsvc.chunks import Chunk
from streamsvc.config import PipelineConfig
from streamsvc.reactive.backpressure import Valve
from streamsvc.reactive.operators import (
    coalesce,
    first_token_timeout,
    idle_timeout,
    pace,
    throttle,
    total_timeout,
)
from streamsvc.reactive.operators._attempts import attempts_
from streamsvc.reactive.operators._continue import continue_on_failure_
from streamsvc.upstream.client import UpstreamClient

__all__ = ["StreamContext", "build_pipeline"]


@dataclass(slots=True)
class StreamContext:
    """What one stream's pipeline did: which upstream answered, after how many attempts.

    It also carries who the stream is for, for the usage metrics: never the
    prompt, only its estimated size.
    """

    upstream: str | None = None
    attempts: int = 0
    retried: list[str] = field(default_factory=list)
    """The code of each error that was retried or fell back, in order."""
    key_id: str | None = None
    """The id (an HMAC) of the API key that started the stream; None with auth off."""
    prompt_tokens: int = 0
    """The prompt's estimated tokens (``streamsvc.usage``), for when the upstream sends no usage."""
    valve: Valve | None = None
    """Closed by a sink whose backlog is full: the upstream is then not read (backpressure)."""

    # Methods, not closures built per stream: the pipeline keeps these for the stream's
    # life, and a closure is three objects more for each garbage collection to walk.
    def attempt_started(self) -> None:
        self.attempts += 1

    def note_failure(self, error: Exception) -> None:
        """An attempt failed and another (a retry, a fallback, a continuation) follows."""
        self.retried.append(str(getattr(error, "code", "internal_error")))

    def note_retry(self, _source: int, _attempt: int, error: Exception,
                   _delay: float) -> None:
        self.note_failure(error)


class _Opened:
    """``on_open`` of one upstream's requests: the context names the upstream that answered."""

    __slots__ = ("context", "name")

    def __init__(self, context: StreamContext, name: str) -> None:
        self.context = context
        self.name = name

    def __call__(self) -> None:
        self.context.upstream = self.name


def upstream_source(
    client: UpstreamClient, body: dict[str, Any], context: StreamContext
) -> Observable[Chunk]:
    """One cold Observable per upstream: each subscription is one HTTP request."""
    return client.chunks(body, on_start=context.attempt_started,
                         on_open=_Opened(context, client.name), valve=context.valve)


def build_pipeline(
    body: dict[str, Any],
    clients: Sequence[UpstreamClient],
    config: PipelineConfig,
    context: StreamContext,
    *,
    retries: bool = True,
    continuation: bool = False,
) -> Observable[Chunk]:
    """The chunks of one chat request, through the operators ``[pipeline]`` turns on.

    Per upstream attempt: ``first_token_timeout`` and ``idle_timeout``; across
    attempts: ``retry_with_backoff`` with the route's fallbacks (the three as one
    fused operator); then continuation (when on), ``total_timeout`` over the
    whole answer, ``coalesce``, ``throttle`` and ``pace``. A setting of 0
    leaves its operator out.

    Args:
        body: the chat request as the upstream gets it.
        clients: the route's upstreams, primary first.
        config: ``[pipeline]``.
        context: filled in as the pipeline runs.
        retries: False turns retries and fallbacks off for this request.
        continuation: continue an answer whose upstream fails after content
            (``continue_on_failure``; never with retries off, tool calls or ``n > 1``).
    """
    valve = context.valve
    # The per-attempt timeouts and the retries as one operator (``_attempts.py``): the
    # same rules as the public operators composed, with one observer per attempt.
    # With retries off it still runs, once: it holds framing until the first
    # content, so an error before content keeps its HTTP status.
    stream = attempts_(
        [upstream_source(c, body, context) for c in (clients if retries else clients[:1])],
        first_token_s=config.first_token_timeout_s, idle_s=config.idle_timeout_s,
        max_attempts=config.retry_max_attempts if retries else 1,
        backoff_base=config.retry_backoff_base_ms / 1000,
        backoff_max=config.retry_backoff_max_ms / 1000,
        held=None if valve is None else valve.is_closed, on_retry=context.note_retry,
    )
    n = body.get("n")
    if continuation and retries and (n is None or n == 1):
        names = [c.name for c in clients]

        def continued(index: int, delivered: str) -> Observable[Chunk]:
            client = clients[index]
            messages = [*body.get("messages", []), {"role": "assistant", "content": delivered}]
            again = {**body, **client.config.continuation_body, "messages": messages}
            return _attempt(upstream_source(client, again, context), config, context.valve)

        stream = stream.pipe(continue_on_failure_(
            continued, sources=len(clients), names=names,
            answering=lambda: names.index(context.upstream) if context.upstream in names else 0,
            max_attempts=config.retry_max_attempts,
            backoff_base=config.retry_backoff_base_ms / 1000,
            backoff_max=config.retry_backoff_max_ms / 1000, scheduler=None,
            on_continue=context.note_failure,
        ))
    if config.total_timeout_s > 0:
        stream = stream.pipe(total_timeout(config.total_timeout_s))
    if config.coalesce and config.coalesce_max_delay_ms > 0:
        stream = stream.pipe(
            coalesce(config.coalesce_max_delay_ms / 1000, config.coalesce_max_chars)
        )
    if config.throttle_ms > 0:
        stream = stream.pipe(throttle(config.throttle_ms / 1000))
    if config.pace_chars_per_s > 0:
        stream = stream.pipe(
            pace(config.pace_chars_per_s, max_lag=config.pace_max_lag_ms / 1000)
        )
    return stream


def _attempt(
    source: Observable[Chunk], config: PipelineConfig, valve: Valve | None
) -> Observable[Chunk]:
    """One upstream request with the timeouts that make it fail (and be retried) in time."""
    if config.first_token_timeout_s > 0:
        source = source.pipe(first_token_timeout(config.first_token_timeout_s))
    if config.idle_timeout_s > 0:
        # While the sink holds the upstream back, a gap is the client's doing, not the upstream's.
        held = None if valve is None else (lambda: not valve.is_open)
        source = source.pipe(idle_timeout(config.idle_timeout_s, held=held))
    return source
