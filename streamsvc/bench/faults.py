"""The seeded fault campaign: faulted streams through a relay, each outcome classified.

Each stream asks a relay for an ``echo`` answer whose text is known (so what
a client assembles can be compared with it, character for character), with
one fault of the simulator's (``simulate`` in the body: 429 or 500 before
the first byte, a cut, a hang with the socket open, a malformed chunk, an
error inside the 200 stream or as ``event: error``, an end without
``[DONE]`` or without a finish reason, a slow first token before or after
the headers, an emoji split into lone surrogate escapes) and one client
behaviour (read it all, read it slowly, hang up, hang up and resume with
``Last-Event-ID`` one to three times, hang up and re-send the POST). The
draws come from one seed, so a run can be repeated exactly.

Outcome classes, good then bad (:data:`BAD`)::

    exact               the whole text, then a normal end (done / [DONE])
    prefix_then_error   the text so far, then an error of the closed set
    left                the client hung up (and did not come back): a prefix
    lost                text missing, or a normal end before the whole text
    duplicated          text repeated
    silent_cut          the body ended with neither a normal end nor an error
    hang                nothing ended the stream within the deadline
    extra_upstream_request  the upstream was asked again after it had sent
                        content, or by a resume
    bad_error           an error outside the closed set, internal_error, or a
                        body that is not OpenAI-shaped JSON
    error_not_answer    a fault that cannot fail the answer (none, split
                        surrogates, a slow first token, a body left open after
                        [DONE]) ended in an error

It runs against any relay URL (``streamsvc bench --faults URL``): the relay
must send the model to a streamsvc simulator, whose ``/_sim/keys`` shows
the upstream requests of each stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from streamsvc.errors import ErrorCode
from streamsvc.simulator.text import echo_tokens
from streamsvc.sse import SSEDecoder

__all__ = [
    "BAD",
    "ENDPOINTS",
    "OUTCOMES",
    "CampaignReport",
    "Outcome",
    "Scenario",
    "format_report",
    "run_campaign",
    "run_from_args",
    "scenarios",
]

Endpoint = Literal["openai", "direct", "resumable", "oneshot"]
Client = Literal["read", "slow", "leave", "resume", "repost"]
ENDPOINTS: tuple[Endpoint, ...] = ("openai", "direct", "resumable", "oneshot")
OUTCOMES = ("exact", "prefix_then_error", "left", "lost", "duplicated", "silent_cut", "hang",
            "extra_upstream_request", "bad_error", "error_not_answer")
BAD = frozenset(OUTCOMES[3:])

# Texts with what relays get wrong: leading spaces, CR/LF, CJK, emoji (split_surrogates
# needs a character outside the BMP in each).
PROMPTS = (
    "  two leading spaces, a\r\nCRLF and a lone\rCR 🙂 end",
    "東京タワー 世界 🙂👍🏽 emoji and CJK, then more words to read",
    "data: looks like a field\nid: 7\n\nretry: 1 🎉 but is only text",
    "one two three four five six seven eight nine ten eleven twelve 😀",
    " <b>html</b> &amp; \"quotes\" \\back\\slash\t tab 🙂 and a long tail of words",
)
_TYPED = frozenset(code.value for code in ErrorCode) - {ErrorCode.INTERNAL_ERROR.value}
# Faults that cannot fail an answer: a relay that errs on them errs on its own.
_HARMLESS = frozenset({"none", "split_surrogates", "slow_first", "slow_headers",
                       "open_after_done"})
_CLIENTS: dict[Endpoint, tuple[Client, ...]] = {
    "openai": ("read", "read", "slow", "leave"),
    "direct": ("read", "slow", "leave", "repost"),
    "resumable": ("read", "slow", "leave", "resume", "resume"),
    "oneshot": ("read", "slow", "leave", "resume", "resume"),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """One stream of a campaign: what the upstream does, and what the client does."""

    index: int
    endpoint: Endpoint
    fault: str
    simulate: dict[str, Any]
    client: Client
    prompt: str
    cut_after: int = 0  # events read before hanging up (leave, resume, repost)
    resumes: int = 0

    @property
    def key(self) -> str:
        return str(self.simulate["key"])


def scenarios(seed: int, count: int, endpoints: Sequence[Endpoint] = ENDPOINTS,
              run: str = "c") -> list[Scenario]:
    """``count`` scenarios drawn from ``seed`` (the same seed, the same campaign)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        prompt = rng.choice(PROMPTS)
        tokens = len(echo_tokens(prompt))
        fault = rng.choice(("none", "none", "429", "500", "drop", "hang", "malformed",
                            "error_event", "sse_error", "no_done", "no_finish", "slow_first",
                            "slow_headers", "split_surrogates", "open_after_done"))
        simulate: dict[str, Any] = {"key": f"{run}-{seed}-{index}"}
        if rng.random() < 0.3:
            simulate["rate"] = rng.choice((50, 200))  # else as fast as it can
        if fault in ("429", "500"):
            simulate.update(fault=fault, retry_after=0, fail_times=rng.choice((0, 1, 2)))
        elif fault in ("drop", "hang", "malformed", "error_event", "sse_error"):
            simulate.update(fault=fault, fault_at=rng.randrange(tokens + 1))
        elif fault in ("slow_first", "slow_headers"):
            simulate["first_token_delay"] = round(rng.uniform(0.05, 0.6), 2)
            if fault == "slow_headers":
                simulate["fault"] = fault
        elif fault != "none":
            simulate["fault"] = fault
        endpoint = rng.choice(list(endpoints))
        client = rng.choice(_CLIENTS[endpoint])
        out.append(Scenario(
            index=index, endpoint=endpoint, fault=fault, simulate=simulate, client=client,
            prompt=prompt, cut_after=rng.randint(1, max(1, tokens // 2)),
            resumes=rng.randint(1, 3) if client == "resume" else 0,
        ))
    return out


@dataclass(kw_only=True, slots=True)
class Outcome:
    """How one stream ended, as its client saw it."""

    scenario: Scenario
    outcome: str
    detail: str = ""
    text: str = ""


@dataclass(kw_only=True, slots=True)
class CampaignReport:
    """A whole campaign: every outcome, and how long it took."""

    seed: int
    outcomes: list[Outcome]
    seconds: float
    upstream_checked: bool
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.counts = Counter(o.outcome for o in self.outcomes)

    @property
    def bad(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome in BAD]


class _Read:
    """What a client got on one connection or more: the text of choice 0 and the end.

    ``closed_codes``: an error's code must be one of streamsvc's closed set (else any
    OpenAI-shaped error with a string code or type is typed: another gateway's).
    """

    def __init__(self, closed_codes: bool = True) -> None:
        self.closed_codes = closed_codes
        self.text = ""
        self.end: str | None = None  # "normal", "error", "bad_error", "ended_204"
        self.detail = ""
        self.last_id: str | None = None
        self.events = 0

    def error(self, code: Any, message: Any, kind: Any = None) -> None:
        typed = code in _TYPED if self.closed_codes else (
            (isinstance(code, str) or isinstance(kind, str))
            and code != ErrorCode.INTERNAL_ERROR.value)
        if typed and isinstance(message, str) and message:
            self.end, self.detail = "error", str(code)
        else:
            self.end, self.detail = "bad_error", f"{code!r}: {str(message)[:80]}"


async def _error_body(response: aiohttp.ClientResponse, read: _Read) -> None:
    """An answer that is not a stream: it must be an OpenAI-shaped error."""
    body = await response.read()
    try:
        error = json.loads(body)["error"]
        read.error(error.get("code"), error["message"], error.get("type"))
    except (ValueError, KeyError, TypeError):
        read.end, read.detail = "bad_error", f"HTTP {response.status}: {body[:80]!r}"


def _take(event: Any, read: _Read, openai: bool) -> None:
    """One event into ``read``: text of choice 0, or the end."""
    read.events += 1
    if event.id is not None:
        read.last_id = event.id
    if openai and event.data == "[DONE]":
        read.end = read.end or "normal"
        return
    payload = json.loads(event.data)
    if not isinstance(payload, dict):
        raise ValueError("an event whose data is not a JSON object")
    if openai:
        if "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {}
            read.error(error.get("code"), error.get("message"), error.get("type"))
        for choice in payload.get("choices") or ():
            if choice.get("index", 0) == 0:
                read.text += (choice.get("delta") or {}).get("content") or ""
    elif event.event == "done":
        read.end = "normal" if payload.get("finish_reason") else "bad_error"
        read.detail = f"done: {payload.get('finish_reason')}"
    elif event.event == "error":
        read.error(payload.get("code"), payload.get("message"))
    elif not payload.get("index"):
        read.text += payload.get("content") or ""


async def _read_sse(response: aiohttp.ClientResponse, read: _Read, *, openai: bool,
                    slow: bool, stop_after: int | None) -> bool:
    """Read one event stream into ``read``; False when the client hung up (``stop_after``)."""
    decoder = SSEDecoder()
    chunks = response.content.iter_chunked(256) if slow else response.content.iter_any()
    async for data in chunks:
        for event in decoder.feed(data):
            try:
                _take(event, read, openai)
            except (ValueError, AttributeError) as exc:
                read.end, read.detail = "bad_error", f"unreadable event: {exc}"[:100]
                return True
            if openai and read.end == "normal":
                return True  # [DONE] is the end, whether or not the body closes (as the SDK)
            if stop_after is not None and read.events >= stop_after and read.end is None:
                response.close()  # hang up
                return False
        if slow:
            await asyncio.sleep(0.002)
    return True


class _Campaign:
    def __init__(self, session: aiohttp.ClientSession, relay: str, model: str,
                 closed_codes: bool) -> None:
        self.session = session
        self.relay = relay.rstrip("/")
        self.model = model
        self.closed_codes = closed_codes

    def _body(self, s: Scenario) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": s.prompt}],
                "simulate": s.simulate}

    async def run(self, s: Scenario) -> _Read:
        read = _Read(self.closed_codes)
        slow = s.client == "slow"
        cut = s.cut_after if s.client in ("leave", "resume", "repost") else None
        if s.endpoint == "openai":
            body = {**self._body(s), "stream": True}
            async with self.session.post(self.relay + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    await _error_body(r, read)
                else:
                    await _read_sse(r, read, openai=True, slow=slow, stop_after=cut)
            return read
        if s.endpoint == "direct":
            url, method, kwargs = "/v1/chat/stream", "POST", {"json": self._body(s)}
        elif s.endpoint == "oneshot":
            query = {"q": s.prompt, "model": self.model,
                     "extra": json.dumps({"simulate": s.simulate})}
            url, method, kwargs = "/v1/chat/stream", "GET", {"params": query}
        else:
            async with self.session.post(self.relay + "/v1/streams", json=self._body(s)) as r:
                if r.status != 201:
                    await _error_body(r, read)
                    return read
                url, method, kwargs = (await r.json())["events_url"], "GET", {}
        finished = await self._events(method, url, kwargs, read, slow=slow, stop_after=cut)
        for attempt in range(s.resumes):  # hung up: come back for the rest, with the last id
            if finished or read.last_id is None:
                break
            await asyncio.sleep(0.05)
            again = attempt < s.resumes - 1  # and hang up once more, but the last time
            finished = await self._events(
                method, url, {**kwargs, "headers": {"Last-Event-ID": read.last_id}}, read,
                slow=slow, stop_after=read.events + s.cut_after if again else None)
        if s.client == "repost" and read.end is None and read.last_id is not None:
            await asyncio.sleep(0.05)  # a naive client sends its POST again, with the id
            headers = {"Last-Event-ID": read.last_id}
            async with self.session.post(self.relay + url, headers=headers,
                                         json=self._body(s)) as r:
                if r.status == 200:  # a second generation: the upstream counts show it
                    await _read_sse(r, read, openai=False, slow=False, stop_after=None)
                elif r.status in (204, 409):
                    read.end, read.detail = "left", f"repost: {r.status}"
                else:
                    await _error_body(r, read)
        return read

    async def _events(self, method: str, url: str, kwargs: dict[str, Any], read: _Read, *,
                      slow: bool, stop_after: int | None) -> bool:
        """One connection to an event stream; False when the client hung up."""
        async with self.session.request(method, self.relay + url, **kwargs) as r:
            if r.status == 204:
                read.end = read.end or "ended_204"
                return True
            if r.status != 200:
                await _error_body(r, read)
                return True
            return await _read_sse(r, read, openai=False, slow=slow, stop_after=stop_after)


def _classify(s: Scenario, read: _Read, expected: str) -> tuple[str, str]:
    # Halves of a character sent as lone surrogate escapes join, as in JavaScript.
    text = read.text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if text != expected and not expected.startswith(text):
        common = 0
        while common < min(len(text), len(expected)) and text[common] == expected[common]:
            common += 1
        repeated = len(text) > len(expected) or text[common:common + 8] in expected[:common]
        return ("duplicated" if repeated else "lost"), f"differs at {common}"
    if read.end == "bad_error":
        return "bad_error", read.detail
    if s.client in ("leave", "repost") and read.end in (None, "left"):
        return "left", read.detail
    if read.end == "normal":
        return ("exact", "") if text == expected else ("lost", f"{len(text)}/{len(expected)}")
    if read.end == "error":
        if s.fault in _HARMLESS:
            return "error_not_answer", read.detail
        return "prefix_then_error", read.detail
    return "silent_cut", f"{read.end or 'no end'} after {len(text)}/{len(expected)}"


async def _one(campaign: _Campaign, s: Scenario, deadline_s: float) -> Outcome:
    expected = s.prompt  # echo
    try:
        async with asyncio.timeout(deadline_s):
            read = await campaign.run(s)
    except TimeoutError:
        return Outcome(scenario=s, outcome="hang", detail=f"no end in {deadline_s:g} s")
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        return Outcome(scenario=s, outcome="silent_cut", detail=type(exc).__name__)
    outcome, detail = _classify(s, read, expected)
    return Outcome(scenario=s, outcome=outcome, detail=detail, text=read.text)


async def run_campaign(
    relay: str,
    *,
    streams: int,
    seed: int = 1,
    upstream: str | None = None,
    concurrency: int = 32,
    endpoints: Sequence[Endpoint] = ENDPOINTS,
    model: str = "echo",
    deadline_s: float = 60.0,
    closed_codes: bool = True,
) -> CampaignReport:
    """Run ``streams`` faulted streams through ``relay``, ``concurrency`` at a time.

    Args:
        relay: the relay's base URL (``http://127.0.0.1:8080``).
        upstream: the simulator's base URL the relay sends ``model`` to (its
            ``/v1`` or not); without it, upstream requests are not checked.
        endpoints: which of the relay's endpoints to use (``openai`` only for a
            relay that has just ``POST /v1/chat/completions``).
        deadline_s: a stream not ended by then (hang-ups and resumes included) is a hang.
        closed_codes: errors must carry a code of streamsvc's closed set; False for
            another gateway, whose OpenAI-shaped errors carry codes of its own.
    """
    plan = scenarios(seed, streams, endpoints, run=f"r{time.time_ns() % 10**9}")
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        campaign = _Campaign(session, relay, model, closed_codes)

        async def guarded(s: Scenario) -> Outcome:
            async with gate:
                return await _one(campaign, s, deadline_s)

        outcomes = list(await asyncio.gather(*(guarded(s) for s in plan)))
        if upstream is not None:
            await asyncio.sleep(0.5)  # answers the relay stopped are still ending upstream
            base = upstream.rstrip("/").removesuffix("/v1")
            async with session.get(base + "/_sim/keys") as r:
                keys = await r.json()
            for o in outcomes:
                counts = keys.get(o.scenario.key, {})
                if counts.get("after_content"):
                    o.outcome = "extra_upstream_request"
                    o.detail = f"{counts['requests']} requests, {counts['after_content']}" \
                               " after content"
    return CampaignReport(seed=seed, outcomes=outcomes, seconds=time.monotonic() - started,
                          upstream_checked=upstream is not None)


def format_report(report: CampaignReport) -> str:
    """The outcome table (classes by endpoint), and the bad streams with their seeds."""
    endpoints = sorted({o.scenario.endpoint for o in report.outcomes}, key=ENDPOINTS.index)
    by = Counter((o.outcome, o.scenario.endpoint) for o in report.outcomes)
    width = max(len(name) for name in OUTCOMES) + 2
    lines = [f"fault campaign: {len(report.outcomes)} streams, seed {report.seed},"
             f" {report.seconds:.1f} s"
             + ("" if report.upstream_checked else " (upstream requests not checked)"),
             "", "outcome".ljust(width) + "".join(e.rjust(11) for e in endpoints)
             + "total".rjust(9) + "  bad?"]
    for name in OUTCOMES:
        row = [by[(name, e)] for e in endpoints]
        lines.append(name.ljust(width) + "".join(str(n).rjust(11) for n in row)
                     + str(report.counts[name]).rjust(9) + ("   bad" if name in BAD else ""))
    faults = Counter(o.scenario.fault for o in report.outcomes)
    lines += ["", "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))]
    clients = Counter(o.scenario.client for o in report.outcomes)
    lines.append("clients: " + ", ".join(f"{k} {v}" for k, v in sorted(clients.items())))
    bad = report.bad
    lines.append(f"bad outcomes: {len(bad)}")
    for o in bad[:20]:
        s = o.scenario
        lines.append(f"  #{s.index} {o.outcome}: {s.endpoint} {s.client} fault={s.fault}"
                     f" simulate={json.dumps(s.simulate)} ({o.detail})")
    return "\n".join(lines)



def run_from_args(args: argparse.Namespace) -> int:
    """``streamsvc bench --faults URL``: run, print the table; 0, or 1 on a bad outcome."""
    endpoints = [name.strip() for name in args.fault_endpoints.split(",") if name.strip()]
    unknown = sorted(set(endpoints) - set(ENDPOINTS))
    problem = None
    if unknown or not endpoints:
        problem = (f"--fault-endpoints: choose from {', '.join(ENDPOINTS)},"
                   f" got {args.fault_endpoints!r}")
    elif args.concurrency < 1 or args.deadline <= 0 or (args.streams or 1) < 1:
        problem = "--streams and --concurrency must be at least 1, --deadline more than 0"
    if problem is not None:
        print(f"streamsvc bench: {problem}", file=sys.stderr)
        return 2
    report = asyncio.run(run_campaign(
        args.faults, streams=args.streams or 300, seed=args.seed, upstream=args.upstream_stats,
        concurrency=args.concurrency, endpoints=[e for e in ENDPOINTS if e in endpoints],
        model=args.model or "echo", deadline_s=args.deadline,
        closed_codes=not args.any_error_code,
    ))
    print(format_report(report), flush=True)
    return 1 if report.bad else 0
