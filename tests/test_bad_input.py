"""Bad input gets a 4xx with an OpenAI-style error body naming the field; the server goes on.

Every case is sent over a real socket to each endpoint that takes it, and is
followed by a valid request that must still be answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from streamsvc.config import load_config
from streamsvc.server.app import create_app
from streamsvc.server.runner import AppRunner
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, Serve, StartServer, relay_overrides

POST_PATHS = ["/v1/chat/completions", "/v1/chat/stream", "/v1/streams"]
USER = [{"role": "user", "content": "hi"}]


def _ok(**more: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": USER, **more}


def _without(name: str) -> dict[str, Any]:
    body = _ok()
    del body[name]
    return body


# (case id, raw body bytes, the field the error must name)
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("invalid-json", b'{"model": "echo", "messages": [', "body"),
    ("empty-body", b"", "body"),
    ("whitespace-body", b"  \n ", "body"),
    ("body-array", b"[1, 2]", "body"),
    ("body-string", b'"hello"', "body"),
    ("body-null", b"null", "body"),
    ("model-missing", json.dumps(_without("model")).encode(), "model"),
    ("model-number", json.dumps(_ok(model=123)).encode(), "model"),
    ("model-empty", json.dumps(_ok(model="")).encode(), "model"),
    ("model-null", json.dumps(_ok(model=None)).encode(), "model"),
    ("messages-missing", json.dumps(_without("messages")).encode(), "messages"),
    ("messages-empty", json.dumps(_ok(messages=[])).encode(), "messages"),
    ("messages-string", json.dumps(_ok(messages="hi")).encode(), "messages"),
    ("messages-object", json.dumps(_ok(messages={"role": "user"})).encode(), "messages"),
    ("message-not-object", json.dumps(_ok(messages=["hi"])).encode(), "messages[0]"),
    ("second-message-not-object",
     json.dumps(_ok(messages=[USER[0], 5])).encode(), "messages[1]"),
    ("role-missing", json.dumps(_ok(messages=[{"content": "hi"}])).encode(), "messages[0].role"),
    ("role-number",
     json.dumps(_ok(messages=[{"role": 1, "content": "hi"}])).encode(), "messages[0].role"),
    ("content-number",
     json.dumps(_ok(messages=[{"role": "user", "content": 42}])).encode(), "messages[0].content"),
    ("content-object",
     json.dumps(_ok(messages=[{"role": "user", "content": {"t": 1}}])).encode(),
     "messages[0].content"),
    ("stream-string", json.dumps(_ok(stream="yes")).encode(), "stream"),
    ("stream-number", json.dumps(_ok(stream=1)).encode(), "stream"),
    ("n-zero", json.dumps(_ok(n=0)).encode(), "n"),
    ("n-string", json.dumps(_ok(n="2")).encode(), "n"),
    ("n-float", json.dumps(_ok(n=1.5)).encode(), "n"),
    ("max-tokens-zero", json.dumps(_ok(max_tokens=0)).encode(), "max_tokens"),
    ("temperature-string", json.dumps(_ok(temperature="hot")).encode(), "temperature"),
    ("stream-options-not-object",
     json.dumps(_ok(stream_options=True)).encode(), "stream_options"),
    ("include-usage-string",
     json.dumps(_ok(stream_options={"include_usage": "yes"})).encode(),
     "stream_options.include_usage"),
    ("streamsvc-unknown-option",
     json.dumps(_ok(streamsvc={"retries": True, "bogus": 1})).encode(), "streamsvc.bogus"),
    ("streamsvc-not-object", json.dumps(_ok(streamsvc=[1])).encode(), "streamsvc"),
    ("streamsvc-retries-string",
     json.dumps(_ok(streamsvc={"retries": "no"})).encode(), "streamsvc.retries"),
]


def _check_error(status: int, body: dict[str, Any], *, expected_status: int, param: str | None,
                 code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == code
    assert error["param"] == param
    if param is not None:
        assert param in error["message"], error["message"]


async def _still_serving(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{relay.url}/v1/chat/completions",
                            json=_ok(messages=[{"role": "user", "content": " fine"}])) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["choices"][0]["message"]["content"] == " fine"


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize(("raw", "param"), [pytest.param(raw, param, id=case)
                                            for case, raw, param in BAD_BODIES])
async def test_bad_body_names_the_field(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    path: str, raw: bytes, param: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{relay.url}{path}", data=raw, headers=headers) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        assert "X-Request-ID" in r.headers
        body = await r.json()
        status = r.status
    _check_error(status, body, expected_status=400, param=param, code="bad_request")
    assert body["error"]["type"] == "invalid_request_error"
    assert simulator.stats.requests == 0  # nothing bad goes upstream
    await _still_serving(relay, session)


async def test_sdk_raises_bad_request_naming_the_field(relay: RunningServer) -> None:
    async with openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="x",
                                  max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], n=0, stream=True
            )
        assert caught.value.status_code == 400
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["param"] == "n"
        assert caught.value.body["code"] == "bad_request"
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "ok"}]
        )
    assert answer.choices[0].message.content == "ok"


@pytest.mark.parametrize("path", POST_PATHS)
async def test_model_no_route_matches_is_404(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    path: str,
) -> None:
    overrides = {
        "upstreams": {"sim": {"base_url": simulator.url}},
        "routes": [{"model": "gpt-*", "upstreams": ["sim"]}],
    }
    relay = await start_server(overrides=overrides)
    async with session.post(f"{relay.url}{path}", json=_ok(model="claude-x")) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=404, param="model", code="model_not_found")
    assert "claude-x" in body["error"]["message"]
    assert simulator.stats.requests == 0
    # A model the routes do serve still works.
    async with session.post(f"{relay.url}/v1/chat/completions",
                            json=_ok(model="gpt-4o-mini")) as r:
        assert r.status == 200
    assert simulator.stats.requests == 1


@pytest.mark.parametrize("path", POST_PATHS)
async def test_a_json_answer_carries_what_the_client_sent_in_utf8(
    start_server: StartServer, session: aiohttp.ClientSession, path: str,
) -> None:
    """Every JSON body goes through one msgspec encoder: text as UTF-8, not as ``\\u`` escapes,
    and what the client sent comes back as it was sent."""
    relay = await start_server(overrides={"routes": [{"model": "gpt-*",
                                                      "upstreams": ["simulator"]}]})
    model = "modèle-日本-\U0001f600"
    async with session.post(f"{relay.url}{path}", json=_ok(model=model)) as r:
        assert r.content_type == "application/json"
        raw = await r.read()
    assert model.encode() in raw
    assert json.loads(raw)["error"]["param"] == "model"
    assert model in json.loads(raw)["error"]["message"]


async def test_one_shot_get_model_no_route_is_404(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    overrides = {
        "upstreams": {"sim": {"base_url": simulator.url}},
        "routes": [{"model": "gpt-*", "upstreams": ["sim"]}],
    }
    relay = await start_server(overrides=overrides)
    async with session.get(f"{relay.url}/v1/chat/stream",
                           params={"q": "hi", "model": "claude-x"}) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=404, param="model", code="model_not_found")


@pytest.mark.parametrize("path", POST_PATHS)
async def test_body_over_max_body_bytes_is_413(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    path: str,
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, server={"max_body_bytes": 2000})
    )
    big = _ok(messages=[{"role": "user", "content": "x" * 5000}])
    async with session.post(f"{relay.url}{path}", json=big) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=413, param="body", code="payload_too_large")
    assert "max_body_bytes" in body["error"]["message"]
    assert simulator.stats.requests == 0
    # A body under the limit still goes through.
    async with session.post(f"{relay.url}{path}", json=_ok()) as r:
        assert r.status in (200, 201)
        await r.read()


@pytest.mark.parametrize(
    "value",
    ["garbage", "st_123:4", f"st_{'a' * 24}", f"st_{'a' * 24}:", f"st_{'a' * 24}:x",
     f"st_{'a' * 24}:-1", f"st_{'A' * 24}:1", f"st_{'a' * 24}:{'9' * 13}"],
)
async def test_malformed_last_event_id(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer, value: str,
) -> None:
    await _last_event_id_refused(relay, session, value)
    assert simulator.stats.requests == 0
    await _still_serving(relay, session)


async def _last_event_id_refused(relay: RunningServer, session: aiohttp.ClientSession,
                                 value: str) -> None:
    """``value`` as the header and as each query parameter: a 400 naming what was sent."""
    url = f"{relay.url}/v1/chat/stream"
    events_url = f"{relay.url}/v1/streams/st_{'a' * 24}/events"
    for target in (url, events_url):
        # The header goes out as the value's UTF-8 bytes, as the fuzz run sent it.
        async with session.get(target, headers={"Last-Event-ID": value.encode().decode("latin-1")}
                               ) as r:
            status, body = r.status, await r.json()
        _check_error(status, body, expected_status=400, param="Last-Event-ID", code="bad_request")
        for name in ("lastEventId", "Last-Event-ID"):
            async with session.get(target, params={name: value}) as r:
                status, body = r.status, await r.json()
            _check_error(status, body, expected_status=400, param=name, code="bad_request")


async def test_malformed_header_wins_over_good_query(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{relay.url}/v1/chat/stream", headers={"Last-Event-ID": "nope"},
                           params={"q": "hi", "model": "echo"}) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=400, param="Last-Event-ID", code="bad_request")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/chat/completions/x"),
     ("PUT", "/v1/chat/completions"), ("GET", "/v1/streams/st_x/bogus")],
)
async def test_unknown_path_is_json_404(
    relay: RunningServer, session: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with session.request(method, f"{relay.url}{path}") as r:
        assert r.headers["Content-Type"].startswith("application/json")
        status, body = r.status, await r.json()
    if path == "/v1/chat/completions":
        # A known path with the wrong method: 405, still an OpenAI-style JSON error.
        assert status == 405
        assert set(body["error"]) >= {"message", "type", "param", "code"}
        assert "PUT" in body["error"]["message"]
    else:
        _check_error(status, body, expected_status=404, param=None, code="not_found")
    assert path in body["error"]["message"]
    await _still_serving(relay, session)


@pytest.mark.parametrize(
    ("params", "param"),
    [({"model": "echo"}, "q"), ({"q": "", "model": "echo"}, "q"), ({"q": "hi"}, "model"),
     ({"q": "hi", "model": ""}, "model"), ({"q": "hi", "model": "echo", "n": "two"}, "n"),
     ({"q": "hi", "model": "echo", "n": "0"}, "n"),
     ({"q": "hi", "model": "echo", "temperature": "warm"}, "temperature"),
     ({"messages": "[not json", "model": "echo"}, "messages"),
     ({"messages": "[]", "model": "echo"}, "messages"),
     ({"messages": '[{"role": "user", "content": 1}]', "model": "echo"}, "messages[0].content"),
     ({"q": "hi", "model": "echo", "extra": "[1]"}, "extra"),
     ({"q": "hi", "model": "echo", "extra": "{bad"}, "extra")],
)
async def test_one_shot_get_bad_query(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    params: dict[str, str], param: str,
) -> None:
    assert relay.config.server.default_model == ""
    async with session.get(f"{relay.url}/v1/chat/stream", params=params) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=400, param=param, code="bad_request")
    assert simulator.stats.requests == 0
    await _still_serving(relay, session)


async def test_one_shot_get_default_model_fills_in(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, server={"default_model": "echo"})
    )
    async with session.get(f"{relay.url}/v1/chat/stream", params={"q": " hi"}) as r:
        assert r.status == 200
        raw = await r.read()
    assert b"event: done" in raw
    assert simulator.stats.recent[-1]["body"]["model"] == "echo"


# -- issue 12: inputs a fuzz run found handled wrongly ------------------------------------------

DEEP = b"[" * 100_000  # far past any JSON decoder's stack
NESTED_PAST_LIMIT = json.dumps({"model": "echo", "messages": USER,
                                "x": json.loads("[" * 200 + "]" * 200)}).encode()


@pytest.mark.parametrize("path", [*POST_PATHS, "/v1/tickets"])
@pytest.mark.parametrize("raw", [DEEP, NESTED_PAST_LIMIT], ids=["100k-brackets", "200-levels"])
async def test_deeply_nested_json_body_is_a_400_naming_body(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    path: str, raw: bytes,
) -> None:
    async with session.post(f"{relay.url}{path}", data=raw,
                            headers={"Content-Type": "application/json"}) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=400, param="body", code="bad_request")
    assert "nested" in body["error"]["message"]
    assert simulator.stats.requests == 0
    await _still_serving(relay, session)


@pytest.mark.parametrize("name", ["extra", "messages"])
@pytest.mark.parametrize("depth", [1_200, 200])
async def test_deeply_nested_json_in_the_query_is_a_400_naming_the_parameter(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    name: str, depth: int,
) -> None:
    params = {"model": "echo", "q": "hi", name: "[" * depth + "]" * depth}
    async with session.get(f"{relay.url}/v1/chat/stream", params=params) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=400, param=name, code="bad_request")
    assert simulator.stats.requests == 0


async def test_simulator_deeply_nested_json_body_is_a_400_naming_body(
    simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{simulator.url}/chat/completions", data=DEEP) as r:
        status, body = r.status, await r.json()
    assert status == 400 and body["error"]["param"] == "body", body


@pytest.mark.parametrize("seq", ["²", "٣", "３", "1²", "₁"])
async def test_last_event_id_with_non_ascii_digits_is_a_400_naming_the_parameter_sent(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer, seq: str,
) -> None:
    await _last_event_id_refused(relay, session, f"st_{'a' * 24}:{seq}")
    assert simulator.stats.requests == 0
    await _still_serving(relay, session)


@pytest.mark.parametrize(("name", "value"), [
    ("temperature", "nan"), ("temperature", "inf"), ("temperature", "-inf"),
    ("temperature", "Infinity"), ("top_p", "1e999"), ("top_p", "NaN"),
    ("temperature", "１"), ("temperature", "1_0"), ("temperature", " 1"),
    ("max_tokens", "٣"), ("max_tokens", "1_000"), ("n", "９"), ("max_tokens", "9" * 5000),
])
async def test_non_finite_or_non_ascii_query_numbers_are_a_400_naming_the_field(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    name: str, value: str,
) -> None:
    params = {"model": "echo", "q": "hi", name: value}
    async with session.get(f"{relay.url}/v1/chat/stream", params=params) as r:
        status, body = r.status, await r.json()
    _check_error(status, body, expected_status=400, param=name, code="bad_request")
    assert simulator.stats.requests == 0


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
     "temperature"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "top_p": -1e400}',
     "top_p"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}],'
     b' "simulate": {"rate": 1e999}}', "simulate.rate"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "hi", "x": [1, 2e308]}]}',
     "messages[0].x[1]"),
], ids=["temperature", "top_p", "nested", "in-array"])
async def test_non_finite_numbers_in_the_body_are_a_400_naming_the_field(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer,
    raw: bytes, param: str,
) -> None:
    for path in POST_PATHS:
        async with session.post(f"{relay.url}{path}", data=raw,
                                headers={"Content-Type": "application/json"}) as r:
            status, body = r.status, await r.json()
        _check_error(status, body, expected_status=400, param=param, code="bad_request")
    assert simulator.stats.requests == 0


async def test_query_numbers_in_ascii_decimals_still_pass(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    params = {"model": "echo", "q": " hi", "temperature": "0.5", "top_p": "1e-1",
              "max_tokens": "16", "n": "1"}
    async with session.get(f"{relay.url}/v1/chat/stream", params=params) as r:
        assert r.status == 200
        assert b"event: done" in await r.read()
    sent = simulator.stats.recent[-1]["body"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.5, 0.1, 16)


# (case id, raw request bytes, the status, the param the JSON error must name)
UNREADABLE: list[tuple[str, bytes, str]] = [
    ("nul-in-header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Trace: a\x00b\r\n\r\n", "X-Trace"),
    ("cr-in-header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Trace: a\rb\r\n\r\n", "X-Trace"),
    ("nul-in-authorization",
     b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-sec\x00ret\r\n\r\n",
     "Authorization"),
    ("request-line-over-8190", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "url"),
    ("header-over-8190", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
     "headers"),
    ("bad-method", b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    ("bad-version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", "request line"),
    ("tls-on-http", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", "method"),
    ("content-length-letters",
     b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
    ("bad-chunk-size",
     b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "body"),
]


async def _raw_exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a new connection; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def served(simulator: SimulatorServer) -> AsyncIterator[str]:
    """The relay on streamsvc's own runner (as ``streamsvc serve`` runs it), on a free port."""
    runner = AppRunner(create_app(load_config(env={}, overrides=relay_overrides(simulator.url))),
                       handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("raw", "param"), [pytest.param(raw, param, id=case)
                                            for case, raw, param in UNREADABLE])
async def test_aiohttp_own_400s_are_openai_json_naming_the_part(
    served: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
    raw: bytes, param: str,
) -> None:
    with caplog.at_level(logging.DEBUG):
        status, headers, body = await _raw_exchange(served, raw)
    assert headers["Content-Type"].startswith("application/json")
    assert "X-Request-ID" in headers
    error = json.loads(body)
    _check_error(status, error, expected_status=400, param=param, code="bad_request")
    assert error["error"]["type"] == "invalid_request_error"
    # Neither the answer nor the logs repeat what was sent (a key, say): only a header's name.
    for secret in (b"sk-sec", b"a\x00b", b"aaaaaaaaaa"):
        assert secret not in body
        assert secret.decode() not in caplog.text
    async with session.get(f"{served}/v1/models") as r:  # the server goes on
        assert r.status == 200


async def test_streamsvc_serve_answers_aiohttp_own_400s_in_json(serve: Serve) -> None:
    _, url = await serve()
    status, headers, body = await _raw_exchange(url, UNREADABLE[0][1])
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["param"] == "X-Trace"
