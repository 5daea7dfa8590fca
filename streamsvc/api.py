"""The embedded API: a chat answer as an ``Observable[Chunk]``, no HTTP server needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import reactivex
from reactivex import Observable

from streamsvc.chunks import Chunk
from streamsvc.config import PipelineConfig, UpstreamConfig
from streamsvc.pipeline import StreamContext, build_pipeline
from streamsvc.upstream.client import UpstreamClient

__all__ = ["chat_stream"]


def chat_stream(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str,
    base_url: str,
    api_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    pipeline: PipelineConfig | None = None,
    session: aiohttp.ClientSession | None = None,
    **params: Any,
) -> Observable[Chunk]:
    """Stream a chat completion from an OpenAI-compatible server as a cold Observable.

    Each subscription makes one request, through the operators ``pipeline``
    turns on (timeouts, retry before the first content, coalesce, throttle,
    pace): the same chain and upstream client as the server's. Disposing the
    subscription cancels the request. Subscribe with a scheduler (as
    :func:`streamsvc.aiter_observable` does): the retry's backoff and the
    timeouts need one. Compose it with ``reactivex`` operators and
    :mod:`streamsvc.operators`.

    Args:
        messages: the chat messages, as OpenAI takes them.
        model: the model name.
        base_url: the server's OpenAI base URL, e.g. ``http://127.0.0.1:8081/v1``.
        api_key: sent as ``Authorization: Bearer``.
        headers: extra request headers.
        pipeline: the operators' settings (default: the ``[pipeline]`` defaults).
        session: the ``ClientSession`` every request goes through (its connection
            pool, trace configs, proxy settings); the caller owns it and closes it.
            None: each request opens a session of its own and closes it when it ends.
        **params: more request fields (``temperature``, ``max_tokens``, ...).

    Example::

        answer = streamsvc.chat_stream([{"role": "user", "content": "Hi"}],
                                       model="echo", base_url=sim.url)
        async for chunk in streamsvc.aiter_observable(answer):
            print(chunk.content, end="")
    """
    upstream = UpstreamConfig(base_url=base_url, headers=dict(headers or {}))
    body = {"model": model, "messages": list(messages), **params}
    client = UpstreamClient("upstream", upstream, session, api_key=api_key)
    config = pipeline or PipelineConfig()
    # A context of its own per subscription: each is one answer (attempts, upstream).
    return reactivex.defer(
        lambda _scheduler: build_pipeline(body, [client], config, StreamContext()))
