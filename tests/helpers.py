"""What several test modules need: request bodies and the text they must give, keys, and
reading an event stream into its events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from streamsvc.simulator import SimulatorServer, generated_tokens
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import RunningServer, StartServer, relay_overrides

PROMPT = "tell me a story"


def story(tokens: int, rate: float = 0.0, *, prompt: str = PROMPT, **simulate: Any
          ) -> dict[str, Any]:
    """A chat body for ``sim-small``'s deterministic prose: ``tokens`` at ``rate`` a second."""
    return {"model": "sim-small", "messages": [{"role": "user", "content": prompt}],
            "simulate": {"tokens": tokens, "rate": rate, **simulate}}


def expected(tokens: int, *, prompt: str = PROMPT, model: str = "sim-small") -> str:
    """The whole text the simulator answers :func:`story` (or ``model``) with."""
    return "".join(generated_tokens(model, prompt, tokens))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def secured(start_server: StartServer, simulator: SimulatorServer,
                  monkeypatch: pytest.MonkeyPatch, api_keys: str, **overrides: Any
                  ) -> RunningServer:
    """streamsvc with auth on (``STREAMSVC_API_KEYS=api_keys``) in front of ``simulator``."""
    monkeypatch.setenv("STREAMSVC_API_KEYS", api_keys)
    return await start_server(overrides=relay_overrides(simulator.url, **overrides))


def text_of(events: list[ServerSentEvent]) -> str:
    """The text of choice 0 in ``events``: streamsvc deltas or OpenAI chunks alike."""
    parts = []
    for event in events:
        if event.event != "message" or event.data == "[DONE]":
            continue
        data = json.loads(event.data)
        if "choices" in data:  # the OpenAI format
            parts += [c["delta"].get("content") or "" for c in data["choices"]
                      if c.get("index", 0) == 0]
        else:
            parts.append(data.get("content", "") if data.get("index", 0) == 0 else "")
    return "".join(parts)


@dataclass
class Read:
    """What one reader of an event stream got."""

    status: int
    headers: dict[str, str]
    events: list[ServerSentEvent] = field(default_factory=list)
    raw: bytes = b""
    retry: int | None = None

    @property
    def text(self) -> str:
        return text_of(self.events)

    @property
    def last_id(self) -> str:
        assert self.events[-1].id is not None
        return self.events[-1].id

    @property
    def seqs(self) -> list[int]:
        return [int(str(e.id).rpartition(":")[2]) for e in self.events if e.id]

    def final(self) -> dict[str, Any]:
        assert self.events[-1].event in ("done", "error"), self.events[-1]
        data: dict[str, Any] = json.loads(self.events[-1].data)
        return data


async def read_events(response: aiohttp.ClientResponse, *, stop_after: int | None = None
                      ) -> Read:
    """Read an SSE body; with ``stop_after``, hang up once that many events arrived."""
    result = Read(status=response.status, headers=dict(response.headers))
    if response.status != 200:
        result.raw = await response.read()
        return result
    decoder = SSEDecoder()
    raw = bytearray()
    async for data in response.content.iter_any():
        raw += data
        result.events.extend(decoder.feed(data))
        if stop_after is not None and len(result.events) >= stop_after:
            response.close()
            break
    else:
        assert not decoder.pending, "the body ended inside an event"
    result.raw = bytes(raw)
    result.retry = decoder.retry
    if stop_after is not None:
        # Only what this reader had when it left; a later frame in the same chunk is dropped.
        result.events = result.events[:stop_after]
    return result


async def get_events(session: aiohttp.ClientSession, url: str, *,
                     stop_after: int | None = None, last_event_id: str | None = None,
                     **kwargs: Any) -> Read:
    """GET an event stream (resuming after ``last_event_id``) and read it (:func:`read_events`)."""
    if last_event_id is not None:
        kwargs["headers"] = {**kwargs.get("headers", {}), "Last-Event-ID": last_event_id}
    async with session.get(url, **kwargs) as response:
        return await read_events(response, stop_after=stop_after)
