"""Fuzzing (hypothesis): the request parsers, the SSE decoder and the chunk decoder.

Two layers. The parsers themselves, in process, with many examples: any
input is either accepted or refused with a ``bad_request`` that names its
field, and nothing else ever escapes. Then the whole relay (a ``streamsvc
serve`` process) over real sockets, with fewer: bodies, query strings,
``Last-Event-ID`` values and raw request heads; every answer is a 2xx or a
4xx with an OpenAI-shaped body naming the field, never a 5xx, and the
process keeps its file descriptors.

The example counts are bounded for CI; ``STREAMSVC_FUZZ_EXAMPLES=N`` runs N
of each instead (``--hypothesis-show-statistics`` prints what ran).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsvc.chunks import Chunk, SurrogateJoiner
from streamsvc.errors import ClientError, ErrorCode
from streamsvc.server.requests import parse_chat_body, parse_chat_query, parse_last_event_id
from streamsvc.server.runner import unreadable_request
from streamsvc.sse import SSEDecoder
from streamsvc.validation import MAX_JSON_DEPTH, decode_json
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("STREAMSVC_FUZZ_EXAMPLES", "0"))


def examples(ci: int) -> settings:
    """``ci`` examples (or ``STREAMSVC_FUZZ_EXAMPLES``), no deadline, reproducible draws."""
    return settings(max_examples=EXAMPLES or ci, deadline=None, derandomize=not EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- strategies -------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
FIELDS = ("model", "messages", "stream", "n", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "stream_options", "streamsvc", "tools", "simulate")
good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                      "content": st.text(max_size=30)})
# Near-valid bodies: each known field right, wrong, or missing.
chat_bodies = st.fixed_dictionaries({}, optional={
    "model": st.just("echo") | json_values,
    "messages": st.lists(good_message | json_values, max_size=3) | json_values,
    **{name: json_values for name in FIELDS[2:]},
})


def deep(depth: int, opener: str = "[") -> str:
    closer = "]" if opener == "[" else "}"
    inner = '{"a":' if opener == "{" else "["
    return inner * depth + ("1" if opener == "{" else "") + closer * depth


raw_json_texts = st.one_of(
    st.integers(1, 3 * MAX_JSON_DEPTH).map(deep),
    st.integers(1, 3 * MAX_JSON_DEPTH).map(lambda n: deep(n, "{")),
    st.sampled_from(["1e999", "-1e400", "NaN", "Infinity", '"\\ud83d"', '"\\ude42"',
                     "[" * 100_000, '{"model": "echo", "temperature": 1e999}', "", " ", "\x00"]),
)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    chat_bodies.map(lambda body: json.dumps(body).encode()),
    raw_json_texts.map(str.encode),
    st.tuples(chat_bodies, raw_json_texts).map(
        lambda pair: json.dumps({**pair[0], "x": "@"}).replace('"@"', pair[1] or "0").encode()),
)
query_values = st.one_of(
    st.text(max_size=30), raw_json_texts, json_values.map(json.dumps),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "1_0", " 1", "١", "３", "²", "0.5", "3",
                     "9" * 30, "", "echo"]),
)
queries = st.dictionaries(
    st.sampled_from(["q", "messages", "model", "extra", "max_tokens", "n", "temperature",
                     "top_p", "lastEventId", "Last-Event-ID", "other"]),
    query_values, max_size=6)
STREAM_ID = "st_" + "ab" * 12
seqs = st.one_of(st.text(max_size=14),
                 st.sampled_from(["0", "1", "²", "٣", "３", "-1", "+1", "1 ", "9" * 13, "1e3"]))
last_event_ids = st.one_of(
    st.text(max_size=40),
    seqs.map(lambda seq: f"{STREAM_ID}:{seq}"),
    st.tuples(st.text("0123456789abcdefABCDEF_st:", max_size=30), seqs).map(":".join),
)


def _check_refusal(error: ClientError) -> None:
    """The shape every refusal of a request has: bad_request, naming the field first."""
    assert error.code is ErrorCode.BAD_REQUEST and error.status == 400
    assert isinstance(error.param, str) and error.param
    assert error.message.startswith(f"{error.param}: "), error.message


# -- the parsers, in process ------------------------------------------------------------------

@examples(600)
@given(raw=raw_bodies, stream_default=st.booleans())
def test_fuzz_chat_body_is_accepted_or_refused_naming_a_field(
    raw: bytes, stream_default: bool,
) -> None:
    try:
        chat = parse_chat_body(raw, stream_default=stream_default)
    except ClientError as error:
        _check_refusal(error)
        return
    assert chat.model and isinstance(chat.body["messages"], list)
    assert "streamsvc" not in chat.body
    msgspec.json.encode(chat.body)  # what goes upstream encodes: finite, not too deep


@examples(600)
@given(query=queries, default_model=st.sampled_from(["", "echo"]))
def test_fuzz_one_shot_query_is_accepted_or_refused_naming_a_field(
    query: dict[str, str], default_model: str,
) -> None:
    try:
        chat = parse_chat_query(query, default_model=default_model)
    except ClientError as error:
        _check_refusal(error)
        return
    for name in ("temperature", "top_p"):
        value = chat.body.get(name)
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    msgspec.json.encode(chat.body)


@examples(800)
@given(value=last_event_ids, param=st.sampled_from(["Last-Event-ID", "lastEventId"]))
def test_fuzz_last_event_id_is_a_seq_in_ascii_digits_or_refused_naming_the_parameter(
    value: str, param: str,
) -> None:
    try:
        parsed = parse_last_event_id(value, param)
    except ClientError as error:
        _check_refusal(error)
        assert error.param == param
        return
    if parsed is None:
        assert value == ""
        return
    stream_id, seq = parsed
    head, _, digits = value.rpartition(":")
    assert head == stream_id and re.fullmatch(r"st_[0-9a-f]{24}", stream_id)
    assert re.fullmatch(r"[0-9]{1,12}", digits) and int(digits) == seq


@examples(400)
@given(text=raw_json_texts | st.text(max_size=60), param=st.sampled_from(["body", "extra"]))
def test_fuzz_decode_json_names_its_parameter_or_a_path(text: str, param: str) -> None:
    try:
        decode_json(text, param)
    except ClientError as error:
        _check_refusal(error)
        assert error.param == param or error.param.startswith(
            "" if param == "body" else param)


# -- the SSE decoder and the chunk decoder: what an upstream can send -------------------------

@examples(600)
@given(stream=st.binary(max_size=400), data=st.data())
def test_fuzz_sse_decoder_takes_any_bytes_the_same_at_any_chunking(
    stream: bytes, data: st.DataObject,
) -> None:
    whole = SSEDecoder().feed(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = SSEDecoder()
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert [event for piece in pieces for event in decoder.feed(piece)] == whole
    for event in whole:
        assert "\r" not in event.data and (event.id is None or "\0" not in event.id)


chunk_texts = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["content", "reasoning", "refusal"]),
                       st.text(max_size=8)), max_size=4).map(
        lambda parts: json.dumps({"choices": [{"index": i, "delta": {f: t}} for i, f, t in parts]
                                  }).encode()),
    st.text(max_size=10).map(lambda t: json.dumps(  # lone halves, as escapes
        {"choices": [{"index": 0, "delta": {"content": t + "\ud83d"}}]}).encode()),
    st.text(max_size=10).map(lambda t: json.dumps(
        {"id": "\ude42", "choices": [{"index": 0, "delta": {"content": "\ude42" + t}}]}).encode()),
    raw_json_texts.map(str.encode),
)


@examples(600)
@given(raws=st.lists(chunk_texts, max_size=6))
def test_fuzz_chunk_decoder_reads_a_chunk_or_refuses_it_and_what_it_reads_encodes(
    raws: list[bytes],
) -> None:
    joiner = SurrogateJoiner()
    for raw in raws:
        try:
            chunk = joiner.join(Chunk.from_json(raw))
        except msgspec.DecodeError:
            continue  # the relay's upstream_error "malformed chunk"
        out = chunk.to_json()  # a lone surrogate would raise here
        assert msgspec.json.decode(out) == chunk.data


@examples(500)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40), data=st.data())
def test_fuzz_text_cut_at_any_utf16_unit_as_escapes_is_joined_whole(
    text: str, data: st.DataObject,
) -> None:
    units = text.encode("utf-16-le")
    cuts = sorted({2 * c for c in data.draw(st.lists(st.integers(0, len(units) // 2)))})
    pieces = [units[a:b].decode("utf-16-le", "surrogatepass")
              for a, b in zip([0, *cuts], [*cuts, len(units)], strict=True)]
    joiner = SurrogateJoiner()
    got = "".join(joiner.join(Chunk.from_json(json.dumps(
        {"choices": [{"index": 0, "delta": {"content": piece}}]}).encode())).content
        for piece in pieces)
    assert got == text


@examples(300)
@given(status=st.sampled_from([400, 400, 400, 413, 500]),
       reason=st.text("abcdefgh ", max_size=20),
       secret=st.text("0123456789abcdef", min_size=8, max_size=16),
       kind=st.sampled_from(["BadHttpMessage", "LineTooLong", "InvalidHeader", "BadStatusLine",
                             "BadHttpMethod", "TransferEncodingError"]))
def test_fuzz_unreadable_request_errors_name_a_part_and_never_echo_what_was_sent(
    status: int, reason: str, secret: str, kind: str,
) -> None:
    from aiohttp import http_exceptions

    sent = f"X-Key: Bearer sk-{secret}\x00"  # what aiohttp quotes in its messages
    cls = getattr(http_exceptions, kind)
    exc = cls(sent.encode()) if kind in ("LineTooLong", "InvalidHeader") else cls(
        f"{reason}:\n\n  b{sent!r}")
    error = unreadable_request(status, exc)
    assert secret not in error.message and secret not in str(error.param)
    if status != 400:
        assert error.code is ErrorCode.INTERNAL_ERROR
        return
    assert isinstance(error, ClientError)
    _check_refusal(error)


# -- the whole relay, over real sockets -------------------------------------------------------

@dataclass
class Relay:
    url: str
    pid: int
    fds: int = 0  # open file descriptors, and RSS, once warmed up
    rss: int = 0


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    """One ``streamsvc serve`` process (built-in simulator) for the module."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env.update(PYTHONPATH=str(ROOT), STREAMSVC__SERVER__BODY_TIMEOUT_S="2",
               STREAMSVC__LIMITS__MAX_STREAMS="0")
    process = subprocess.Popen([sys.executable, "-m", "streamsvc", "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "streamsvc serve exited"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, "streamsvc serve did not start"
            time.sleep(0.1)
    running = Relay(url, process.pid)
    for path in POST_PATHS:  # warm up every path once before the levels are taken
        _exchange(url, "POST", path, b'{"model": "echo", "messages": [{"role": "user",'
                                     b' "content": " hi"}]}', {"Content-Type": "application/json"})
    running.fds, running.rss = _open_fds(process.pid), _rss(process.pid)
    try:
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    """Resident set size in bytes."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CLOSED_SET = {code.value for code in ErrorCode}


def _check_answer(status: int, content_type: str, body: bytes) -> None:
    """2xx, or a 4xx with an OpenAI-shaped body naming the field; never a 5xx."""
    assert status < 500, (status, body[:300])
    if status < 400:
        return
    assert content_type.startswith("application/json"), (status, content_type, body[:200])
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["code"] in CLOSED_SET and error["code"] != "internal_error", error
    if status == 400:
        assert isinstance(error["param"], str) and error["param"], error
        assert error["param"] in error["message"], error


def _exchange(url: str, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> None:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        _check_answer(response.status, response.getheader("Content-Type") or "",
                      response.read())  # an event stream is read to its end
    finally:
        connection.close()


POST_PATHS = ("/v1/chat/completions", "/v1/chat/stream", "/v1/streams", "/v1/tickets")


@examples(200)
@given(raw=raw_bodies, path=st.sampled_from(POST_PATHS),
       last_event_id=st.none() | last_event_ids.filter(str.isascii))
def test_fuzz_http_bodies_get_2xx_or_a_4xx_naming_the_field(
    relay: Relay, raw: bytes, path: str, last_event_id: str | None,
) -> None:
    headers = {"Content-Type": "application/json"}
    if last_event_id is not None and last_event_id.isprintable():
        headers["Last-Event-ID"] = last_event_id.strip() or "x"
    _exchange(relay.url, "POST", path, raw, headers)


@examples(200)
@given(query=queries, path=st.sampled_from(["/v1/chat/stream", f"/v1/streams/{STREAM_ID}/events"]))
def test_fuzz_http_queries_get_2xx_or_a_4xx_naming_the_field(
    relay: Relay, query: dict[str, str], path: str,
) -> None:
    _exchange(relay.url, "GET", path + "?" + urllib.parse.urlencode(query))


header_bytes = st.binary(max_size=40) | st.sampled_from(
    [b"a\x00b", b"a\rb", b"\xff\xfe", b"x" * 9000, b"st_" + b"ab" * 12 + b":\xc2\xb2", b" "])


@examples(200)
@given(name=st.sampled_from([b"Last-Event-ID", b"X-Request-ID", b"Authorization",
                             b"Content-Type", b"Content-Length", b"X-Any", b"Bad Name"]),
       value=header_bytes, path=st.sampled_from([b"/v1/models", b"/v1/chat/stream?q=hi&model=echo",
                                                 b"/" + b"a" * 9000]))
def test_fuzz_http_heads_get_2xx_or_a_4xx_naming_the_field(
    relay: Relay, name: bytes, value: bytes, path: str,
) -> None:
    host, port = relay.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     + name + b": " + value + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        return _check_answer(status, headers.get("content-type", ""), b"")  # a stream: 200
    _check_answer(status, headers.get("content-type", ""), body)
    return None


def test_fuzz_http_leaves_the_relay_healthy_its_memory_and_file_descriptors_where_they_were(
    relay: Relay,
) -> None:
    """Runs after the HTTP fuzz tests of this module (file order)."""
    with urllib.request.urlopen(relay.url + "/readyz", timeout=5) as response:
        assert response.status == 200
    deadline = time.monotonic() + 15  # resumable streams nobody read end after resume_grace_s
    while _open_fds(relay.pid) > relay.fds + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _open_fds(relay.pid) <= relay.fds + 5, (relay.fds, _open_fds(relay.pid))
    assert _rss(relay.pid) < relay.rss + 32 * 2**20, (relay.rss, _rss(relay.pid))
    request = urllib.request.Request(
        relay.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "echo",
                         "messages": [{"role": "user", "content": " still here"}]}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    assert answer["choices"][0]["message"]["content"] == " still here"
