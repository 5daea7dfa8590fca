"""Two streamsvc instances on one Redis behind a real nginx, set up as docs/deployment.md says.

What runs, all of it started and killed by the test (nothing as a daemon):

* one ``redis-server`` (the ``redis_server`` fixture);
* two ``streamsvc serve`` processes, A and B, with ``config/multi-instance.toml``
  and the environment of :func:`_instance_env`. A restarted instance comes back
  on its own port, as under systemd, so the processes are started here with a
  chosen ``--port`` (``spawn_serve`` picks a new free port each time);
* nginx (``streamsvc.bench.nginx``: the same binary and foreground command as
  the benchmark, everything under a temporary prefix) running the block of
  docs/deployment.md marked ``# streamsvc-test: nginx-multi``, word for word
  except for :data:`SUBSTITUTIONS`: the two instances' addresses, the
  ``listen`` line and the access log path. The block goes into a minimal main
  config (:data:`MAIN_CONFIG`) by ``include``.

Auth is on, with one key and the shared ticket secret, so every event stream
is read with a ``?ticket=`` the way EventSource must, and every reconnect that
lands on the other instance (or on a restarted one) needs the shared secret
and the ticket bindings in Redis.

Rolling restarts are the procedure of docs/deployment.md: SIGTERM one
instance, wait for it to exit (0), start it again, wait for ``/readyz``, then
the next one. Readers reconnect the way EventSource does: after the stream's
``retry:`` delay, to nginx, with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import aiohttp
import pytest
from playwright.async_api import Browser
from redis.asyncio import Redis

from streamsvc.bench.nginx import nginx_binary, nginx_command
from streamsvc.sse import ServerSentEvent, SSEDecoder
from tests.conftest import answers_ok, free_port, spawn_serve, wait_until
from tests.helpers import expected, story, text_of
from tests.redis_server import RedisServer
from tests.test_browser import PageLog
from tests.test_readme import FENCE

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT_MD = ROOT / "docs" / "deployment.md"
MULTI_INSTANCE_TOML = ROOT / "config" / "multi-instance.toml"
NGINX_MARKER = "# streamsvc-test: nginx-multi"

API_KEY = "sk-nginx-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PREFIX = "streamsvc:"  # journal.redis_prefix of config/multi-instance.toml

# The doc's block with these replaced (each must occur exactly once): the test's
# ports and paths, nothing else. Values are filled in by :func:`_nginx_config`.
SUBSTITUTIONS = ("server 127.0.0.1:8081", "server 127.0.0.1:8082", "listen 80;",
                 "/var/log/nginx/streamsvc.log")

MAIN_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/streamsvc.conf;
}}
"""

# An access line of the doc's log format: method, path, status, which instance(s).
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d+) .*'
                         r"upstream=(?P<upstream>.*)$")


def _instance_env(redis_url: str, extra: dict[str, str]) -> dict[str, str]:
    """config/multi-instance.toml, with only what a test on one machine must change."""
    return {
        "STREAMSVC_CONFIG": str(MULTI_INSTANCE_TOML),
        "STREAMSVC__SERVER__HOST": "127.0.0.1",  # the file listens on every interface
        "STREAMSVC__SERVER__SSE_RETRY_MS": "300",  # readers come back sooner: a shorter test
        "STREAMSVC__JOURNAL__BACKEND": "redis",  # as the file says
        "STREAMSVC__JOURNAL__REDIS_URL": redis_url,
        # Short enough for a quick test, long enough that a writer held up by instances
        # starting on a busy 2-core machine keeps its lease (a lapsed lease while it still
        # writes is the false instance_lost that docs/configuration.md describes).
        "STREAMSVC__JOURNAL__WRITER_LEASE_S": "3.0",
        # The file's upstreams are OpenAI and a local Ollama: the built-in simulator here.
        "STREAMSVC__UPSTREAMS__OPENAI__BASE_URL": "builtin:simulator",
        "STREAMSVC__UPSTREAMS__BACKUP__BASE_URL": "builtin:simulator",
        # One test key runs 20-odd streams at once; the limit is not under test here.
        "STREAMSVC__LIMITS__MAX_STREAMS_PER_KEY": "0",
        "STREAMSVC_API_KEYS": API_KEY,
        "STREAMSVC_TICKET_SECRET": "shared-by-every-instance-of-the-test",
        **extra,
    }


