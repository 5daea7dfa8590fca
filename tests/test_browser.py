"""Real browser clients (Debian's Chromium driven by Playwright) against the relay.

Every page is same-origin: it is opened on the relay's ``/healthz`` and the
client code runs there through ``page.evaluate``, so EventSource and fetch
talk to streamsvc exactly as a page served by it would.

The browser is Debian's ``/usr/bin/chromium``; Playwright never downloads
one. When Chromium is missing the tests fail (CI installs it), they do not
skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page

from streamsvc.simulator import SimulatorServer
from streamsvc.sse import SSEDecoder
from tests.conftest import RunningServer

# Everything that has broken SSE relays before, in one user message.
TORTURE = (
    "   three leading spaces,  two spaces inside\r"
    "CR alone\nLF alone\r\nCRLF\n\n\n"
    "data: not a field\n"
    "id: 7\n"
    ": comment\n"
    "event: done\n"
    "retry: 0\n"
    "東京の天気 🙂👍🏽 <script>alert(1)</script>\n"
    "\ttab\tseparated\t\n"
    "  trailing spaces  "
)

EVENT_ID = re.compile(r"(st_[0-9a-f]{24}):(\d+)")

# The relays of the browser tests send `retry: 200` (tests/conftest.py `relay` reads
# RELAY_CONFIG), so that a reader left open comes back, and is seen, soon.
RETRY_MS = 200
RELAY_CONFIG = {"server": {"sse_retry_ms": RETRY_MS}}

# A control reader: reads a journaled stream from a resume point and is NOT closed at its
# end, so EventSource reconnects `retry` ms later and the relay answers 204, which closes
# it for good. Resolves then with the events it got (rejects if it got none or never
# closed). It reads through the one-shot GET's resume (`?lastEventId=`), with "&control",
# so that it is told apart from the readers under test.
JS_CONTROL_READER = """
async (url) => await new Promise((resolve, reject) => {
  const es = new EventSource(url);
  let events = 0;
  const timer = setTimeout(() => {
    es.close();
    reject(new Error("the control reader did not come back; events: " + events));
  }, 15000);
  es.onmessage = () => { events += 1; };
  es.addEventListener("done", () => { events += 1; });
  es.onerror = (e) => {
    if (e.data !== undefined) { events += 1; return; }  // the stream's own error event
    if (es.readyState !== EventSource.CLOSED) return;  // the end of the body: it reconnects
    clearTimeout(timer);
    if (events > 0) resolve(events); else reject(new Error("the control reader was refused"));
  };
})
"""


async def wait_out_reconnects(page: Page, stream_id: str) -> None:
    """Return once an EventSource this page had left open would have come back.

    A control reader (``JS_CONTROL_READER``) reads stream ``stream_id`` from its first event
    on and reconnects ``retry`` ms after its end. Every reader the page opened before it
    ended before it, so one left open would have reconnected, and Playwright seen the
    request, by the time the control's reconnect is answered: a condition, not a sleep.
    """
    url = f"/v1/chat/stream?lastEventId={stream_id}:1&control"  # resumes any stream
    assert await page.evaluate(JS_CONTROL_READER, url) >= 1

# Collects the content of an EventSource until its `done` event; rejects on
# an `error` event from the server, on a connection error, or on timeout.
# Resolves with {text, ids, doneId, doneData}.
JS_READ_EVENTSOURCE = """
async (url) => {
  return await new Promise((resolve, reject) => {
    const es = new EventSource(url);
    const parts = [];
    const ids = [];
    const timer = setTimeout(() => {
      es.close();
      reject(new Error("timeout; got " + JSON.stringify(parts.join(""))));
    }, 20000);
    es.onmessage = (e) => {
      ids.push(e.lastEventId);
      const data = JSON.parse(e.data);
      if (typeof data.content === "string") parts.push(data.content);
    };
    es.addEventListener("done", (e) => {
      es.close();
      clearTimeout(timer);
      resolve({text: parts.join(""), ids, doneId: e.lastEventId, doneData: JSON.parse(e.data)});
    });
    es.addEventListener("error", (e) => {
      es.close();
      clearTimeout(timer);
      reject(new Error("EventSource error: " + (e.data || "connection error")
                       + "; readyState " + es.readyState));
    });
  });
}
"""

# A fetch-based client with its own SSE parser (the WHATWG line rules: lines
# end in CRLF, CR or LF; a CR at the end of a chunk may be the first half of
# a CRLF; one space after the colon is dropped; an event is dispatched on a
# blank line). Resolves with {text, events, status, type}.
JS_FETCH_READER = """
async (body) => {
  const response = await fetch("/v1/chat/stream", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
  const status = response.status;
  const type = response.headers.get("Content-Type");
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parts = [];
  const events = [];
  let buffer = "";
  let data = [];
  let eventType = "";
  let sawData = false;
  let done = false;
  const handleLine = (line) => {
    if (line === "") {
      if (sawData) {
        const type = eventType || "message";
        const payload = data.join("\\n");
        events.push(type);
        if (type === "message") {
          const parsed = JSON.parse(payload);
          if (typeof parsed.content === "string") parts.push(parsed.content);
        } else if (type === "done") {
          done = true;
        } else if (type === "error") {
          throw new Error("error event: " + payload);
        }
      }
      data = []; eventType = ""; sawData = false;
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    let name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") { data.push(value); sawData = true; }
    else if (name === "event") eventType = value;
  };
  const drain = (final) => {
    // Split on CRLF, CR or LF; keep an incomplete last line (and a trailing
    // CR, which may be the first half of a CRLF) for the next chunk.
    const lines = buffer.split(/\\r\\n|\\r|\\n/);
    let rest = lines.pop();
    if (!final && rest === "" && buffer.endsWith("\\r")) {
      lines.pop();
      rest = "\\r";
    }
    buffer = rest;
    for (const line of lines) handleLine(line);
  };
  while (!done) {
    const {value, done: end} = await reader.read();
    if (end) { buffer += decoder.decode(); drain(true); break; }
    buffer += decoder.decode(value, {stream: true});
    drain(false);
  }
  if (done) await reader.cancel();
  if (!done) throw new Error("stream ended without a done event");
  return {text: parts.join(""), events, status, type};
}
"""


@dataclass
class PageLog:
    """What the page said on its console: errors only, and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        # Every console error counts (the relay answers Chromium's own
        # /favicon.ico request with 204, so that is no error either).
        if message.type == "error":
            self.errors.append(f"console.error: {message.text} ({message.location})")

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"pageerror: {error}")


@dataclass
class BrowserPage:
    page: Page
    log: PageLog
    requests: list[str]  # URLs of every request the page made
    responses: list[tuple[str, int]]  # (URL, status) of every response it got


@pytest.fixture
async def page(browser: Browser, relay: RunningServer) -> AsyncIterator[BrowserPage]:
    """A page on the relay's origin, with its console errors and requests recorded."""
    context = await browser.new_context()
    try:
        tab = await context.new_page()
        log = PageLog()
        requests: list[str] = []
        tab.on("console", log.on_console)
        tab.on("pageerror", log.on_page_error)
        responses: list[tuple[str, int]] = []
        tab.on("request", lambda request: requests.append(request.url))
        tab.on("response", lambda response: responses.append((response.url, response.status)))
        response = await tab.goto(relay.url + "/healthz")
        assert response is not None and response.status == 200
        yield BrowserPage(tab, log, requests, responses)
    finally:
        await context.close()


async def upstream_text(simulator: SimulatorServer, body: dict[str, Any]) -> str:
    """Read one answer straight from the simulator (not through the relay)."""
    decoder = SSEDecoder()
    parts: list[str] = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{simulator.url}/chat/completions", json={**body, "stream": True}
    ) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    continue
                for choice in json.loads(event.data)["choices"]:
                    content = choice.get("delta", {}).get("content")
                    if content:
                        parts.append(content)
    return "".join(parts)


