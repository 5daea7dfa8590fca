"""The load client: ``python -m streamsvc.bench.load --url URL --out FILE [...]``.

Opens K streams of N tokens at R tokens/s against one target (the simulator,
a relay in front of it), their starts spread at random over ``--ramp``
seconds, and measures per stream:

- time to first token: from sending the request to the first read that
  brings content text;
- inter-token gaps: between successive reads that bring content text. A
  relay that merges two pending tokens into one event shows as one longer
  gap, which is what a reader sees.

Each stream's text is checked against what the simulator sends, so a lossy
or truncated relay counts as failed, not fast. Memory is bounded by K x N:
the samples go into two arrays of doubles; only their summaries and
distributions are written. Progress goes to stdout as JSON lines
(:class:`~streamsvc.bench.results.Progress`), the result to ``--out`` as one
JSON :class:`~streamsvc.bench.results.LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from streamsvc.bench.options import ENDPOINTS
from streamsvc.bench.results import LoadResult, Progress
from streamsvc.bench.stats import cdf, summarize
from streamsvc.eventloop import EVENT_LOOPS, loop_factory, loop_name
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.upstream.simtext import generated_tokens

__all__ = ["PROMPT", "LoadSpec", "main", "request_body", "run_load"]

PROMPT = "Measure what the relay adds."
PROGRESS_INTERVAL_S = 0.25
# A stream silent this long is counted as failed (a hung relay must not hang the bench).
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadSpec:
    """What one load-client process does."""

    url: str  # the target's base URL, e.g. http://127.0.0.1:8080
    endpoint: str = "openai"  # a key of ENDPOINTS
    streams: int = 200
    tokens: int = 200
    rate: float = 50.0
    ramp_s: float = 1.0
    model: str = "sim-small"
    seed: int = 4


def request_body(model: str, tokens: int, rate: float) -> dict[str, Any]:
    """The chat request every stream sends: the simulator's pace is set from the client."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "simulate": {"rate": rate, "tokens": tokens},
    }


# Only the fields the client reads; the rest of each chunk is skipped by msgspec.
class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    error: Any = None


class _Failed(Exception):
    """A stream that did not deliver the expected text; the message is the reason."""


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_delta = msgspec.json.Decoder(_Delta).decode


def _openai_event(event: ServerSentEvent) -> tuple[str, bool]:
    """(content text, whether the stream ended) of an OpenAI-format event."""
    if event.data == "[DONE]":
        return "", True
    chunk = _decode_chunk(event.data)
    if chunk.error is not None:
        raise _Failed("error in stream")
    return "".join(c.delta.content for c in chunk.choices if c.delta.content), False


def _streamsvc_event(event: ServerSentEvent) -> tuple[str, bool]:
    """(content text, whether the stream ended) of a streamsvc-format event."""
    if event.event == "message":
        return _decode_delta(event.data).content or "", False
    if event.event == "done":
        return "", True
    if event.event == "error":
        code = msgspec.json.decode(event.data).get("code", "error")
        raise _Failed(f"error event {code}")
    return "", False


class _Load:
    """The running measurement: counters for progress, sample arrays for the result."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.url = spec.url.rstrip("/") + ENDPOINTS[spec.endpoint]
        self.body = msgspec.json.encode(request_body(spec.model, spec.tokens, spec.rate))
        self.expected = "".join(generated_tokens(spec.model, PROMPT, spec.tokens))
        self.parse = _openai_event if spec.endpoint == "openai" else _streamsvc_event
        self.ttft = array("d")
        self.gaps = array("d")
        self.errors: Counter[str] = Counter()
        self.open = self.max_open = self.done = self.failed = self.chars = 0

    def progress(self) -> Progress:
        return Progress(
            open=self.open, done=self.done, failed=self.failed, chars=self.chars,
            chars_total=len(self.expected) * self.spec.streams,
        )

    async def stream(self, session: aiohttp.ClientSession, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._stream(session)
            self.done += 1
        except _Failed as failure:
            self.failed += 1
            self.errors[str(failure)] += 1
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            self.failed += 1
            self.errors[type(exc).__name__] += 1

    async def _stream(self, session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        async with session.post(self.url, data=self.body, headers=headers) as resp:
            if resp.status != 200:
                raise _Failed(f"http {resp.status}")
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            try:
                text = await self._read(resp, started)
            finally:
                self.open -= 1
        if text != self.expected:
            raise _Failed("text differs from the upstream's")

    async def _read(self, resp: aiohttp.ClientResponse, started: float) -> str:
        decoder = SSEDecoder()
        parse = self.parse
        parts: list[str] = []
        previous = 0.0
        ended = False
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            got = 0
            for event in decoder.feed(data):
                text, end = parse(event)
                if text:
                    parts.append(text)
                    got += len(text)
                ended = ended or end
            if got:
                self.chars += got
                if previous:
                    self.gaps.append(now - previous)
                else:
                    self.ttft.append(now - started)
                previous = now
            if ended:
                break
        if not ended:
            raise _Failed("ended without [DONE] or done")
        return "".join(parts)


async def run_load(spec: LoadSpec, *, progress_interval: float = PROGRESS_INTERVAL_S) -> LoadResult:
    """Run the streams of ``spec`` to their end; print progress lines while they run."""
    load = _Load(spec)
    rng = random.Random(spec.seed)
    delays = [rng.uniform(0.0, spec.ramp_s) for _ in range(spec.streams)]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT_S)

    async def report() -> None:
        while True:
            print(msgspec.json.encode(load.progress()).decode(), flush=True)
            await asyncio.sleep(progress_interval)

    reporter = asyncio.create_task(report())
    started = time.perf_counter()
    try:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with asyncio.TaskGroup() as group:
                for delay in delays:
                    group.create_task(load.stream(session, delay))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    duration = time.perf_counter() - started
    print(msgspec.json.encode(load.progress()).decode(), flush=True)
    return LoadResult(
        url=load.url, endpoint=spec.endpoint, streams=spec.streams, tokens=spec.tokens,
        rate=spec.rate, ramp_s=spec.ramp_s, event_loop=loop_name(asyncio.get_running_loop()),
        duration_s=duration, completed=load.done, failed=load.failed,
        errors=dict(load.errors), ttft_ms=summarize(load.ttft), gap_ms=summarize(load.gaps),
        ttft_cdf=cdf(load.ttft), gap_cdf=cdf(load.gaps), max_open=load.max_open,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamsvc.bench.load",
        description="Open K streams of N tokens at R tokens/s against URL; write one JSON result.",
    )
    parser.add_argument("--url", required=True, help="the target's base URL (no /v1)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="openai")
    parser.add_argument("--streams", type=int, default=200, metavar="K")
    parser.add_argument("--tokens", type=int, default=200, metavar="N")
    parser.add_argument("--rate", type=float, default=50.0, metavar="R")
    parser.add_argument("--ramp", type=float, default=1.0, metavar="S")
    parser.add_argument("--model", default="sim-small")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--loop", choices=EVENT_LOOPS, default="auto")
    parser.add_argument("--out", required=True, metavar="FILE", help="where the JSON result goes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load client; exit status 0 when it ran (failed streams are in the result)."""
    args = _parser().parse_args(argv)
    spec = LoadSpec(
        url=args.url, endpoint=args.endpoint, streams=args.streams, tokens=args.tokens,
        rate=args.rate, ramp_s=args.ramp, model=args.model, seed=args.seed,
    )
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        result = runner.run(run_load(spec))
    Path(args.out).write_bytes(msgspec.json.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
