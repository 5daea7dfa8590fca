"""The load client: ``python -m streamsvc.bench.load --url URL --out FILE [...]``.

Opens K streams of N tokens at R tokens/s against one target (the simulator,
a relay in front of it), their starts spread at random over ``--ramp``
seconds, and measures per stream:

- time to first token: from sending the request to the first read that
  brings content text (``streams``: the ``POST /v1/streams`` and its answer,
  then the ``GET`` of its ``events_url`` on the same connection, are inside
  it, as an EventSource page waits for both; with ``--read-url``, the
  ``GET`` goes to that other instance on a connection of its own);
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
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import msgspec

from streamsvc.bench.collector import collector_off
from streamsvc.bench.options import ENDPOINTS
from streamsvc.bench.results import LoadResult, Progress
from streamsvc.bench.stats import cdf, summarize
from streamsvc.eventloop import EVENT_LOOPS, loop_factory, loop_name
from streamsvc.simulator import generated_tokens

__all__ = ["PROMPT", "EventSplitter", "LoadSpec", "main", "request_body", "run_load"]

PROMPT = "Measure what the relay adds."
PROGRESS_INTERVAL_S = 0.25
# A stream may take this much longer than its tokens at its rate; past that it has
# failed (a hung relay must not hang the bench).
TIMEOUT_SLACK_S = 60.0


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
    read_url: str | None = None  # streams: GET each events_url from this instance instead


def request_body(
    model: str, tokens: int, rate: float, endpoint: str = "openai"
) -> dict[str, Any]:
    """The request every stream sends: the simulator's pace is set from the client."""
    if endpoint == "responses":
        return {"model": model, "input": PROMPT, "stream": True,
                "simulate": {"rate": rate, "tokens": tokens}}
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


class _TextDelta(msgspec.Struct):
    delta: str = ""


class _Created(msgspec.Struct):
    events_url: str


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_delta = msgspec.json.Decoder(_Delta).decode
_decode_text_delta = msgspec.json.Decoder(_TextDelta).decode
_decode_created = msgspec.json.Decoder(_Created).decode