def prompts_seen(simulator: SimulatorServer) -> list[str]:
    """The last user message of each request the simulator received, in order."""
    return [entry["body"]["messages"][-1]["content"] for entry in simulator.stats.recent]


# ---------------------------------------------------------------------------


async def test_eventsource_one_shot_get_is_byte_exact(
    page: BrowserPage, simulator: SimulatorServer
) -> None:
    result = await page.page.evaluate(
        "async ([read, q]) => await (eval('(' + read + ')'))("
        "'/v1/chat/stream?model=echo&q=' + encodeURIComponent(q))",
        [JS_READ_EVENTSOURCE, TORTURE],
    )
    assert result["text"] == TORTURE
    assert result["doneData"]["finish_reason"] == "stop"
    assert simulator.stats.requests == 1
    assert prompts_seen(simulator) == [TORTURE]
    assert page.log.errors == []


async def test_eventsource_on_created_stream_is_byte_exact(
    page: BrowserPage, simulator: SimulatorServer
) -> None:
    result = await page.page.evaluate(
        """async ([read, q]) => {
          const created = await fetch("/v1/streams", {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({model: "echo", messages: [{role: "user", content: q}]}),
          });
          const stream = await created.json();
          const result = await (eval('(' + read + ')'))(stream.events_url);
          return {...result, status: created.status, stream};
        }""",
        [JS_READ_EVENTSOURCE, TORTURE],
    )
    assert result["status"] == 201
    stream_id = result["stream"]["id"]
    assert result["stream"]["events_url"] == f"/v1/streams/{stream_id}/events"
    assert result["text"] == TORTURE
    done = EVENT_ID.fullmatch(result["doneId"])
    assert done is not None, result["doneId"]
    assert done.group(1) == stream_id
    # Every delta's id belongs to the stream and the sequence only grows.
    seqs = []
    for event_id in result["ids"]:
        match = EVENT_ID.fullmatch(event_id)
        assert match is not None and match.group(1) == stream_id, event_id
        seqs.append(int(match.group(2)))
    assert seqs == sorted(set(seqs))
    assert seqs and int(done.group(2)) > seqs[-1]
    assert simulator.stats.requests == 1
    assert page.log.errors == []


