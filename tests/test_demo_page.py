"""The demo page (``GET /``) and the browser client (``/static/streamsvc.js``), in real Chromium.

Like tests/test_browser.py, the browser is Debian's ``/usr/bin/chromium``
driven by Playwright, with the same flags; it is never downloaded, and a
missing Chromium fails the tests. The page is the one streamsvc serves, used
as a person would: pick a model, type, press Send or Stop.

The network blip is made by :class:`BlipProxy`, a TCP proxy between
Chromium and the relay that resets every open connection on demand.
Playwright's ``context.set_offline(True)`` is no substitute: measured, an
EventSource already streaming over loopback just goes on through it.

``UPDATE_DEMO_SCREENSHOT=1`` makes :func:`test_screenshot_mid_stream` write
docs/demo.png (the README shows it); without it the picture goes to a temp dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from playwright.async_api import Browser, Dialog, Page, Request, Response, Route

from streamsvc.server.routes_page import CONTENT_SECURITY_POLICY
from streamsvc.simulator import SimulatorServer, echo_tokens, generated_tokens
from tests.conftest import RunningServer, StartServer, relay_overrides, wait_until
from tests.test_browser import (
    EVENT_ID,
    RELAY_CONFIG,  # noqa: F401 - the short retry: for `relay` here
    TORTURE,
    PageLog,
    wait_out_reconnects,
)
from tests.test_readme import FENCE

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "streamsvc" / "static"
SCREENSHOT = ROOT / "docs" / "demo.png"

# The torture text, plus HTML that would run or load something if it were
# ever inserted as HTML (an alert, an image request to /x).
TORTURE_HTML = TORTURE + "\n<img src=x onerror=alert(2)> &amp; <b>not bold</b>\n"

# The client's public names, in both its forms.
CLIENT_API = ["SSEParser", "StreamsvcError", "chat", "chatFetch", "createStream", "listModels",
              "readEvents", "stopStream", "version"]


def textarea_value(text: str) -> str:
    """What a <textarea> gives for ``text``: its value has CR and CRLF turned into LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Seen:
    """One request the page made, and the status it got (None: no answer, e.g. cut)."""

    method: str
    url: str
    request: Request
    status: int | None = None


@dataclass
class DemoPage:
    page: Page
    log: PageLog
    seen: list[Seen] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def requests_to(self, method: str, pattern: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and re.search(pattern, s.url)]


async def open_page(browser: Browser, url: str) -> tuple[DemoPage, Any]:
    """A new context and tab on ``url``, recording console errors, requests and dialogs."""
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    tab = await context.new_page()
    demo = DemoPage(tab, PageLog())
    by_request: dict[int, Seen] = {}

    def on_request(request: Request) -> None:
        seen = Seen(request.method, request.url, request)
        by_request[id(request)] = seen
        demo.seen.append(seen)

    def on_response(response: Response) -> None:
        demo.responses.append(response)
        seen = by_request.get(id(response.request))
        if seen is not None:
            seen.status = response.status

    def on_dialog(dialog: Dialog) -> None:
        demo.dialogs.append(dialog.message)
        asyncio.ensure_future(dialog.dismiss())

    tab.on("console", demo.log.on_console)
    tab.on("pageerror", demo.log.on_page_error)
    tab.on("request", on_request)
    tab.on("response", on_response)
    tab.on("dialog", on_dialog)
    response = await tab.goto(url)
    assert response is not None and response.status == 200
    return demo, context


@pytest.fixture
async def demo(browser: Browser, relay: RunningServer) -> AsyncIterator[DemoPage]:
    """The demo page served by the relay, its model list loaded."""
    page, context = await open_page(browser, relay.url + "/")
    try:
        await page.page.wait_for_selector("#model:not([disabled])")
        yield page
    finally:
        await context.close()


@pytest.fixture
async def blank(browser: Browser, relay: RunningServer) -> AsyncIterator[DemoPage]:
    """A page on the relay's origin without the demo: for the client on its own."""
    page, context = await open_page(browser, relay.url + "/healthz")
    try:
        yield page
    finally:
        await context.close()


async def send(page: Page, prompt: str, *, model: str = "echo",
               extra: dict[str, Any] | None = None) -> None:
    """Pick the model, put the extra body fields in the options box, type, press Send."""
    await page.select_option("#model", model)
    if extra is not None:
        if not await page.eval_on_selector("details.options", "d => d.open"):
            await page.click("details.options summary")
        await page.fill("#extra", json.dumps(extra))
    await page.fill("#prompt", prompt)
    await page.click("#send")


async def wait_answer(page: Page, *states: str, timeout_ms: float = 20000) -> str:
    """Wait until the last answer is in one of ``states``; return its state."""
    state: str = await (await page.wait_for_function(
        """states => {
          const turns = document.querySelectorAll(".turn.assistant");
          const state = turns.length ? turns[turns.length - 1].dataset.state : null;
          return states.includes(state) ? state : null;
        }""",
        arg=list(states), timeout=timeout_ms,
    )).json_value()
    return state