class EventSplitter:
    """Cuts an event-stream body into ``(event type, data)`` pairs; pure, no I/O.

    The measuring instrument must cost little next to what it measures, so
    this is not the full WHATWG decoder (:class:`streamsvc.sse.SSEDecoder`):
    it takes the LF line ends that streamsvc, the simulator and OpenAI write,
    and fails loudly on anything else instead of mis-measuring.

    Example:
        >>> EventSplitter().feed(b'data: {"a": 1}\n\n: ping\n\nevent: done\ndata: {}\n\n')
        [(b'message', b'{"a": 1}'), (b'done', b'{}')]
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, body: bytes) -> list[tuple[bytes, bytes]]:
        """The events completed by ``body`` (the next bytes of the de-chunked body)."""
        blocks = (self._pending + body).split(b"\n\n")
        self._pending = blocks.pop()
        events = []
        for block in blocks:
            event, data = b"message", []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                elif line.startswith(b"event:"):
                    event = line[6:].strip()
                elif b"\r" in line:
                    raise _Failed("CR line ends: not what the bench client reads")
                # comments (": ping"), id and retry lines carry nothing to measure
            if data:
                events.append((event, b"\n".join(data)))
        return events


def _openai_event(event: bytes, data: bytes) -> tuple[str, bool]:
    """(content text, whether the stream ended) of an OpenAI-format event."""
    if data == b"[DONE]":
        return "", True
    chunk = _decode_chunk(data)
    if chunk.error is not None:
        raise _Failed("error in stream")
    return "".join(c.delta.content for c in chunk.choices if c.delta.content), False


def _streamsvc_event(event: bytes, data: bytes) -> tuple[str, bool]:
    """(content text, whether the stream ended) of a streamsvc-format event."""
    if event == b"message":
        return _decode_delta(data).content or "", False
    if event == b"done":
        return "", True
    if event == b"error":
        code = msgspec.json.decode(data).get("code", "error")
        raise _Failed(f"error event {code}")
    return "", False


def _responses_event(event: bytes, data: bytes) -> tuple[str, bool]:
    """(content text, whether the stream ended) of a Responses API event."""
    if event == b"response.output_text.delta":
        return _decode_text_delta(data).delta, False
    if event == b"response.completed":
        return "", True
    if event in (b"response.failed", b"response.incomplete", b"error"):
        raise _Failed(f"{event.decode()} event")
    return "", False


_PARSERS = {"openai": _openai_event, "events": _streamsvc_event, "streams": _streamsvc_event,
            "responses": _responses_event}


class _Load:
    """The running measurement: counters for progress, sample arrays for the result."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        split = urlsplit(spec.url)
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or 80
        path = split.path.rstrip("/") + ENDPOINTS[spec.endpoint]
        self.url = f"{spec.url.rstrip('/')}{ENDPOINTS[spec.endpoint]}"
        body = msgspec.json.encode(
            request_body(spec.model, spec.tokens, spec.rate, spec.endpoint))
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {split.netloc}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("ascii") + body
        self.creates = spec.endpoint == "streams"  # POST answers 201 + events_url, then GET
        read = urlsplit(spec.read_url or spec.url)
        self.read_host, self.read_port = read.hostname or "127.0.0.1", read.port or 80
        self.read_netloc = read.netloc
        self.read_elsewhere = spec.read_url is not None
        self.expected = "".join(generated_tokens(spec.model, PROMPT, spec.tokens))
        self.parse = _PARSERS[spec.endpoint]
        pace_s = spec.tokens / spec.rate if spec.rate > 0 else 0.0
        self.timeout = 4 * pace_s + TIMEOUT_SLACK_S
        self.ttft = array("d")
        self.gaps = array("d")
        self.errors: Counter[str] = Counter()
        self.open = self.max_open = self.done = self.failed = self.chars = 0

    def progress(self) -> Progress:
        return Progress(
            open=self.open, done=self.done, failed=self.failed, chars=self.chars,
            chars_total=len(self.expected) * self.spec.streams,
        )

    async def stream(self, delay: float) -> None:
        await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        stream = _Stream(self, loop.create_future())
        try:
            transport, _ = await loop.create_connection(lambda: stream, self.host, self.port)
            try:
                async with asyncio.timeout(self.timeout):
                    text = await stream.finished
            finally:
                transport.close()
                if stream.connecting is not None:
                    stream.connecting.cancel()
                if stream.reader is not None:
                    stream.reader.close()
            if text != self.expected:
                raise _Failed("text differs from the upstream's")
            self.done += 1
        except _Failed as failure:
            self.failed += 1
            self.errors[str(failure)] += 1
        except (OSError, TimeoutError, msgspec.DecodeError) as exc:
            self.failed += 1
            self.errors[type(exc).__name__] += 1