async def test_fetch_reader_of_post_chat_stream_is_byte_exact(
    page: BrowserPage, simulator: SimulatorServer
) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": TORTURE}]}
    result = await page.page.evaluate(JS_FETCH_READER, body)
    assert result["status"] == 200
    assert result["type"].startswith("text/event-stream")
    assert result["text"] == TORTURE
    assert result["events"][-1] == "done"
    assert simulator.stats.requests == 1
    assert page.log.errors == []


async def test_closed_after_done_no_second_upstream_request_and_resume_gets_204(
    page: BrowserPage, simulator: SimulatorServer
) -> None:
    prompt = "no second bill\r\nplease 🙂"
    first = await page.page.evaluate(
        """async ([read, q]) => {
          const created = await fetch("/v1/streams", {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({model: "echo", messages: [{role: "user", content: q}]}),
          });
          const stream = await created.json();
          return {...(await (eval('(' + read + ')'))(stream.events_url)), stream};
        }""",
        [JS_READ_EVENTSOURCE, prompt],
    )
    assert first["text"] == prompt
    events_url = first["stream"]["events_url"]
    await wait_out_reconnects(page.page, first["stream"]["id"])
    assert simulator.stats.requests == 1
    assert prompts_seen(simulator) == [prompt]
    assert sum(url.endswith(events_url) for url in page.requests) == 1

    # Resuming after the final event: 204, which stops EventSource for good.
    await page.page.evaluate(
        """async ([url, lastId]) => await new Promise((resolve, reject) => {
          const es = new EventSource(url + "?lastEventId=" + encodeURIComponent(lastId));
          const seen = {open: 0, message: 0, errors: []};
          window.resumed = {es, seen};  // looked at again once a reconnect would have come
          es.onopen = () => { seen.open += 1; };
          es.onmessage = () => { seen.message += 1; };
          es.onerror = () => { seen.errors.push(es.readyState); resolve(); };
          setTimeout(() => reject(new Error("no error event: " + JSON.stringify(seen))), 10000);
        })""",
        [events_url, first["doneId"]],
    )
    # A reconnect after the 204 would show up as another error or open.
    await wait_out_reconnects(page.page, first["stream"]["id"])
    resumed = await page.page.evaluate(
        "() => ({...window.resumed.seen, readyState: window.resumed.es.readyState})")
    assert resumed == {"open": 0, "message": 0, "errors": [2], "readyState": 2}
    resume_requests = [url for url in page.requests if f"{events_url}?lastEventId=" in url]
    assert len(resume_requests) == 1, page.requests
    assert [status for url, status in page.responses if url == resume_requests[0]] == [204]
    assert simulator.stats.requests == 1
    # Chromium logs nothing for the 204; this test is held to the same rule.
    assert page.log.errors == []