async def last_answer(page: Page) -> dict[str, Any]:
    """The last answer's text, exactly as the DOM holds it, and what its element contains."""
    result: dict[str, Any] = await page.evaluate(
        """() => {
          const turns = document.querySelectorAll(".turn.assistant");
          const turn = turns[turns.length - 1];
          const text = turn.querySelector(".text");
          const error = turn.querySelector(".error");
          return {
            text: text.textContent,
            elements: text.children.length,
            allText: [...text.childNodes].every((node) => node.nodeType === Node.TEXT_NODE),
            whiteSpace: getComputedStyle(text).whiteSpace,
            state: turn.dataset.state,
            error: error.hidden ? null : error.textContent,
          };
        }"""
    )
    return result


async def events_shown(page: Page) -> int:
    return int(await page.text_content("#events") or "0")


def prompts_seen(simulator: SimulatorServer) -> list[list[dict[str, Any]]]:
    """The messages of each request the simulator received, in order."""
    return [entry["body"]["messages"] for entry in simulator.stats.recent]


class BlipProxy:
    """A TCP proxy in front of the relay; :meth:`cut` resets every open connection.

    That is a network blip as the browser sees it: the EventSource's response
    breaks mid-body, EventSource waits ``retry`` ms and reconnects (through
    the proxy again) with ``Last-Event-ID``.
    """

    def __init__(self, target: str) -> None:
        self._host, port = target.removeprefix("http://").split(":")
        self._port = int(port)
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""
        self.cuts = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    def cut(self) -> int:
        """Reset every open connection (both sides); returns how many there were."""
        pairs = list(self._live)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self.cuts += len(pairs)
        return len(pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        pair = (writer, up_writer)
        self._live.add(pair)
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._live.discard(pair)
            for pump in pumps:
                pump.cancel()
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass


# ---------------------------------------------------------------------------
# the files: types, headers, package data (plain HTTP, no browser)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/streamsvc.js", "text/javascript; charset=utf-8"),
        ("/static/streamsvc.mjs", "text/javascript; charset=utf-8"),
        ("/static/demo.mjs", "text/javascript; charset=utf-8"),
        ("/static/demo.css", "text/css; charset=utf-8"),
    ],
)
async def test_files_have_their_type_nosniff_csp_and_an_etag(
    relay: RunningServer, session: aiohttp.ClientSession, path: str, content_type: str
) -> None:
    async with session.get(relay.url + path) as response:
        assert response.status == 200
        body = await response.read()
        headers = response.headers
    assert headers["Content-Type"] == content_type
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    assert body == (STATIC / name).read_bytes()
    # Revalidated each time, and an unchanged file is a 304 without a body.
    assert headers["Cache-Control"] == "no-cache"
    async with session.get(relay.url + path,
                           headers={"If-None-Match": headers["ETag"]}) as again:
        assert again.status == 304
        assert await again.read() == b""
    async with session.head(relay.url + path) as head:
        assert head.status == 200
        assert head.headers["Content-Type"] == content_type