def _doc_nginx_block() -> str:
    text = DEPLOYMENT_MD.read_text(encoding="utf-8")
    found = [m["body"] for m in FENCE.finditer(text)
             if m["lang"] == "nginx" and NGINX_MARKER in m["body"]]
    assert len(found) == 1, f"docs/deployment.md: one nginx block marked {NGINX_MARKER!r}"
    return found[0]


def _nginx_config(prefix: Path, *, port: int, instances: list[int]) -> str:
    values = (f"server 127.0.0.1:{instances[0]}", f"server 127.0.0.1:{instances[1]}",
              f"listen 127.0.0.1:{port};", str(prefix / "access.log"))
    block = _doc_nginx_block()
    for old, new in zip(SUBSTITUTIONS, values, strict=True):
        assert block.count(old) == 1, f"the doc's nginx block must contain {old!r} once"
        block = block.replace(old, new)
    return block


# ---------------------------------------------------------------------------
# the processes


@dataclass
class Instance:
    """One ``streamsvc serve`` on a fixed port; ``journal_id`` is its writer id in Redis."""

    name: str
    port: int
    log: IO[bytes]
    process: subprocess.Popen[bytes] | None = None
    journal_id: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(encoding="utf-8", errors="replace")
        return f"--- {self.name} log ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """Redis, instances A and B, and nginx in front of them."""

    redis: RedisServer
    client: Redis
    instances: list[Instance]
    env: dict[str, str]
    prefix: Path
    nginx: subprocess.Popen[bytes] | None = None
    nginx_port: int = 0
    post_retries: list[int] = field(default_factory=list)  # statuses a POST was retried on

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    async def start(self, instance: Instance) -> None:
        """Start ``instance`` on its port; wait for ``/readyz``; learn its writer id."""
        before = await self._leases()
        try:
            instance.process, _ = await spawn_serve(self.env, port=instance.port,
                                                    stderr=instance.log)
        except AssertionError as exc:
            raise AssertionError(f"{instance.name} did not start\n{instance.log_tail()}") from exc
        (instance.journal_id,) = await self._leases() - before

    async def stop(self, instance: Instance) -> int:
        """SIGTERM and wait for the exit (the drain); returns the exit status."""
        assert instance.process is not None
        instance.process.send_signal(signal.SIGTERM)
        return await self.exited(instance)

    async def exited(self, instance: Instance, timeout: float = 30) -> int:
        """Wait for ``instance`` to exit; returns its exit status."""
        assert instance.process is not None
        deadline = time.monotonic() + timeout
        while instance.process.poll() is None:
            if time.monotonic() > deadline:
                instance.process.send_signal(signal.SIGUSR1)  # it logs what it waits on
                await asyncio.sleep(1.0)
                raise AssertionError(f"{instance.name} did not exit after SIGTERM\n"
                                     f"{instance.log_tail(200)}")
            await asyncio.sleep(0.05)
        return instance.process.returncode

    async def restart(self, instance: Instance) -> float:
        """One step of the rolling restart; returns when SIGTERM was sent."""
        sent = time.monotonic()
        status = await self.stop(instance)
        assert status == 0, f"{instance.name} exited {status}\n{instance.log_tail()}"
        await self.start(instance)
        return sent

    async def start_nginx(self) -> None:
        binary = nginx_binary()
        assert binary is not None, "nginx is not installed (CI installs nginx-light)"
        self.nginx_port = free_port()
        site = _nginx_config(self.prefix, port=self.nginx_port,
                             instances=[i.port for i in self.instances])
        (self.prefix / "streamsvc.conf").write_text(site, encoding="utf-8")
        config = self.prefix / "nginx.conf"
        config.write_text(MAIN_CONFIG.format(prefix=self.prefix), encoding="utf-8")
        self.nginx = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            nginx_command(binary, self.prefix, config),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert await answers_ok(self.url + "/healthz", self.nginx, 10), (
            "nginx did not start: " + self.nginx_errors())

    def nginx_errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def access_log(self) -> list[re.Match[str]]:
        """The access lines nginx wrote so far (it writes each when its request ends)."""
        path = self.prefix / "access.log"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return [m for m in map(ACCESS_LINE.search, lines) if m is not None]

    async def served(self, path: str, requests: int) -> list[str]:
        """The upstream address of each request to ``path``, once nginx has logged ``requests``.

        nginx writes a line when it has finished the request, which may be after the
        client has read the whole answer: wait for the line, not for a while.
        """
        def lines() -> list[str]:
            return [m["upstream"] for m in self.access_log() if m["path"] == path]

        assert await wait_until(lambda: len(lines()) >= requests, timeout=10), lines()
        return lines()

    def by_address(self, address: str) -> Instance:
        (instance,) = [i for i in self.instances if i.address == address]
        return instance

    async def _leases(self) -> set[str]:
        keys = await self.client.keys(f"{PREFIX}i:*")
        return {key.decode().removeprefix(f"{PREFIX}i:") for key in keys}

    async def generator_of(self, stream_id: str) -> Instance:
        """The instance whose generation writes ``stream_id`` (the journal's open entry)."""
        opened = await self.client.xrange(f"{PREFIX}s:{stream_id}", "0-1", "0-1")
        writer = opened[0][1][b"instance"].decode()
        (instance,) = [i for i in self.instances if i.journal_id == writer]
        return instance

    async def stream_count(self) -> int:
        """How many streams were ever started (each is one generation, one upstream request)."""
        return len(await self.client.keys(f"{PREFIX}s:*"))

    async def post(self, session: aiohttp.ClientSession, url: str,
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST with the key; a 503 (``shutting_down``) or nginx's 502 is retried, as documented.

        nginx resends a POST only when it could not send it; one that reached
        a draining instance comes back here. Nothing was started then.
        """
        for _ in range(20):
            async with session.post(url, json=body, headers=AUTH) as response:
                if response.status in (502, 503):
                    self.post_retries.append(response.status)
                    await asyncio.sleep(0.1)
                    continue
                assert response.status == 201, (response.status, await response.text())
                result: dict[str, Any] = await response.json()
                return result
        raise AssertionError(f"POST {url}: 20 times 502/503")


StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[StartCluster]:
    """Factory: ``await start_cluster(**env)``; everything it started is killed afterwards."""
    clusters: list[Cluster] = []
    logs: list[IO[bytes]] = []

    async def start(**env: str) -> Cluster:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        instances = []
        for name in "AB":
            log = (tmp_path / f"{name}.log").open("ab")
            logs.append(log)
            instances.append(Instance(name, free_port(), log))
        cluster = Cluster(redis_server, Redis.from_url(redis_server.url), instances,
                          _instance_env(redis_server.url, env), prefix)
        clusters.append(cluster)
        for instance in instances:
            await cluster.start(instance)  # one by one: each one's lease tells its id
        await cluster.start_nginx()
        return cluster

    try:
        yield start
    finally:
        for cluster in clusters:
            for process in [i.process for i in cluster.instances] + [cluster.nginx]:
                if process is not None and process.poll() is None:
                    process.kill()
                if process is not None:
                    process.wait(timeout=30)
            await cluster.client.aclose()
        for log in logs:
            log.close()


@pytest.fixture
async def cluster(start_cluster: StartCluster) -> Cluster:
    return await start_cluster()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


# ---------------------------------------------------------------------------
# clients


def _simulate(tokens: int, rate: float) -> dict[str, Any]:
    return {"simulate": {"tokens": tokens, "rate": rate}}


@dataclass
class Reading:
    """What one EventSource-like reader saw, over all its connections."""

    url: str
    events: list[ServerSentEvent] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    cuts: list[float] = field(default_factory=list)  # when a connection ended early

    @property
    def messages(self) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event == "message"]

    @property
    def text(self) -> str:
        return text_of(self.messages)


async def read_like_eventsource(session: aiohttp.ClientSession, url: str) -> Reading:
    """Read an event stream as EventSource does, closing it on ``done`` or ``error`` (as a page
    would): a connection that ends early is opened again after the ``retry:`` delay, with
    ``Last-Event-ID``; any answer other than 200 ``text/event-stream`` ends it for good."""
    reading = Reading(url)
    last_id: str | None = None
    retry_ms = 3000  # EventSource's own default until the stream sets one
    while True:
        decoder = SSEDecoder()
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with session.get(url, headers=headers) as response:
                reading.statuses.append(response.status)
                if (response.status != 200
                        or response.content_type != "text/event-stream"):
                    return reading  # 204: finished; anything else: EventSource gives up
                async for data in response.content.iter_any():
                    for event in decoder.feed(data):
                        reading.events.append(event)
                        if event.event in ("done", "error"):
                            return reading
                    last_id = decoder.last_event_id or last_id
                    retry_ms = decoder.retry if decoder.retry is not None else retry_ms
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            pass
        last_id = decoder.last_event_id or last_id
        retry_ms = decoder.retry if decoder.retry is not None else retry_ms
        reading.cuts.append(time.monotonic())
        await asyncio.sleep(retry_ms / 1000)


def _seqs(events: list[ServerSentEvent]) -> list[int]:
    return [int((e.id or "").rsplit(":", 1)[1]) for e in events]


def _assert_complete(reading: Reading, prompt: str, tokens: int) -> None:
    """Every event once, in order, then ``done`` from a single upstream attempt."""
    assert set(reading.statuses) == {200}, (reading.url, reading.statuses)
    assert reading.events and reading.events[-1].event == "done", (reading.url, reading.events[-1:])
    done = json.loads(reading.events[-1].data)
    assert done["finish_reason"] == "stop" and done["attempts"] == 1, done
    assert _seqs(reading.events) == list(range(1, len(reading.events) + 1)), reading.url
    assert len({(e.id or "").rsplit(":", 1)[0] for e in reading.events}) == 1
    assert reading.text == expected(tokens, prompt=prompt), reading.url


async def _resumable(cluster: Cluster, session: aiohttp.ClientSession, prompt: str,
                     tokens: int, rate: float) -> Reading:
    created = await cluster.post(session, cluster.url + "/v1/streams",
                                 story(tokens, rate, prompt=prompt))
    return await read_like_eventsource(session, cluster.url + created["events_url"])


async def _one_shot(cluster: Cluster, session: aiohttp.ClientSession, prompt: str,
                    tokens: int, rate: float) -> Reading:
    ticket = await cluster.post(session, cluster.url + "/v1/tickets")
    query = {"q": prompt, "model": "sim-small", "extra": json.dumps(_simulate(tokens, rate))}
    return await read_like_eventsource(session, cluster.url + ticket["url"] + "&"
                                       + urlencode(query))


def _assert_nothing_secret_logged(cluster: Cluster, *secrets: str) -> None:
    text = (cluster.prefix / "access.log").read_text(encoding="utf-8")
    assert "ticket=" not in text and "?" not in text
    for secret in secrets:
        assert secret not in text


# ---------------------------------------------------------------------------
# the tests


def test_the_docs_nginx_block_is_what_runs_with_only_ports_and_paths_changed(
    tmp_path: Path,
) -> None:
    site = _nginx_config(tmp_path, port=18080, instances=[18081, 18082])
    block = _doc_nginx_block()
    assert len(site.splitlines()) == len(block.splitlines())
    changed = [(a, b) for a, b in zip(block.splitlines(), site.splitlines(), strict=True)
               if a != b]
    assert len(changed) == len(SUBSTITUTIONS)  # those lines, nothing else
    for directive in ("least_conn;", "proxy_buffering off;", "keepalive ",
                      "proxy_next_upstream error timeout http_503;"):
        assert directive in site


async def test_any_instance_serves_any_stream_through_nginx_and_directly(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    a, b = cluster.instances
    # Created through nginx: read through nginx, then on A and on B directly.
    created = await cluster.post(session, cluster.url + "/v1/streams",
                                 story(30, 300, prompt="through nginx"))
    readings = [await read_like_eventsource(session, base + created["events_url"])
                for base in (cluster.url, a.url, b.url)]
    for reading in readings:
        _assert_complete(reading, "through nginx", 30)
    assert readings[0].events == readings[1].events == readings[2].events
    async with session.get(cluster.url + created["events_url"],
                           headers={"Last-Event-ID": readings[0].events[-1].id or ""}) as r:
        assert r.status == 204  # the end is the end through nginx too: EventSource stops

    # Created on A directly (about 2 s of answer): read live at once through nginx
    # (whichever instance least_conn picks) and directly on B, which never ran it.
    created = await cluster.post(session, a.url + "/v1/streams", story(60, 30, prompt="on A"))
    assert (await cluster.generator_of(created["id"])) is a
    pair = await asyncio.gather(*(read_like_eventsource(session, base + created["events_url"])
                                  for base in (cluster.url, b.url)))
    for reading in pair:
        _assert_complete(reading, "on A", 60)
        assert not reading.cuts
    assert pair[0].events == pair[1].events
    served = set(await cluster.served(f"/v1/streams/{created['id']}/events", 1))
    assert len(served) == 1 and served <= {a.address, b.address}, served
    assert await cluster.stream_count() == 2
    _assert_nothing_secret_logged(cluster)


async def test_rolling_restart_through_nginx_every_event_once_in_order(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    tokens, rate = 75, 30  # 2.5 s per answer
    readers: list[tuple[str, asyncio.Task[Reading]]] = []  # (prompt, reader)
    loading = True

    def start_one(i: int) -> None:
        prompt = f"story number {i}"
        make = _resumable if i % 2 == 0 else _one_shot  # POST /v1/streams, or the one-shot GET
        readers.append((prompt, asyncio.ensure_future(make(cluster, session, prompt, tokens,
                                                            rate))))

    async def keep_starting() -> None:
        i = 10
        while loading:
            start_one(i)
            i += 1
            await asyncio.sleep(0.25)

    for i in range(10):  # ten at once, then one more every 0.25 s for the whole restart
        start_one(i)
    load = asyncio.ensure_future(keep_starting())
    try:
        await asyncio.sleep(0.6)  # every first reader is reading
        sigterms = [await cluster.restart(instance) for instance in cluster.instances]
    finally:
        loading = False
        await load
    results = await asyncio.wait_for(asyncio.gather(*(task for _, task in readers)), 30)

    assert len(results) >= 25
    for (prompt, _), reading in zip(readers, results, strict=True):
        _assert_complete(reading, prompt, tokens)
    # Readers were really let go by each draining instance, and came back.
    cuts = [cut for reading in results for cut in reading.cuts]
    for sent in sigterms:
        assert any(sent <= cut < sent + 1.0 for cut in cuts), "nobody was let go at a SIGTERM"
    for form in ("/v1/streams/", "/v1/chat/stream?"):  # both forms resumed elsewhere
        assert any(r.cuts for r in results if form in r.url), form
    # One generation per stream: no reconnect ever started another (nor a retried POST).
    assert await cluster.stream_count() == len(readers)
    assert set(cluster.post_retries) <= {502, 503}
    _assert_nothing_secret_logged(cluster, "story")


async def test_chromium_eventsource_through_nginx_survives_a_rolling_restart(
    cluster: Cluster, session: aiohttp.ClientSession, browser: Browser
) -> None:
    prompt, tokens = "a browser story", 120  # 4 s at 30 tokens/s
    context = await browser.new_context()
    try:
        page = await context.new_page()
        log = PageLog()
        page.on("console", log.on_console)
        page.on("pageerror", log.on_page_error)
        response = await page.goto(cluster.url + "/healthz")
        assert response is not None and response.status == 200
        created = await cluster.post(session, cluster.url + "/v1/streams",
                                     story(tokens, 30, prompt=prompt))
        generator = await cluster.generator_of(created["id"])
        other = next(i for i in cluster.instances if i is not generator)
        await page.evaluate("""(url) => {
            const got = window.got = {text: "", ids: [], opens: 0, cuts: 0, done: null};
            const source = new EventSource(url);
            source.onopen = () => { got.opens += 1; };
            source.onmessage = (e) => {
                got.ids.push(e.lastEventId);
                got.text += JSON.parse(e.data).content ?? "";
            };
            source.addEventListener("done", (e) => {
                got.ids.push(e.lastEventId);
                got.done = JSON.parse(e.data);
                source.close();
            });
            source.addEventListener("error", (e) => {
                if (e.data) { got.done = {error: JSON.parse(e.data)}; source.close(); }
                else { got.cuts += 1; }  // a network error: EventSource reconnects by itself
            });
        }""", created["events_url"])
        await page.wait_for_function("window.got.ids.length >= 5", timeout=5000)
        # The instance that generates the stream last, so that it drains mid-answer.
        await cluster.restart(other)
        await cluster.restart(generator)
        await page.wait_for_function("window.got.done !== null", timeout=20_000)
        got = await page.evaluate("window.got")
    finally:
        await context.close()
    assert got["done"].get("finish_reason") == "stop", got["done"]
    assert got["text"] == expected(tokens, prompt=prompt)
    assert [int(i.rsplit(":", 1)[1]) for i in got["ids"]] == list(range(1, len(got["ids"]) + 1))
    assert got["opens"] >= 2 and got["cuts"] == got["opens"] - 1, got
    # Chromium logs each cut response itself; the page logs nothing else.
    assert len(log.errors) <= got["cuts"], log.errors
    for error in log.errors:
        assert "ERR_INCOMPLETE_CHUNKED_ENCODING" in error and created["id"] in error, error
    assert await cluster.stream_count() == 1


async def _read_completion(session: aiohttp.ClientSession, url: str, prompt: str,
                           started: list[int]) -> tuple[str, bool]:
    """POST /v1/chat/completions (stream); returns (text, whether [DONE] came)."""
    body = {**story(90, 30, prompt=prompt), "stream": True}
    decoder = SSEDecoder()
    text: list[str] = []
    started.append(0)
    index = len(started) - 1
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            async for data in r.content.iter_any():
                for event in decoder.feed(data):
                    if event.data == "[DONE]":
                        return "".join(text), True
                    for choice in json.loads(event.data).get("choices", []):
                        text.append(choice["delta"].get("content") or "")
                    started[index] += 1
    except aiohttp.ClientPayloadError:
        pass  # cut
    return "".join(text), False


@pytest.mark.parametrize("shutdown_timeout_s", ["10", "1"],
                         ids=["answer-within-shutdown-timeout",
                              "answer-longer-than-shutdown-timeout"])
async def test_openai_stream_in_flight_finishes_while_its_instance_drains(
    start_cluster: StartCluster, session: aiohttp.ClientSession, shutdown_timeout_s: str
) -> None:
    cluster = await start_cluster(STREAMSVC__SERVER__SHUTDOWN_TIMEOUT_S=shutdown_timeout_s)
    a, _ = cluster.instances
    started: list[int] = []
    # Two answers of 3 s at once: least_conn gives each instance one of them.
    answers = [asyncio.ensure_future(_read_completion(session, cluster.url, f"chat {n}", started))
               for n in range(2)]
    deadline = time.monotonic() + 5
    while len(started) < 2 or min(started) < 3:
        assert time.monotonic() < deadline, started
        await asyncio.sleep(0.02)
    status = await cluster.stop(a)  # A drains: its answer must still finish
    results = await asyncio.wait_for(asyncio.gather(*answers), 15)
    assert status == 0, a.log_tail()
    served = await cluster.served("/v1/chat/completions", 2)
    assert sorted(served) == sorted(i.address for i in cluster.instances), served
    for n, (text, done) in enumerate(results):
        assert done, f"answer {n} was cut ({len(text)} characters)"
        assert text == expected(90, prompt=f"chat {n}")


async def test_requests_through_nginx_are_answered_at_once_while_an_instance_drains(
    cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    a, _ = cluster.instances

    async def timed(method: str, path: str) -> tuple[int, float]:
        started = time.monotonic()
        async with session.request(method, cluster.url + path, headers=AUTH) as response:
            await response.read()
            return response.status, time.monotonic() - started

    # nginx keeps idle connections open to both instances (upstream keepalive).
    await asyncio.gather(*(timed("GET", "/v1/models") for _ in range(8)))
    # A generates a 3 s answer that nobody reads: its drain lasts about that long.
    await cluster.post(session, a.url + "/v1/streams", story(90, 30, prompt="keeps A draining"))
    assert a.process is not None
    a.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)  # A has closed its listening socket and drains
    answers = [await timed("GET", "/v1/models") for _ in range(4)]
    answers.append(await timed("POST", "/v1/tickets"))
    assert await cluster.exited(a) == 0
    assert [status for status, _ in answers] == [200] * 4 + [201], answers
    assert max(seconds for _, seconds in answers) < 1.0, answers