@pytest.mark.parametrize("resume_style", ["bare", "polyfill"])
async def test_resume_by_last_event_id_query_continues_without_duplicates(
    page: BrowserPage, simulator: SimulatorServer, resume_style: str
) -> None:
    """Close the EventSource after 10 messages, reopen with ``?lastEventId=``.

    ``bare``: ``/v1/chat/stream?lastEventId=…`` alone. ``polyfill``: the
    original URL (prompt included) with ``&lastEventId=…`` appended, as
    event-source-polyfill does; the resume point must win over ``q``.
    """
    prompt = "tell me about rivers"
    simulate = {"rate": 30, "tokens": 60}
    reference = await upstream_text(
        simulator,
        {"model": "sim-small", "messages": [{"role": "user", "content": prompt}],
         "simulate": {"tokens": 60}},
    )
    assert len(reference) > 100
    simulator.stats.reset()

    result = await page.page.evaluate(
        """async ([q, simulate, style]) => await new Promise((resolve, reject) => {
          const url = "/v1/chat/stream?model=sim-small&q=" + encodeURIComponent(q)
            + "&extra=" + encodeURIComponent(JSON.stringify({simulate}));
          const parts = [];
          const ids = [];
          let lastId = "";
          let resumeUrl = null;
          let firstCount = null;
          const timer = setTimeout(
            () => reject(new Error("timeout; got " + JSON.stringify(parts.join("")))), 20000);
          const attach = (es, isFirst) => {
            es.onmessage = (e) => {
              lastId = e.lastEventId;
              ids.push(e.lastEventId);
              const data = JSON.parse(e.data);
              if (typeof data.content === "string") parts.push(data.content);
              if (isFirst && ids.length === 10) {
                // The network "blips": this connection is gone, a new one
                // resumes with the id of the last event seen, as a polyfill would.
                es.close();
                firstCount = ids.length;
                resumeUrl = (style === "bare" ? "/v1/chat/stream?" : url + "&")
                  + "lastEventId=" + encodeURIComponent(lastId);
                attach(new EventSource(resumeUrl), false);
              }
            };
            es.addEventListener("done", (e) => {
              es.close();
              clearTimeout(timer);
              resolve({text: parts.join(""), ids, doneId: e.lastEventId,
                       firstCount, resumeUrl,
                       doneData: JSON.parse(e.data)});
            });
            es.addEventListener("error", (e) => {
              es.close();
              clearTimeout(timer);
              reject(new Error("EventSource error; readyState " + es.readyState
                               + "; got " + JSON.stringify(parts.join(""))));
            });
          };
          attach(new EventSource(url), true);
        })""",
        [prompt, simulate, resume_style],
    )
    # The break really happened mid-stream, before the end.
    assert result["resumeUrl"] is not None
    assert result["firstCount"] == 10
    assert len(result["ids"]) > 10
    resumed = [status for url, status in page.responses if url.endswith(result["resumeUrl"])]
    assert resumed == [200]
    assert result["text"] == reference
    assert result["doneData"]["finish_reason"] == "stop"
    # No event twice, none skipped: one stream, numbered 1, 2, 3, … then done.
    matches = [EVENT_ID.fullmatch(event_id) for event_id in [*result["ids"], result["doneId"]]]
    assert all(matches), result["ids"]
    assert len({m.group(1) for m in matches if m}) == 1
    seqs = [int(m.group(2)) for m in matches if m]
    assert seqs == list(range(1, len(seqs) + 1))
    # One upstream request for the whole answer, even after a reconnect window.
    await wait_out_reconnects(page.page, matches[0].group(1))  # type: ignore[union-attr]
    assert simulator.stats.requests == 1
    assert prompts_seen(simulator) == [prompt]
    assert page.log.errors == []


async def test_no_console_errors_across_clients(
    page: BrowserPage, simulator: SimulatorServer
) -> None:
    """All three client styles on one page, then the page's console must be clean."""
    one_shot = await page.page.evaluate(
        "async ([read, q]) => await (eval('(' + read + ')'))("
        "'/v1/chat/stream?model=echo&q=' + encodeURIComponent(q))",
        [JS_READ_EVENTSOURCE, TORTURE],
    )
    fetched = await page.page.evaluate(
        JS_FETCH_READER, {"model": "echo", "messages": [{"role": "user", "content": TORTURE}]}
    )
    assert one_shot["text"] == TORTURE
    assert fetched["text"] == TORTURE
    # Late messages (a reconnect attempt) would land by the time this returns.
    stream_id = EVENT_ID.fullmatch(one_shot["doneId"])
    assert stream_id is not None
    await wait_out_reconnects(page.page, stream_id.group(1))
    assert simulator.stats.requests == 2
    assert page.log.errors == []