def test_the_policy_allows_own_scripts_only() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    "path",
    [
        "/static/nothing.js",
        "/static/",
        "/static/..%2Fserver%2Fapp.py",
        "/static/%2e%2e%2f__init__.py",
        "/static/../__init__.py",
        "/static/index.html/..",
    ],
)
async def test_anything_but_the_shipped_files_is_404(
    relay: RunningServer, session: aiohttp.ClientSession, path: str
) -> None:
    async with session.get(relay.url + path) as response:
        assert response.status == 404, path
        body = await response.json()
    assert body["error"]["code"] == "not_found"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def test_page_has_no_inline_script_style_or_foreign_url() -> None:
    parser = _Tags()
    parser.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts == [{"type": "module", "src": "/static/demo.mjs"}]
    assert parser.script_text == []
    for tag, attrs in parser.tags:
        assert "style" not in attrs, tag
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        for name in ("src", "href"):
            if attrs.get(name):
                assert str(attrs[name]).startswith("/static/"), (tag, attrs)
    # Nothing is fetched from another origin: no absolute URL in any shipped file.
    for path in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text("utf-8")), path
    # Model text never goes through an HTML sink.
    sinks = re.compile(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML\(|document\.write|"
                       r"\beval\(|new Function\(|\.setHTML")
    for path in STATIC.glob("*js"):
        assert not sinks.search(path.read_text(encoding="utf-8")), path.name


def test_a_build_ships_the_static_files(tmp_path: Path) -> None:
    """A non-editable install has the page: build a copy and look at what it ships.

    ``build_py`` is the step that picks the package data a wheel contains (a
    wheel is its output zipped); it needs nothing beyond setuptools.
    """
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "streamsvc", tmp_path / "streamsvc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()",
         "-q", "build_py", "--build-lib", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    built = {p.name for p in (tmp_path / "out" / "streamsvc" / "static").iterdir()}
    shipped = {p.name for p in STATIC.iterdir()}
    assert {"index.html", "demo.mjs", "demo.css", "streamsvc.js", "streamsvc.mjs"} <= shipped
    assert built == shipped


async def test_no_upstream_key_reaches_the_page(
    browser: Browser, start_server: StartServer, simulator: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-demo-" + os.urandom(8).hex()
    monkeypatch.setenv("DEMO_UPSTREAM_KEY", secret)
    overrides = relay_overrides(simulator.url)
    overrides["upstreams"]["sim"]["api_key_env"] = "DEMO_UPSTREAM_KEY"
    server = await start_server(overrides=overrides)
    page, context = await open_page(browser, server.url + "/")
    bodies: list[bytes] = []
    try:
        await page.page.wait_for_selector("#model:not([disabled])")
        await send(page.page, "is the key here?")
        assert await wait_answer(page.page, "done", "error") == "done"
        answer = await last_answer(page.page)
        # Every body the page got, but the event stream's (checked as text above).
        for response in page.responses:
            if response.request.resource_type != "eventsource":
                bodies.append(await response.body())
        sent_headers = [await seen.request.all_headers() for seen in page.seen]
    finally:
        await context.close()
    assert answer["text"] == "is the key here?"
    # The key was in use, toward the upstream only.
    assert simulator.stats.recent[-1]["headers"]["Authorization"] == f"Bearer {secret}"
    assert len(bodies) >= 5  # the page, its files, /v1/models, POST /v1/streams
    assert not [body for body in bodies if secret.encode() in body]
    assert secret not in json.dumps(sent_headers) + " ".join(seen.url for seen in page.seen)


# ---------------------------------------------------------------------------
# the demo page


async def test_page_loads_models_and_nothing_inline_runs(
    demo: DemoPage, relay: RunningServer
) -> None:
    models = await demo.page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)")
    assert models == ["echo", "sim-small", "sim-large"]  # what GET /v1/models lists
    assert demo.requests_to("GET", r"/v1/models$")[0].status == 200
    inline = await demo.page.evaluate("document.querySelectorAll('script:not([src])').length")
    assert inline == 0
    # The CSP is in force: an inline script added now does not run.
    ran = await demo.page.evaluate(
        """() => { window.__inline = false;
                   const s = document.createElement("script");
                   s.textContent = "window.__inline = true";
                   document.body.append(s);
                   return window.__inline; }"""
    )
    assert ran is False
    # ... and Chromium reported the refusal, which is the only console error.
    assert demo.log.errors and all("Content Security Policy" in e for e in demo.log.errors)


async def test_page_streams_the_torture_text_exactly(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    """Leading spaces, CR, LF, CRLF, blank lines, tabs, CJK, emoji and HTML, byte for byte.

    A <textarea> turns CR and CRLF into LF, so a typed prompt cannot carry
    them; a model can. The test checks the page sent what was typed, then
    puts the raw text in the request on its way, so that the echo model
    streams CRs back, and the DOM must hold them exactly.
    """
    sent: list[dict[str, Any]] = []

    async def restore_crs(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        sent.append(json.loads(json.dumps(body)))
        body["messages"][-1]["content"] = TORTURE_HTML
        await route.continue_(post_data=json.dumps(body))

    await demo.page.route("**/v1/streams", restore_crs)
    await send(demo.page, TORTURE_HTML)
    assert await wait_answer(demo.page, "done", "error") == "done"
    answer = await last_answer(demo.page)

    assert sent[0]["messages"] == [{"role": "user", "content": textarea_value(TORTURE_HTML)}]
    assert sent[0]["model"] == "echo"
    streamed = "".join(echo_tokens(TORTURE_HTML))
    assert streamed == TORTURE_HTML
    assert "\r" in answer["text"] and "\r\n" in answer["text"] and "\n\n\n" in answer["text"]
    assert answer["text"] == streamed
    # Text only: no element was made from the model's "<script>" or "<img>".
    assert answer["elements"] == 0 and answer["allText"]
    assert answer["whiteSpace"] == "pre-wrap"
    assert demo.dialogs == []
    assert not [s for s in demo.seen if s.url.endswith("/x")]
    # The user's own turn shows the prompt as typed (LF only), as text too.
    user = await demo.page.evaluate(
        "[...document.querySelectorAll('.turn.user .text')].pop().textContent")
    assert user == textarea_value(TORTURE_HTML)
    assert await demo.page.text_content("#status") == "done: stop"
    assert await demo.page.text_content("#tokens") == str(len(echo_tokens(TORTURE_HTML)))
    assert simulator.stats.requests == 1
    assert demo.log.errors == []


async def test_stop_cancels_the_upstream(demo: DemoPage, simulator: SimulatorServer) -> None:
    await send(demo.page, "a long answer please", model="sim-small",
               extra={"simulate": {"rate": 20, "tokens": 400}})
    await demo.page.wait_for_function("() => Number(document.querySelector('#events').textContent) >= 5")
    assert simulator.stats.active == 1
    clicked = time.monotonic()
    await demo.page.click("#stop")
    assert await wait_answer(demo.page, "stopped", "done", "error") == "stopped"
    assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=5)
    hung_up_after = time.monotonic() - clicked
    assert simulator.stats.active == 0
    assert simulator.stats.completed == 0  # it did not run to its end
    # The page asked for the stop (DELETE) and got it.
    assert len(demo.requests_to("POST", r"/v1/streams$")) == 1
    (stop,) = demo.requests_to("DELETE", r"/v1/streams/st_[0-9a-f]{24}$")
    assert stop.status == 200
    stopped_text = (await last_answer(demo.page))["text"]
    assert 0 < len(stopped_text) < len("".join(
        generated_tokens("sim-small", "a long answer please", 400)))
    await wait_out_reconnects(demo.page, await demo.page.text_content("#stream-id") or "")
    assert (await last_answer(demo.page))["text"] == stopped_text
    assert len(demo.requests_to("GET", r"/v1/streams/st_[0-9a-f]{24}/events")) == 1
    assert simulator.stats.requests == 1
    assert await demo.page.text_content("#status") == "stopped"
    assert await demo.page.is_enabled("#send") and not await demo.page.is_enabled("#stop")
    assert hung_up_after < 2.0, hung_up_after
    assert demo.log.errors == []


async def test_leaving_the_page_stops_the_generation_at_once(
    demo: DemoPage, relay: RunningServer, simulator: SimulatorServer
) -> None:
    """Without the page's pagehide DELETE, the upstream would run on for resume_grace_s (10 s).

    Regression: Chromium aborts the EventSource when the navigation starts,
    before pagehide, so the page must still know the stream id by then.
    """
    await send(demo.page, "x", model="sim-small", extra={"simulate": {"rate": 20, "tokens": 400}})
    await demo.page.wait_for_function("() => Number(document.querySelector('#events').textContent) >= 3")
    left = time.monotonic()
    await demo.page.goto(relay.url + "/healthz")
    assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=5)
    assert time.monotonic() - left < 3
    assert relay.config.journal.resume_grace_s == 10
    # (Playwright does not report a request sent by a page that is unloading,
    # so the upstream's hang-up is the evidence.)


async def test_network_blip_resumes_with_last_event_id(
    browser: Browser, relay: RunningServer, simulator: SimulatorServer
) -> None:
    prompt = "tell me about rivers"
    expected = "".join(generated_tokens("sim-small", prompt, 80))
    async with BlipProxy(relay.url) as proxy:
        page, context = await open_page(browser, proxy.url + "/")
        try:
            await page.page.wait_for_selector("#model:not([disabled])")
            await send(page.page, prompt, model="sim-small",
                       extra={"simulate": {"rate": 25, "tokens": 80}})
            await page.page.wait_for_function(
                "() => Number(document.querySelector('#events').textContent) >= 10")
            text_before = (await last_answer(page.page))["text"]
            assert proxy.cut() >= 1
            await page.page.wait_for_selector("#status[data-state='reconnecting']", timeout=5000)
            assert await wait_answer(page.page, "done", "error") == "done"
            answer = await last_answer(page.page)
            await wait_out_reconnects(page.page,
                                      await page.page.text_content("#stream-id") or "")
            resumes = await page.page.text_content("#reconnects")
            reads = page.requests_to("GET", r"/v1/streams/st_[0-9a-f]{24}/events")
            sent_headers = [await read.request.all_headers() for read in reads]
        finally:
            await context.close()
    # No text twice, none missing: exactly the model's answer.
    assert answer["text"] == expected
    assert answer["text"].startswith(text_before) and len(text_before) < len(expected)
    assert resumes == "1"
    # One POST; the events URL twice, the second time with the Last-Event-ID of the cut.
    assert len(page.requests_to("POST", r"/v1/streams$")) == 1
    first, second = reads
    assert first.url == second.url
    assert "last-event-id" not in sent_headers[0]
    resume_id = EVENT_ID.fullmatch(sent_headers[1]["last-event-id"])
    assert resume_id is not None and first.url.endswith(f"/{resume_id.group(1)}/events")
    assert int(resume_id.group(2)) >= 10
    assert second.status == 200
    # The model was asked once, and the stream ran to its end, not cancelled.
    assert simulator.stats.requests == 1
    assert simulator.stats.completed == 1 and simulator.stats.disconnected == 0
    # Chromium logs the cut response itself, once; the page logs nothing.
    (cut,) = page.log.errors
    assert "net::ERR_INCOMPLETE_CHUNKED_ENCODING" in cut and first.url in cut, cut


async def test_client_closes_after_done_and_the_upstream_sees_one_request(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    await send(demo.page, "just once")
    assert await wait_answer(demo.page, "done", "error") == "done"
    await wait_out_reconnects(demo.page, await demo.page.text_content("#stream-id") or "")
    assert simulator.stats.requests == 1
    assert len(demo.requests_to("POST", r"/v1/streams$")) == 1
    (events,) = demo.requests_to("GET", r"/v1/streams/st_[0-9a-f]{24}/events")
    assert events.status == 200
    assert (await last_answer(demo.page))["text"] == "just once"
    assert demo.log.errors == []


async def test_history_goes_with_each_request_and_new_chat_forgets_it(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    await send(demo.page, "first question")
    assert await wait_answer(demo.page, "done") == "done"
    await send(demo.page, "  second,\nindented")
    assert await wait_answer(demo.page, "done") == "done"
    await demo.page.click("#new-chat")
    assert await demo.page.evaluate("document.querySelectorAll('.turn').length") == 0
    await send(demo.page, "fresh start")
    assert await wait_answer(demo.page, "done") == "done"
    assert prompts_seen(simulator) == [
        [{"role": "user", "content": "first question"}],
        [{"role": "user", "content": "first question"},
         {"role": "assistant", "content": "first question"},
         {"role": "user", "content": "  second,\nindented"}],
        [{"role": "user", "content": "fresh start"}],
    ]
    assert demo.log.errors == []


async def test_status_line_shows_first_token_time_rate_and_tokens(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    prompt = "one two three four five six seven eight"
    await send(demo.page, prompt, extra={"simulate": {"first_token_delay": 0.6, "rate": 10}})
    assert await wait_answer(demo.page, "done") == "done"
    ttft = re.fullmatch(r"(\d+) ms", await demo.page.text_content("#ttft") or "")
    assert ttft is not None and 600 <= int(ttft.group(1)) < 3000, ttft
    events = int(await demo.page.text_content("#events") or "0")
    assert 1 <= events <= len(echo_tokens(prompt))
    rate = float(await demo.page.text_content("#rate") or "0")
    assert 0 < rate < 200  # 10 tokens per second (0.7 s: a rate is shown), merged or not
    assert await demo.page.is_visible("#tokens-stat")
    assert await demo.page.text_content("#tokens") == str(len(echo_tokens(prompt)))
    assert await demo.page.text_content("#reconnects") == "0"
    stream_id = await demo.page.text_content("#stream-id") or ""
    assert re.fullmatch(r"st_[0-9a-f]{24}", stream_id)
    assert demo.log.errors == []


async def test_an_instant_answer_shows_no_rate(demo: DemoPage, simulator: SimulatorServer
                                             ) -> None:
    # Every event within a few milliseconds: a rate over that would read thousands a second.
    await send(demo.page, "one two three four five six seven eight nine ten")
    assert await wait_answer(demo.page, "done") == "done"
    assert await events_shown(demo.page) >= 1
    assert await demo.page.text_content("#rate") == "–"


async def footer_lines(page: Page) -> dict[str, Any]:
    """How the footer lays out: its rows of items, and whether anything overflows."""
    layout: dict[str, Any] = await page.evaluate(
        """() => {
          const footer = document.querySelector("footer");
          const boxes = [...footer.children].filter((e) => e.offsetParent !== null)
            .map((e) => e.getBoundingClientRect()).sort((a, b) => a.top - b.top);
          let rows = 0, bottom = -Infinity;
          for (const box of boxes) {  // a row starts below the bottom of the one before
            if (box.top >= bottom) { rows += 1; bottom = box.bottom; }
            bottom = Math.max(bottom, box.bottom);
          }
          return {
            rows,
            overflows: footer.scrollWidth > footer.clientWidth,
            status: document.querySelector("#status").textContent,
            title: document.querySelector("#status").title,
          };
        }"""
    )
    return layout


async def test_a_long_status_keeps_the_footer_on_one_line(demo: DemoPage) -> None:
    await demo.page.click("details.options summary")
    await demo.page.fill("#extra", "[1]")
    await demo.page.fill("#prompt", "hello")
    await demo.page.click("#send")
    layout = await footer_lines(demo.page)
    assert layout["status"].startswith("bad_request: Request options: expected a JSON object")
    assert layout["title"] == layout["status"]  # the whole text, on hover
    assert layout["rows"] == 1 and not layout["overflows"], layout
    # On a phone the status takes a line of its own, and nothing runs off the side.
    await demo.page.set_viewport_size({"width": 400, "height": 640})
    layout = await footer_lines(demo.page)
    assert not layout["overflows"], layout


async def test_error_event_is_shown_and_nothing_is_resent(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    prompt = "one two three four five six"
    await send(demo.page, prompt, extra={"simulate": {"fault": "drop", "fault_at": 3},
                                         "streamsvc": {"retries": False}})
    assert await wait_answer(demo.page, "done", "error") == "error"
    answer = await last_answer(demo.page)
    assert answer["text"] == "one two three"  # what came before the fault stays
    assert answer["error"] == ("upstream_error: upstream 'sim' stopped mid-stream: the"
                               " connection closed before the answer was complete")
    assert await demo.page.text_content("#status") == "error: upstream_error"
    assert await demo.page.input_value("#prompt") == prompt  # back in the box for another try
    assert await demo.page.is_visible(".turn.assistant .error")
    await wait_out_reconnects(demo.page, await demo.page.text_content("#stream-id") or "")
    assert len(demo.requests_to("GET", r"/v1/streams/st_[0-9a-f]{24}/events")) == 1
    assert simulator.stats.requests == 1
    assert demo.log.errors == []


async def test_refused_request_shows_the_servers_error(
    demo: DemoPage, simulator: SimulatorServer
) -> None:
    # Bad options never leave the page.
    await demo.page.click("details.options summary")
    await demo.page.fill("#extra", "{not json")
    await demo.page.fill("#prompt", "hello")
    await demo.page.click("#send")
    assert (await demo.page.text_content("#status") or "").startswith(
        "bad_request: Request options: not JSON")
    assert demo.requests_to("POST", r"/v1/streams$") == []
    # A body the server refuses: its typed error is shown, with the field it names.
    await send(demo.page, "hello", extra={"n": 0})
    assert await wait_answer(demo.page, "done", "error") == "error"
    answer = await last_answer(demo.page)
    assert answer["error"] is not None
    assert answer["error"].startswith("bad_request (HTTP 400): n: ")
    assert simulator.stats.requests == 0
    # Chromium itself logs the 400 of a fetch; that is the only console error.
    assert len(demo.log.errors) == 1 and "400" in demo.log.errors[0], demo.log.errors


async def test_screenshot_mid_stream(
    demo: DemoPage, simulator: SimulatorServer, tmp_path: Path
) -> None:
    # Prompts whose simulated answers are in Latin script: the CI machine has
    # no CJK or emoji font, and the picture should show letters, not boxes.
    await demo.page.set_viewport_size({"width": 900, "height": 700})
    await send(demo.page, "What problem does this service solve?", model="sim-small",
               extra={"simulate": {"tokens": 30}})
    assert await wait_answer(demo.page, "done") == "done"
    await send(demo.page, "And if the Wi-Fi drops mid-answer?", model="sim-large",
               extra={"simulate": {"rate": 12, "tokens": 200, "first_token_delay": 0.2}})
    await demo.page.click("details.options summary")  # fold the options away again
    await demo.page.wait_for_function("() => Number(document.querySelector('#events').textContent) >= 28")
    target = SCREENSHOT if os.environ.get("UPDATE_DEMO_SCREENSHOT") else tmp_path / "demo.png"
    # Animations off: the streaming caret is shown, never caught mid-blink.
    png = await demo.page.screenshot(path=str(target), animations="disabled")
    assert (await last_answer(demo.page))["state"] == "streaming"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 900 and int.from_bytes(png[20:24], "big") == 700
    assert demo.log.errors == []


# ---------------------------------------------------------------------------
# the client on its own: classic script, ES module, fetch reader


async def test_client_as_a_classic_script(blank: DemoPage, simulator: SimulatorServer) -> None:
    await blank.page.add_script_tag(url="/static/streamsvc.js")
    names = await blank.page.evaluate("Object.keys(globalThis.streamsvc).sort()")
    assert names == CLIENT_API
    result = await blank.page.evaluate(
        """async (q) => {
          const deltas = [];
          const result = await streamsvc.chat(
            {model: "echo", messages: [{role: "user", content: q}]},
            {onDelta: (delta, id) => deltas.push([delta, id])});
          return {...result, deltas};
        }""",
        TORTURE,
    )
    assert result["text"] == TORTURE
    assert result["finishReason"] == "stop"
    assert result["reconnects"] == 0
    assert result["events"] == len(result["deltas"]) > 1
    ids = [EVENT_ID.fullmatch(event_id) for _, event_id in result["deltas"]]
    assert all(m is not None and m.group(1) == result["streamId"] for m in ids)
    assert "".join(d.get("content", "") for d, _ in result["deltas"]) == TORTURE
    await wait_out_reconnects(blank.page, result["streamId"])
    assert simulator.stats.requests == 1
    assert len(blank.requests_to("GET", r"/events$")) == 1
    assert blank.log.errors == []


async def test_client_as_an_es_module(blank: DemoPage, simulator: SimulatorServer) -> None:
    # A <script type="module"> with a static import, as a page would write it.
    await blank.page.add_script_tag(
        type="module",
        content='import { chat, StreamsvcError } from "/static/streamsvc.mjs";\n'
                'window.fromModule = { chat, StreamsvcError };',
    )
    await blank.page.wait_for_function("() => window.fromModule !== undefined")
    result = await blank.page.evaluate(
        """async (q) => {
          const module = await import("/static/streamsvc.mjs");
          const names = Object.keys(module).filter((n) => n !== "default").sort();
          const answer = await module.chat({model: "echo", messages: [{role: "user", content: q}]});
          return {names, text: answer.text, same: module.default === globalThis.streamsvc,
                  staticImport: window.fromModule.chat === module.chat};
        }""",
        TORTURE,
    )
    assert result == {"names": CLIENT_API, "text": TORTURE, "same": True, "staticImport": True}
    assert simulator.stats.requests == 1
    assert blank.log.errors == []


async def test_client_errors_are_typed(blank: DemoPage, simulator: SimulatorServer) -> None:
    await blank.page.add_script_tag(url="/static/streamsvc.js")
    errors = await blank.page.evaluate(
        """async () => {
          const caught = async (promise) => {
            try { await promise; return null; } catch (e) {
              return {isTyped: e instanceof streamsvc.StreamsvcError, name: e.name, code: e.code,
                      status: e.status, param: e.param, retryable: e.retryable,
                      streamId: e.streamId, message: e.message};
            }
          };
          const body = (extra) => ({model: "echo", messages: [{role: "user", content: "a b c d"}],
                                    ...extra});
          return {
            refused: await caught(streamsvc.chat(body({messages: []}))),
            midStream: await caught(streamsvc.chat(body({
              simulate: {fault: "error_event", fault_at: 2}, streamsvc: {retries: false}}))),
            fetchMidStream: await caught(streamsvc.chatFetch(body({
              simulate: {fault: "error_event", fault_at: 2}, streamsvc: {retries: false}}))),
            noSuchStream: await caught(streamsvc.readEvents("/v1/streams/st_" + "0".repeat(24)
                                                            + "/events")),
          };
        }"""
    )
    refused = errors["refused"]
    assert refused["isTyped"] and refused["name"] == "StreamsvcError"
    assert (refused["code"], refused["status"], refused["param"]) == ("bad_request", 400,
                                                                      "messages")
    for key in ("midStream", "fetchMidStream"):
        error = errors[key]
        assert error["isTyped"] and error["code"] == "upstream_error", error
        assert error["status"] is None
        assert re.fullmatch(r"st_[0-9a-f]{24}", error["streamId"]), error
    assert errors["noSuchStream"]["code"] == "network_error"
    assert simulator.stats.requests == 2
    # Chromium logs the 400 and the 404 itself; nothing else is logged.
    assert len(blank.log.errors) == 2, blank.log.errors


async def test_client_abort_stops_the_generation(
    blank: DemoPage, simulator: SimulatorServer
) -> None:
    await blank.page.add_script_tag(url="/static/streamsvc.js")
    result = await blank.page.evaluate(
        """async () => {
          const controller = new AbortController();
          let deltas = 0;
          try {
            await streamsvc.chat(
              {model: "sim-small", messages: [{role: "user", content: "x"}],
               simulate: {rate: 20, tokens: 400}},
              {signal: controller.signal,
               onDelta: () => { if (++deltas === 3) controller.abort(); }});
            return {resolved: true};
          } catch (e) {
            return {name: e.name, deltas};
          }
        }"""
    )
    assert result == {"name": "AbortError", "deltas": 3}
    # The DELETE was sent before the promise settled; the upstream hangs up.
    (stop,) = blank.requests_to("DELETE", r"/v1/streams/st_[0-9a-f]{24}$")
    assert await wait_until(lambda: stop.status == 200, timeout=3)
    assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=3)

    # Aborted while POST /v1/streams is still on its way: the stream it
    # creates is deleted as soon as its id is known, and nothing is read.
    early = await blank.page.evaluate(
        """async () => {
          const controller = new AbortController();
          const answer = streamsvc.chat(
            {model: "sim-small", messages: [{role: "user", content: "y"}],
             simulate: {rate: 20, tokens: 400}},
            {signal: controller.signal, onStream: () => { throw new Error("read anyway"); }});
          setTimeout(() => controller.abort(), 0);
          try { await answer; return "resolved"; } catch (e) { return e.name; }
        }"""
    )
    assert early == "AbortError"
    # The DELETE may even beat the upstream request, which is then never sent:
    # either way nothing reaches the simulator that is not hung up on.
    stats = simulator.stats
    assert await wait_until(
        lambda: stats.active == 0 and stats.disconnected == stats.requests, timeout=3)
    assert stats.completed == 0
    assert len(blank.requests_to("DELETE", r"/v1/streams/st_[0-9a-f]{24}$")) == 2
    assert len(blank.requests_to("GET", r"/events$")) == 1  # the first stream's only
    assert blank.log.errors == []


async def test_fetch_reader_is_byte_exact_and_abort_hangs_up(
    blank: DemoPage, simulator: SimulatorServer
) -> None:
    await blank.page.add_script_tag(url="/static/streamsvc.js")
    result = await blank.page.evaluate(
        """async (q) => {
          const whole = await streamsvc.chatFetch(
            {model: "echo", messages: [{role: "user", content: q}]});
          const controller = new AbortController();
          let deltas = 0;
          let aborted = null;
          try {
            await streamsvc.chatFetch(
              {model: "sim-small", messages: [{role: "user", content: "x"}],
               simulate: {rate: 20, tokens: 400}},
              {signal: controller.signal,
               onDelta: () => { if (++deltas === 3) controller.abort(); }});
          } catch (e) {
            aborted = e.name;
          }
          return {whole, aborted, deltas};
        }""",
        TORTURE,
    )
    whole = result["whole"]
    assert whole["text"] == TORTURE
    assert whole["finishReason"] == "stop"
    assert whole["usage"]["completion_tokens"] == len(echo_tokens(TORTURE))
    assert re.fullmatch(r"st_[0-9a-f]{24}", whole["streamId"])
    assert result["aborted"] == "AbortError" and result["deltas"] == 3
    # Not resumable: the hang-up alone stops the upstream, with no DELETE.
    assert await wait_until(lambda: simulator.stats.disconnected == 1, timeout=3)
    assert blank.requests_to("DELETE", r".") == []
    assert simulator.stats.requests == 2
    assert blank.log.errors == []


def browser_md_html_examples() -> list[str]:
    """The two HTML examples of docs/browser.md: the plain script, then the module with Stop."""
    text = (ROOT / "docs" / "browser.md").read_text(encoding="utf-8")
    return [m["body"] for m in FENCE.finditer(text)
            if m["lang"] == "html" and "/static/streamsvc" in m["body"]]


async def test_browser_md_examples_run_as_shown(
    blank: DemoPage, relay: RunningServer, simulator: SimulatorServer
) -> None:
    classic, module = browser_md_html_examples()
    logged: list[str] = []
    blank.page.on("console", lambda message: logged.append(message.text))

    def serve(html: str) -> Callable[[Route], Awaitable[None]]:
        return lambda route: route.fulfill(body=html, content_type="text/html")

    for name, html in (("classic", classic), ("module", module)):
        await blank.page.route(f"{relay.url}/example-{name}", serve(html))
    await blank.page.goto(f"{relay.url}/example-classic")
    assert await wait_until(lambda: "Hi" in logged, timeout=10)
    await blank.page.goto(f"{relay.url}/example-module")
    await blank.page.wait_for_function(
        "() => document.getElementById('out').textContent === 'Hello there'")
    assert await wait_until(lambda: any(line.startswith("stop ") for line in logged), timeout=5)
    assert prompts_seen(simulator) == [[{"role": "user", "content": "Hi"}],
                                       [{"role": "user", "content": "Hello there"}]]
    assert blank.log.errors == []


# Each case: the text fed in pieces, and the events the WHATWG rules give.
SSE_CASES = {
    "whatwg-example-stock": (
        "data: YHOO\ndata: +2\ndata: 10\n\n",
        [["message", "YHOO\n+2\n10", ""]],
    ),
    "whatwg-example-comment-and-id": (
        ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
        [["message", "first event", "1"], ["message", "second event", ""],
         ["message", " third event", ""]],
    ),
    "whatwg-example-empty-data": (
        "data\n\ndata\ndata\n\ndata:",
        [["message", "", ""], ["message", "\n", ""]],
    ),
    "line-endings": (
        "\ufeffevent: done\r\ndata: a\rdata: b\r\n\r\nid: x\x00y\ndata: c\n\n",
        [["done", "a\nb", ""], ["message", "c", ""]],
    ),
    "streamsvc-frames": (
        ('retry: 1000\n\n: ping\n\nid: st_1:1\ndata: {"content": " hi"}\n\n'
         'event: done\nid: st_1:2\ndata: {"finish_reason": "stop"}\n\n'),
        [["message", '{"content": " hi"}', "st_1:1"],
         ["done", '{"finish_reason": "stop"}', "st_1:2"]],
    ),
}


async def test_sse_parser_of_the_fetch_reader_follows_the_whatwg_rules(blank: DemoPage) -> None:
    """Fed whole, one character at a time, and split after every CR, the events are the same."""
    await blank.page.add_script_tag(url="/static/streamsvc.js")
    results = await blank.page.evaluate(
        """(texts) => {
          const run = (pieces) => {
            const parser = new streamsvc.SSEParser();
            const events = [];
            for (const piece of pieces) events.push(...parser.feed(piece));
            events.push(...parser.feed("", true));
            return {events: events.map((e) => [e.type, e.data, e.lastEventId]),
                    retry: parser.retry};
          };
          return Object.fromEntries(Object.entries(texts).map(([name, text]) =>
            [name, [run([text]), run([...text]), run(text.split(/(?<=\\r)/))]]));
        }""",
        {name: text for name, (text, _) in SSE_CASES.items()},
    )
    for name, (text, expected) in SSE_CASES.items():
        for fed in results[name]:
            assert fed["events"] == expected, name
        assert results[name][0]["retry"] == (1000 if "retry:" in text else None), name


async def test_a_continued_answer_is_whole_and_its_seam_is_marked(
    browser: Browser, start_server: StartServer, simulator: SimulatorServer,
) -> None:
    relay = await start_server(overrides=relay_overrides(simulator.url, pipeline={
        "continue_on_failure": True, "retry_backoff_base_ms": 1}))
    page, context = await open_page(browser, relay.url + "/")
    try:
        await page.page.wait_for_selector("#model:not([disabled])")
        prompt = "one two three four five six seven eight nine"
        await send(page.page, prompt, extra={"simulate": {
            "fault": "drop", "fault_at": 3, "fail_times": 1, "key": "demo-seam"}})
        assert await wait_answer(page.page, "done", "error") == "done"
        answer = await last_answer(page.page)
        assert answer["text"] == prompt  # nothing lost, nothing repeated
        title = await page.page.get_attribute(".turn.assistant .seam", "title")
        assert title == "continued on sim after sim failed (upstream_error)"
        assert simulator.stats.requests == 2
        assert page.log.errors == []
    finally:
        await context.close()