class _Stream(asyncio.Protocol):
    """One stream on its own connection: the request out, then timing every read.

    ``data_received`` is the moment bytes reach the client; the aiohttp client
    would add a stream reader and a task switch per read, which on a small
    machine costs as much CPU as the relay being measured.
    """

    def __init__(self, load: _Load, finished: asyncio.Future[str]) -> None:
        self.load = load
        self.finished = finished
        self.parser = httptools.HttpResponseParser(self)
        self.splitter = EventSplitter()
        self.parts: list[str] = []
        self.started = time.perf_counter()  # before connecting: TTFT includes the accept
        self.previous = 0.0
        self.got = 0
        self.ended = False
        self.counted_open = False
        self.creating = load.creates  # reading the answer to POST /v1/streams
        self.created = b""
        self.request = load.request
        self.transport: asyncio.WriteTransport | None = None
        self.elsewhere = False  # --read-url: the GET went to a connection of its own
        self.reader: asyncio.BaseTransport | None = None  # that connection
        self.connecting: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but write the same.
        self.transport = cast(asyncio.WriteTransport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.finished.done():
            return
        now = time.perf_counter()
        self.got = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's exception arrives wrapped (HttpParserCallbackError).
            cause = exc.__context__
            if isinstance(cause, _Failed):
                self._finish(cause)
            elif isinstance(cause, msgspec.DecodeError):
                self._finish(_Failed("event data is not the expected JSON"))
            else:
                self._finish(_Failed(f"{type(exc).__name__}: {exc}"))
            return
        if self.got:
            load = self.load
            load.chars += self.got
            if self.previous:
                load.gaps.append(now - self.previous)
            else:
                load.ttft.append(now - self.started)
            self.previous = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.elsewhere:  # with --read-url, the POST's connection is done with
            self.lost()

    def lost(self) -> None:
        """The connection the stream reads closed (before its end, if it is still open)."""
        self._finish(_Failed("connection closed before the end of the stream"))

    # httptools callbacks

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.creating:
            if status != 201:
                raise _Failed(f"http {status} to POST /v1/streams")
            return
        if status != 200:
            raise _Failed(f"http {status}")
        self.counted_open = True
        self.load.open += 1
        self.load.max_open = max(self.load.max_open, self.load.open)

    def on_body(self, body: bytes) -> None:
        if self.creating:
            self.created += body
            return
        parse = self.load.parse
        for event, data in self.splitter.feed(body):
            text, end = parse(event, data)
            if text:
                self.parts.append(text)
                self.got += len(text)
            self.ended = self.ended or end

    def on_message_complete(self) -> None:
        if self.creating:
            self._read_events()
            return
        if self.ended:
            self._finish(None)
        else:
            self._finish(_Failed("ended without [DONE] or done"))

    def _read_events(self) -> None:
        """The stream is created: GET its ``events_url`` on the same (kept-alive) connection."""
        self.creating = False
        if not self.parser.should_keep_alive():
            raise _Failed("POST /v1/streams closed the connection")
        target = urlsplit(_decode_created(self.created).events_url)
        path = target.path + (f"?{target.query}" if target.query else "")
        load = self.load
        request = (f"GET {path} HTTP/1.1\r\nHost: {load.read_netloc}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode("ascii")
        if load.read_elsewhere:
            self.elsewhere = True
            self.connecting = asyncio.ensure_future(self._read_elsewhere(request))
            return
        assert self.transport is not None
        self.transport.write(request)

    async def _read_elsewhere(self, request: bytes) -> None:
        """The GET on a connection of its own to ``--read-url``; this stream reads it."""
        # From here on the POST's connection says nothing this stream waits for.
        self.parser = httptools.HttpResponseParser(self)
        self.request = request
        try:
            self.reader, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Reader(self), self.load.read_host, self.load.read_port)
        except OSError as exc:
            self._finish(_Failed(f"{type(exc).__name__} connecting to --read-url"))

    def _finish(self, failure: _Failed | None) -> None:
        if self.counted_open:
            self.counted_open = False
            self.load.open -= 1
        if self.finished.done():
            return
        if failure is None:
            self.finished.set_result("".join(self.parts))
        else:
            self.finished.set_exception(failure)


async def run_load(spec: LoadSpec, *, progress_interval: float = PROGRESS_INTERVAL_S) -> LoadResult:
    """Run the streams of ``spec`` to their end; print progress lines while they run."""
    load = _Load(spec)
    rng = random.Random(spec.seed)
    delays = [rng.uniform(0.0, spec.ramp_s) for _ in range(spec.streams)]

    async def report() -> None:
        while True:
            print(msgspec.json.encode(load.progress()).decode(), flush=True)
            await asyncio.sleep(progress_interval)

    reporter = asyncio.create_task(report())
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        async with asyncio.TaskGroup() as group:
            for delay in delays:
                group.create_task(load.stream(delay))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    duration = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    print(msgspec.json.encode(load.progress()).decode(), flush=True)
    return LoadResult(
        url=load.url, endpoint=spec.endpoint, streams=spec.streams, tokens=spec.tokens,
        rate=spec.rate, ramp_s=spec.ramp_s, event_loop=loop_name(asyncio.get_running_loop()),
        duration_s=duration, cpu_s=cpu, process_cpu_s=time.process_time(), completed=load.done, failed=load.failed,
        errors=dict(load.errors), ttft_ms=summarize(load.ttft), gap_ms=summarize(load.gaps),
        ttft_cdf=cdf(load.ttft), gap_cdf=cdf(load.gaps), max_open=load.max_open,
        read_url=spec.read_url,
    )


class _Reader(asyncio.Protocol):
    """A stream's ``--read-url`` connection: the GET out, its bytes to the stream."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.stream.request)

    def data_received(self, data: bytes) -> None:
        self.stream.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.lost()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamsvc.bench.load",
        description="Open K streams of N tokens at R tokens/s against URL; write one JSON result.",
    )
    parser.add_argument("--url", required=True, help="the target's base URL (no /v1)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="openai")
    parser.add_argument("--read-url", metavar="URL",
                        help="streams: GET each events_url from this instance (another one"
                             " on the same Redis journal)")
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
        read_url=args.read_url,
    )
    # No collector pauses in the measuring instrument (streamsvc.bench.collector).
    with collector_off(), asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        result = runner.run(run_load(spec))
    Path(args.out).write_bytes(msgspec.json.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
